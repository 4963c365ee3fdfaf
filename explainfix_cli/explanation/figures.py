"""Figures of an explanation (METHOD.md §5), drawn headless with matplotlib.

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
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, get_args

import numpy as np

from explainfix_cli.choices import FigureFormat
from explainfix_cli.dct import frequency_order
from explainfix_cli.explanation.spectra import LayerSpectra

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FORMATS: tuple[str, ...] = get_args(FigureFormat)
Draw = Callable[[Path], None]  # draws one figure into the given file
MAX_CHANNELS_SHOWN = 16  # a kernel grid larger than 16 x 16 is unreadable on a page
MAX_LEGEND_ENTRIES = 8


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Figure, path: Path) -> None:
    import matplotlib

    # Dates and random ids would make two runs' files differ; PRODUCT.md wants identical bytes.
    metadata = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}.get(path.suffix[1:])
    with matplotlib.rc_context({"svg.hashsalt": "explainfix"}):
        fig.savefig(path, dpi=150, metadata=metadata)


_pending: Sequence[tuple[Draw, Path]] = ()  # the jobs of `draw_all`, inherited by its forked workers


def _draw_pending(index: int) -> None:
    draw, path = _pending[index]
    draw(path)


def draw_all(jobs: Sequence[tuple[Draw, Path]]) -> None:
    """Draw independent figures, each `draw(path)`, in forked worker processes where possible.

    A figure is a few hundred milliseconds of single-threaded matplotlib work, the same whatever
    the data, so a report's figures take about 1/cores of the time in parallel. Forked workers
    inherit the jobs, matplotlib and the arrays (nothing is pickled); where fork is unsafe (macOS),
    in a daemon process, or on one core, they are drawn in turn. A worker's exception is raised here.
    """
    global _pending
    workers = min(len(jobs), os.cpu_count() or 1)
    forkable = sys.platform != "darwin" and "fork" in multiprocessing.get_all_start_methods()
    if workers < 2 or not forkable or multiprocessing.current_process().daemon:  # a daemon may not have children
        for draw, path in jobs:
            draw(path)
        return
    # imported once here, not once per worker
    import matplotlib.backends.backend_agg
    import matplotlib.figure  # noqa: F401

    _pending = jobs
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            list(pool.map(_draw_pending, range(len(jobs))))
    finally:
        _pending = ()


def _layer_label(index: int, spectra: LayerSpectra) -> str:
    return f"{index}: {spectra.name}"


def _basis_labels(kh: int, kw: int) -> list[str]:
    return [f"{j // kw},{j % kw}" for j in frequency_order(kh, kw)]


def draw_heatmap(layers: list[tuple[int, LayerSpectra]], path: Path, log_scale: bool = False) -> None:
    """The ExplainSteer heatmap for layers of one kernel shape, with marginal totals.

    Cells are each layer's `e_d` divided by its total, so layers of very different magnitude
    stay comparable; the right bars give the totals that normalisation hides, and the top bars
    the total of each basis vector over the layers (both in `e_d` units).
    """
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    kh, kw = layers[0][1].kernel_shape
    e_d = np.array([s.e_d for _, s in layers])  # (layers, kh*kw), low -> high frequency
    totals = e_d.sum(axis=1)  # (layers,)
    share = e_d / np.where(totals > 0, totals, 1.0)[:, None]  # (layers, kh*kw)
    n_layers, n_basis = share.shape

    cells_width = max(0.3 * n_basis, 4.5)  # inches; the margins keep a fixed width beside it
    fig = _figure(cells_width + 4.5, min(3.2 + 0.28 * n_layers, 30.0))
    grid = fig.add_gridspec(2, 3, width_ratios=[cells_width, 1.6, 0.15], height_ratios=[1, 4])
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
        else Normalize(vmin=0.0, vmax=max(float(share.max()), 1e-12))
    )
    image = ax.imshow(share, aspect="auto", cmap="magma", norm=norm, interpolation="nearest")
    fig.colorbar(image, cax=bar, label="share of the layer's energy")
    ax.set_xticks(range(n_basis), _basis_labels(kh, kw), rotation=90 if n_basis > 9 else 0)
    ax.set_xlabel("DCT-II basis vector (vertical, horizontal frequency)\nfrequency (low → high)")
    ax.set_yticks(range(n_layers), [_layer_label(i, s) for i, s in layers])
    ax.set_ylabel("layer depth (input → output)")

    top.bar(range(n_basis), e_d.sum(axis=0), color="tab:blue")
    top.set_ylabel("total over\nlayers")
    top.set_xlim(ax.get_xlim())
    top.set_xticks([])
    right.barh(range(n_layers), totals, color="tab:blue")
    right.set_xlabel("layer total")
    right.set_ylim(ax.get_ylim())
    right.set_yticks([])
    # Plain numbers on the ticks: an offset such as "1e6" collides with the axis labels.
    top.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    right.xaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    right.xaxis.set_major_locator(MaxNLocator(2))
    weighting = "saliency-weighted" if layers[0][1].saliency_weighted else "unweighted"
    fig.align_ylabels([top, ax])
    fig.suptitle(f"Which spatial frequencies each {kh}x{kw} layer uses ({weighting} e_d)")
    _save(fig, path)


def draw_curves(layers: list[tuple[int, LayerSpectra]], path: Path) -> None:
    """Per-layer `e_1` (split into its vertical and horizontal halves) and `e_0` curves."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    kh, kw = layers[0][1].kernel_shape
    square = layers[0][1].e_0 is not None
    fig = _figure(11.0 if square else 8.0, 3.6)
    axes = fig.subplots(1, 3 if square else 2)
    axes[1].sharey(axes[0])  # vertical and horizontal shares compare directly; e_0 is about twice as large
    depth = Normalize(vmin=layers[0][0], vmax=max(layers[-1][0], layers[0][0] + 1))
    cmap = colormaps["viridis"]
    for index, s in layers:
        e_1 = np.array(s.e_1)  # (kh + kw,) vertical then horizontal frequencies
        total = e_1.sum() or 1.0  # e_1 and e_0 have the same total, so one scale serves both
        curves = [e_1[:kh], e_1[kh:]] + ([np.array(s.e_0)] if s.e_0 is not None else [])
        for ax, curve in zip(axes, curves, strict=True):
            ax.plot(curve / total, marker="o", color=cmap(depth(index)), label=_layer_label(index, s))
    titles = ["e_1, vertical frequency", "e_1, horizontal frequency", "e_0, vertical + horizontal"]
    for ax, title, n in zip(axes, titles, (kh, kw, kh), strict=False):
        ax.set_title(title)
        ax.set_xlabel("frequency (low → high)")
        ax.set_xticks(range(n))
    axes[0].set_ylabel("share of the layer's total")
    axes[1].tick_params(labelleft=False)
    # A legend names a few layers; for many, a depth colour bar is the only readable key.
    if len(layers) <= MAX_LEGEND_ENTRIES:
        fig.legend(handles=axes[0].get_lines(), loc="outside right center", title="layer")
    else:
        key = fig.colorbar(ScalarMappable(depth, cmap), ax=axes, label="layer depth (input → output)")
        key.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"Frequency profile of each {kh}x{kw} layer")
    _save(fig, path)


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
    fig = _figure(2.2 + inches_per_pixel * image.shape[1], 1.4 + inches_per_pixel * image.shape[0])
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
    _save(_draw_tiles(grid, f"DCT-II basis of a {kh}x{kw} kernel", None), path)


