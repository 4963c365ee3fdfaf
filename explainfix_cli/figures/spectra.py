"""Figures of an explanation (docs/method.md §5), drawn headless with matplotlib.

Every function draws one figure into `path` and knows nothing about the report around it. The
object-oriented `Figure` API is used instead of pyplot: no global state, no GUI backend, and
matplotlib is imported only when a figure is drawn. Inputs are numpy arrays, never tensors: the
figures are drawn in forked processes, where a multi-threaded torch operation deadlocks (GNU
OpenMP does not survive fork).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, get_args

import numpy as np

from explainfix_cli.choices import FigureFormat
from explainfix_cli.dct import frequency_order
from explainfix_cli.explanation.spectra import LayerSpectra
from explainfix_cli.figures.common import new_figure, save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FORMATS: tuple[str, ...] = get_args(FigureFormat)
Draw = Callable[[Path], None]  # draws one figure into the given file
MAX_CHANNELS_SHOWN = 16  # a kernel grid larger than 16 x 16 is unreadable on a page
MAX_LEGEND_ENTRIES = 8
ATTRIBUTION_COLUMNS = 8  # inputs per row of the attribution grid


_pending: Sequence[tuple[Draw, Path]] = ()  # the jobs of `draw_all`, inherited by its forked workers


def _draw_pending(index: int) -> None:
    draw, path = _pending[index]
    draw(path)


def draw_all(jobs: Sequence[tuple[Draw, Path]], done: Callable[[], None] | None = None) -> None:
    """Draw independent figures, each `draw(path)`, in forked worker processes where possible.

    A figure is a few hundred milliseconds of single-threaded matplotlib work, the same whatever
    the data, so a report's figures take about 1/cores of the time in parallel. Forked workers
    inherit the jobs, matplotlib and the arrays (nothing is pickled); where fork is unsafe (macOS),
    in a daemon process, or on one core, they are drawn in turn. A worker's exception is raised here.
    `done()` is called in this process as each figure is finished (progress).
    """
    done = done or (lambda: None)
    global _pending
    workers = min(len(jobs), os.cpu_count() or 1)
    forkable = sys.platform != "darwin" and "fork" in multiprocessing.get_all_start_methods()
    if workers < 2 or not forkable or multiprocessing.current_process().daemon:  # a daemon may not have children
        for draw, path in jobs:
            draw(path)
            done()
        return
    # imported once here, not once per worker
    import matplotlib.backends.backend_agg
    import matplotlib.figure  # noqa: F401

    _pending = jobs
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            for _ in pool.map(_draw_pending, range(len(jobs))):
                done()
    finally:
        _pending = ()


def _layer_label(index: int, spectra: LayerSpectra) -> str:
    return f"{index}: {spectra.name}"


def _basis_labels(kh: int, kw: int) -> list[str]:
    return [f"{j // kw},{j % kw}" for j in frequency_order(kh, kw)]


def draw_heatmap(layers: list[tuple[int, LayerSpectra]], path: Path, log_scale: bool = False) -> None:
    """The ExplainSteer heatmap for layers of one kernel shape, with marginal bars in shares.

    Cells are each layer's energy per basis vector (`e_d`) divided by the layer's total, so layers
    of very different magnitude stay comparable. A line sets off the three lowest-frequency basis
    vectors; the right bars give each layer's low-frequency share (their sum), against the share a
    layer without preference would have; the top bars the mean share of each basis vector over
    the layers. The absolute numbers are in spectra.json.
    """
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm, Normalize

    kh, kw = layers[0][1].kernel_shape
    e_d = np.array([s.e_d for _, s in layers])  # (layers, kh*kw), low -> high frequency
    totals = e_d.sum(axis=1)  # (layers,)
    # A layer without energy (all kernels zero) has no shares: NaN, drawn grey and labelled undefined.
    share = e_d / np.where(totals > 0, totals, np.nan)[:, None]  # (layers, kh*kw)
    low = np.array([s.low_frequency_share for _, s in layers])  # (layers,), NaN where undefined
    n_layers, n_basis = share.shape
    even = 3 / n_basis  # the low-frequency share of a layer without preference

    cells_width = max(0.3 * n_basis, 4.5)  # inches; the margins keep a fixed width beside it
    fig = new_figure(cells_width + 5.0, min(3.6 + 0.28 * n_layers, 30.0))
    grid = fig.add_gridspec(2, 3, width_ratios=[cells_width, 2.0, 0.15], height_ratios=[1, 4])
    ax = fig.add_subplot(grid[1, 0])
    # The margins line up with the cells by limits, not by sharing axes: a shared axis would
    # build a hidden tick per basis vector and layer, and ticks are most of a figure's cost.
    top = fig.add_subplot(grid[0, 0])
    right = fig.add_subplot(grid[1, 1])
    bar = fig.add_subplot(grid[1, 2])

    positive = share[share > 0]
    norm = (
        LogNorm(vmin=max(positive.min(), 1e-4), vmax=positive.max())
        if log_scale and positive.size
        else Normalize(vmin=0.0, vmax=max(float(np.nanmax(share, initial=0.0)), 1e-12))
    )
    cmap = colormaps["magma"].with_extremes(bad="0.75")
    image = ax.imshow(share, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    fig.colorbar(image, cax=bar, label="share of the layer's energy")
    ax.axvline(2.5, color="white", linewidth=1.5, linestyle="--")  # the low-frequency group on its left
    ax.set_xticks(range(n_basis), _basis_labels(kh, kw), rotation=90 if n_basis > 9 else 0)
    ax.set_xlabel("DCT-II basis vector (vertical, horizontal frequency), low → high frequency;\nleft of the dashed line: the 3 lowest")
    ax.set_yticks(range(n_layers), [_layer_label(i, s) for i, s in layers])
    ax.set_ylabel("layer depth (input → output)")

    defined = ~np.isnan(low)  # (layers,)
    top.bar(range(n_basis), share[defined].mean(axis=0) if defined.any() else np.zeros(n_basis), color="tab:blue")
    top.set_ylabel("mean share\nover layers")
    top.set_xlim(ax.get_xlim())
    top.set_xticks([])
    _draw_low_shares(right, layers, even)
    right.set_ylim(ax.get_ylim())
    weighting = "kernels weighted by their saliency on the data" if layers[0][1].saliency_weighted else "kernels averaged, no data"
    fig.align_ylabels([top, ax])
    fig.suptitle(f"How each {kh}x{kw} layer's kernel energy spreads over spatial frequencies\n({weighting})")
    save_figure(fig, path)


def _draw_low_shares(right: Axes, layers: list[tuple[int, LayerSpectra]], even: float) -> None:
    """The heatmap's right margin: each layer's low-frequency share as a bar against `even`, the
    share of a layer without preference; a layer without energy gets no bar and the word undefined."""
    low = np.array([s.low_frequency_share for _, s in layers])  # (layers,), NaN where undefined
    right.barh(range(len(layers)), np.nan_to_num(low), color=["tab:orange" if v > even else "tab:blue" for v in low])
    right.axvline(even, color="black", linewidth=1, linestyle=":")
    right.text(even, -0.6, f" no preference\n {even:.2f}", fontsize=7, va="bottom")
    for row, (value, (_, spectra)) in enumerate(zip(low, layers, strict=True)):
        words = spectra.share_words() if spectra.share_defined else "undefined (all zero)"
        right.text(min(np.nan_to_num(value), 0.8) + 0.02, row, words, va="center", fontsize=7)
    right.set_xlim(0, 1)
    right.set_xlabel("low-frequency share\n(3 lowest basis vectors)")
    right.set_yticks([])


def draw_curves(layers: list[tuple[int, LayerSpectra]], path: Path) -> None:
    """Per-layer frequency profiles: `e_1` split into its vertical and horizontal halves, and `e_0`.

    Each curve is divided by its own sum, so it reads as the share of the layer's energy at each
    frequency in that direction (each curve sums to 1), whatever the layer's magnitude.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    kh, kw = layers[0][1].kernel_shape
    square = layers[0][1].e_0 is not None
    fig = new_figure(11.0 if square else 8.0, 3.9)
    axes = fig.subplots(1, 3 if square else 2, sharey=True)
    depth = Normalize(vmin=layers[0][0], vmax=max(layers[-1][0], layers[0][0] + 1))
    cmap = colormaps["viridis"]
    handles = []  # one per layer: the legend names layers, not the reference lines
    for index, s in layers:
        e_1 = np.array(s.e_1)  # (kh + kw,) vertical then horizontal frequencies
        curves = [e_1[:kh], e_1[kh:]] + ([np.array(s.e_0)] if s.e_0 is not None else [])
        # A layer without energy has no profile: NaN draws nothing, and its legend entry says why.
        label = _layer_label(index, s) + ("" if s.share_defined else " (all zero: undefined)")
        for ax, curve in zip(axes, curves, strict=True):
            (line,) = ax.plot(curve / (curve.sum() or np.nan), marker="o", color=cmap(depth(index)), label=label)
        handles.append(line)
    titles = ["vertical frequency (e_1, rows)", "horizontal frequency (e_1, columns)", "both directions (e_0)"]
    for ax, title, n in zip(axes, titles, (kh, kw, kh), strict=False):
        ax.axhline(1 / n, color="black", linewidth=1, linestyle=":")  # a flat profile: no preference
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("frequency index (0 = constant)")
        ax.set_xticks(range(n))
    axes[0].set_ylabel("share of the curve's sum (sums to 1)\ndotted: a flat profile")
    # A legend names a few layers; for many, a depth colour bar is the only readable key.
    if len(layers) <= MAX_LEGEND_ENTRIES:
        fig.legend(handles=handles, loc="outside right center", title="layer")
    else:
        key = fig.colorbar(ScalarMappable(depth, cmap), ax=axes, label="layer depth (input → output)")
        key.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(
        f"Frequency profile of each {kh}x{kw} layer: the square root of each basis vector's energy, summed over the other direction"
        , fontsize=10
    )
    save_figure(fig, path)


class ChannelGrid(NamedTuple):
    """Per-kernel values laid out as a (rows, cols, ...) grid, with tick labels and axis names."""

    values: np.ndarray  # (rows, cols, ...), NaN where a wrapped grid has no kernel
    col_labels: list[int]
    row_labels: list[int]
    xlabel: str
    ylabel: str


def _channel_grid(per_kernel: np.ndarray) -> ChannelGrid:
    """Output channels down, input channels across, the first `MAX_CHANNELS_SHOWN` of each.

    A layer with one input channel per group (depthwise, or a first layer on grey images) would
    be a single column, so its output channels wrap into rows of `MAX_CHANNELS_SHOWN` instead.
    """
    out_ch, in_ch = per_kernel.shape[:2]
    n = MAX_CHANNELS_SHOWN
    if in_ch > 1:
        values = per_kernel[:n, :n]  # (≤n, ≤n, ...)
        rows, cols = values.shape[:2]
        return ChannelGrid(
            values,
            list(range(cols)),
            list(range(rows)),
            f"input channel ({_shown(in_ch, n)})",
            f"output channel ({_shown(out_ch, n)})",
        )
    count = min(out_ch, n * n)
    cols = min(n, math.ceil(math.sqrt(count)))  # near-square, at most n wide
    rows = math.ceil(count / cols)
    flat = np.full((rows * cols, *per_kernel.shape[2:]), np.nan)  # (rows*cols, ...)
    flat[:count] = per_kernel[:count, 0]
    return ChannelGrid(
        flat.reshape(rows, cols, *per_kernel.shape[2:]),  # (rows, cols, ...)
        list(range(cols)),
        [r * cols for r in range(rows)],
        "output channel (+ column)",
        f"output channel (row start; {_shown(out_ch, n * n)})",
    )