def draw_kernels(name: str, weight: np.ndarray, path: Path) -> None:
    """The spatial kernels of one layer, (O, I/groups, kh, kw), one tile per (output, input) pair."""
    kh, kw = weight.shape[2:]
    grid = _channel_grid(weight)  # (rows, cols, kh, kw)
    _save(_draw_tiles(grid, f"{kh}x{kw} kernels of {name}", "kernel weight"), path)


def draw_kernel_saliency(name: str, kernel_weights: np.ndarray, path: Path, log_scale: bool = False) -> None:
    """The saliency weight `w_k` of every kernel of one layer, (O, I/groups), laid out like `draw_kernels`."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    grid = _channel_grid(kernel_weights)  # (rows, cols)
    rows, cols = grid.values.shape
    positive = grid.values[grid.values > 0]
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if log_scale and positive.size else None
    fig = _figure(max(5.5, 3.0 + 0.3 * cols), max(3.5, 1.6 + 0.3 * rows))
    ax = fig.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad="white")
    shown = ax.imshow(grid.values, cmap=cmap, norm=norm, interpolation="nearest")
    fig.colorbar(shown, ax=ax, label="saliency (sum of |dL/dW|)", shrink=0.8)
    ax.set_xticks(range(cols), grid.col_labels)
    ax.set_yticks(range(rows), grid.row_labels)
    ax.set_xlabel(grid.xlabel)
    ax.set_ylabel(grid.ylabel)
    ax.set_title(f"Saliency of each kernel of {name}")
    _save(fig, path)


def _displayable(image: np.ndarray) -> np.ndarray:
    """A (C, H, W) input as an (H, W) or (H, W, 3) array in [0, 1] for imshow."""
    image = image if image.shape[0] == 3 else image.mean(axis=0, keepdims=True)  # (3 or 1, H, W)
    low, high = image.min(), image.max()
    image = (image - low) / (high - low) if high > low else np.zeros_like(image)
    image = image.transpose(1, 2, 0)  # (H, W, 3 or 1)
    return image if image.shape[2] == 3 else image[:, :, 0]  # (H, W, 3) or (H, W)


def draw_attributions(images: np.ndarray, attributions: np.ndarray, captions: list[str], method: str, path: Path) -> None:
    """Inputs (top row) and the magnitude of their attribution overlaid on them (bottom row), both (n, C, H, W)."""
    heat = np.abs(attributions).sum(axis=1)  # (n, H, W)
    n = len(images)
    fig = _figure(1.0 + 2.0 * n, 4.6)
    axes = np.array(fig.subplots(2, n, squeeze=False))  # (2, n) of Axes
    for k in range(n):
        picture = _displayable(images[k])
        scale = float(heat[k].max()) or 1.0
        axes[0, k].imshow(picture, cmap="gray", interpolation="nearest")
        axes[0, k].set_title(captions[k])
        # Colour under the heat map would mix with it: the overlay shows the input in grey.
        grey = picture.mean(axis=2) if picture.ndim == 3 else picture  # (H, W)
        axes[1, k].imshow(grey, cmap="gray", interpolation="nearest")
        shown = axes[1, k].imshow(
            heat[k] / scale, cmap="inferno", alpha=0.6, vmin=0, vmax=1, interpolation="nearest"
        )
        for ax in axes[:, k]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("input")
    axes[1, 0].set_ylabel(f"{method}\n(overlaid)")
    fig.colorbar(shown, ax=axes[1, :], label="attribution\n(share of max)", shrink=0.9)
    fig.suptitle("Which input pixels drive the target output")
    _save(fig, path)