def _shown(count: int, limit: int) -> str:
    return f"first {limit} of {count}" if count > limit else f"all {count}"


def _draw_tiles(grid: ChannelGrid, title: str, colorbar: str | None) -> Figure:
    """A (rows, cols, h, w) grid as one image of tiles, red positive, blue negative, white zero.

    One image with one-pixel dark gaps draws far faster than an axes per tile.
    """
    from matplotlib import colormaps

    rows, cols, h, w = grid.values.shape
    padded = np.full((rows, cols, h + 1, w + 1), np.nan)  # (rows, cols, h+1, w+1), NaN = gap
    padded[:, :, :h, :w] = grid.values
    image = padded.transpose(0, 2, 1, 3).reshape(rows * (h + 1), cols * (w + 1))[:-1, :-1]
    limit = float(np.nanmax(np.abs(image))) or 1.0
    inches_per_pixel = min(0.12, 9.0 / max(image.shape))
    fig = new_figure(2.2 + inches_per_pixel * image.shape[1], 1.4 + inches_per_pixel * image.shape[0])
    ax = fig.add_subplot()
    cmap = colormaps["RdBu_r"].with_extremes(bad="0.3")
    shown = ax.imshow(image, cmap=cmap, vmin=-limit, vmax=limit, interpolation="nearest")
    if colorbar is not None:
        fig.colorbar(shown, ax=ax, label=colorbar, shrink=0.8)
    ax.set_xticks([c * (w + 1) + (w - 1) / 2 for c in range(cols)], grid.col_labels)
    ax.set_yticks([r * (h + 1) + (h - 1) / 2 for r in range(rows)], grid.row_labels)
    ax.tick_params(length=0)
    ax.set_xlabel(grid.xlabel)
    ax.set_ylabel(grid.ylabel)
    ax.set_title(title)
    return fig


def draw_basis(basis: np.ndarray, path: Path) -> None:
    """The DCT-II basis vectors of a `(kh, kw)` kernel, each at its (vertical, horizontal) place.

    `basis` is (kh, kw, kh, kw): `basis[a, b]` is the vector of vertical frequency a, horizontal b.
    """
    kh, kw = basis.shape[2:]
    grid = ChannelGrid(
        basis, list(range(kw)), list(range(kh)), "horizontal frequency (low → high)", "vertical frequency (low → high)"
    )
    save_figure(_draw_tiles(grid, f"DCT-II basis of a {kh}x{kw} kernel", None), path)


def draw_kernels(name: str, weight: np.ndarray, path: Path) -> None:
    """The spatial kernels of one layer, (O, I/groups, kh, kw), one tile per (output, input) pair."""
    kh, kw = weight.shape[2:]
    grid = _channel_grid(weight)  # (rows, cols, kh, kw)
    save_figure(_draw_tiles(grid, f"{kh}x{kw} kernels of {name}", "kernel weight"), path)


def draw_kernel_saliency(
    names: list[str],
    scores: list[np.ndarray],
    zeroed: list[np.ndarray],
    pct: float,
    total: tuple[int, int],
    already_zero: list[np.ndarray],
    prune_pct: float,
    path: Path,
) -> None:
    """The saliency (docs/method.md §1) of every kernel of each spatial layer, (O, I/groups) per layer,
    laid out like `draw_kernels`, one panel per layer on one logarithmic colour scale (prune ranks
    all layers together), with a red cross on each of the `pct` % least salient kernels still
    non-zero (`zeroed`); `total` is (crossed, non-zero) kernels in the model, `already_zero` the
    masks of the kernels that are zero (a pruned model's), `prune_pct` the `prune --pct` that zeroes
    both. Panel titles count per layer: crossed of non-zero, and the zero ones."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    grids = [_channel_grid(s) for s in scores]  # (rows, cols) each
    marks = [_channel_grid(z.astype(float)).values for z in zeroed]  # (rows, cols), 1 where zeroed
    positive = np.concatenate([s[s > 0] for s in scores] or [np.ones(1)])
    norm = LogNorm(vmin=float(positive.min()) if positive.size else 1e-12, vmax=float(positive.max()) if positive.size else 1.0)
    n = len(grids)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    from matplotlib.figure import Figure

    width, height = 1.5 + 3.0 * cols, 1.0 + 2.9 * rows
    # Fixed margins: a constrained layout of many panels costs more than drawing them.
    fig = Figure(figsize=(width, height))
    margins = {"left": 0.5 / width, "right": 1 - 1.4 / width, "top": 1 - 0.7 / height, "bottom": 0.3 / height}
    axes = np.array(fig.subplots(rows, cols, squeeze=False, gridspec_kw={**margins, "wspace": 0.25, "hspace": 0.35})).flatten()
    cmap = colormaps["viridis"].with_extremes(bad="white", under="black")
    shown = None
    for ax, name, grid, mark, z, dead in zip(axes, names, grids, marks, zeroed, already_zero, strict=False):
        values = np.where(np.isnan(grid.values) | (grid.values > 0), grid.values, norm.vmin / 2)  # 0 -> under: black
        shown = ax.imshow(values, cmap=cmap, norm=norm, interpolation="nearest")
        r, c = np.nonzero(mark == 1)
        ax.scatter(c, r, marker="x", color="red", s=max(4.0, 300 / max(grid.values.shape)), linewidths=1.0)
        zero = f", {int(dead.sum())} zero" if dead.any() else ""
        ax.set_title(f"{name}: {int(z.sum())} of {int((~dead).sum())} non-zero crossed{zero}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(grid.xlabel, fontsize=7)
        ax.set_ylabel(grid.ylabel, fontsize=7)
    for ax in axes[n:]:
        ax.set_axis_off()
    if shown is not None:
        key = fig.add_axes((1 - 1.0 / width, 0.2, 0.15 / width, 0.6))
        fig.colorbar(shown, cax=key, label="saliency  Σ|W · ∂L/∂W|  (log scale; black: 0)")
    fig.suptitle(
        f"Saliency of each kernel, layer by layer; red crosses: the {pct:g} % least salient of the kernels still "
        f"non-zero over all layers,\n{total[0]:,} of {total[1]:,}, which `explainfix prune --pct {prune_pct:.4g}` would zero"
        + (f" with the {sum(int(d.sum()) for d in already_zero):,} already zero (black)" if any(d.any() for d in already_zero) else ""),
        fontsize=10,
    )
    save_figure(fig, path)


def _displayable(image: np.ndarray) -> np.ndarray:
    """A (C, H, W) input as an (H, W) or (H, W, 3) array in [0, 1] for imshow."""
    image = image if image.shape[0] == 3 else image.mean(axis=0, keepdims=True)  # (3 or 1, H, W)
    low, high = image.min(), image.max()
    image = (image - low) / (high - low) if high > low else np.zeros_like(image)
    image = image.transpose(1, 2, 0)  # (H, W, 3 or 1)
    return image if image.shape[2] == 3 else image[:, :, 0]  # (H, W, 3) or (H, W)


def draw_attributions(
    images: np.ndarray, attributions: np.ndarray, captions: list[str], correct: list[bool | None], method: str, path: Path
) -> None:
    """Inputs and the magnitude of their attribution overlaid on them, both (n, C, H, W), in a
    grid that wraps after `ATTRIBUTION_COLUMNS` inputs: per input the image above its map, under
    a title with the true target and the prediction (green when right, red when wrong)."""
    heat = np.abs(attributions).sum(axis=1)  # (n, H, W)
    n = len(images)
    cols = min(n, ATTRIBUTION_COLUMNS)
    rows = math.ceil(n / cols)
    # long lists of label names wrap to the column's width
    captions = ["\n".join(textwrap.fill(line, 24) for line in c.split("\n")) for c in captions]
    lines = max(c.count("\n") + 1 for c in captions)
    fig = new_figure(1.6 + 1.7 * cols, (3.2 + 0.14 * lines) * rows + 0.4)
    axes = np.array(fig.subplots(2 * rows, cols, squeeze=False))  # (2 * rows, cols) of Axes
    colours = {True: "tab:green", False: "tab:red", None: "black"}
    for k in range(rows * cols):
        top, bottom = axes[2 * (k // cols), k % cols], axes[2 * (k // cols) + 1, k % cols]
        if k >= n:
            top.set_axis_off()
            bottom.set_axis_off()
            continue
        picture = _displayable(images[k])
        scale = float(heat[k].max()) or 1.0
        top.imshow(picture, cmap="gray", interpolation="nearest")
        top.set_title(captions[k], fontsize=8, color=colours[correct[k]])
        # Colour under the heat map would mix with it: the overlay shows the input in grey.
        grey = picture.mean(axis=2) if picture.ndim == 3 else picture  # (H, W)
        bottom.imshow(grey, cmap="gray", interpolation="nearest")
        shown = bottom.imshow(heat[k] / scale, cmap="inferno", alpha=0.6, vmin=0, vmax=1, interpolation="nearest")
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    for r in range(rows):
        axes[2 * r, 0].set_ylabel("input")
        axes[2 * r + 1, 0].set_ylabel(f"{method}\n(overlaid)")
    fig.colorbar(shown, ax=axes, label="attribution (share of the input's max)", shrink=0.5 if rows > 1 else 0.9)
    fig.suptitle("Which input pixels drive the target output")
    save_figure(fig, path)
