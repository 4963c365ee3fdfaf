"""Figures of the class-specific analysis (docs/method.md §6), from numpy arrays only.

`draw_class_channels`: the class x channel importance of the last layers, channels ordered by
the class they serve most. `draw_channels_needed`: per class, how many channels carry the
share of its importance. Same conventions as `figures.py`: the object-oriented API, no pyplot.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from explainfix_cli.figures.common import new_figure, save_figure


def preferred_order(importance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Columns of a (K, C) matrix ordered by preferred class (argmax), then by how strongly;
    returns the order and the (C,) preferred class of each column in that order."""
    preferred = importance.argmax(axis=0)  # (C,)
    strength = importance.max(axis=0)  # (C,)
    order = np.lexsort((-strength, preferred))
    return order, preferred[order]


def draw_class_channels(panels: list[tuple[str, np.ndarray]], path: Path) -> None:
    """One heatmap per layer: classes down, channels across (ordered by preferred class), each
    channel's importances divided by its largest magnitude so that its preference shows."""
    from matplotlib.colors import Normalize

    widest = max(m.shape[1] for _, m in panels)
    fig = new_figure(min(4.0 + 0.12 * widest, 18.0), 1.0 + 2.6 * len(panels))
    axes = np.atleast_1d(fig.subplots(len(panels), 1, squeeze=False)[:, 0])
    image = None
    for ax, (name, importance) in zip(axes, panels, strict=True):
        order, preferred = preferred_order(importance)
        scale = np.abs(importance).max(axis=0)  # (C,)
        cells = importance[:, order] / np.where(scale > 0, scale, 1.0)[order]  # (K, C) in [-1, 1]
        image = ax.imshow(cells, aspect="auto", cmap="RdBu_r", norm=Normalize(-1.0, 1.0), interpolation="nearest")
        for boundary in np.nonzero(np.diff(preferred))[0]:
            ax.axvline(boundary + 0.5, color="black", linewidth=0.6)
        ax.set_yticks(range(importance.shape[0]))
        ax.set_ylabel("class")
        ax.set_xlabel(f"channel of {name}, grouped by the class it serves most ({importance.shape[1]} channels)")
        ax.set_xticks([])
    assert image is not None
    fig.colorbar(image, ax=list(axes), label="importance / channel's largest |importance|")
    fig.suptitle("Which class each channel serves (gradient x activation, mean over the class's samples)")
    save_figure(fig, path)


def draw_channels_needed(layers: list[tuple[str, np.ndarray, int]], share: float, path: Path) -> None:
    """Per class, bars of the channels needed for `share` of its positive importance, one bar
    per layer (name, (K,) needed, channels in the layer), as a share of the layer's channels."""
    k = len(layers[0][1])
    fig = new_figure(max(5.0, 0.3 * k * len(layers) + 2.5), 3.6)
    ax = fig.add_subplot()
    width = 0.8 / len(layers)
    for i, (name, needed, total) in enumerate(layers):
        x = np.arange(k) + (i - (len(layers) - 1) / 2) * width
        bars = ax.bar(x, needed / total, width, label=f"{name} ({total} channels)")
        ax.bar_label(bars, [str(int(n)) for n in needed], fontsize=7)
    ax.set_xticks(range(k))
    ax.set_xlabel("class")
    ax.set_ylabel("share of the layer's channels")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"Channels needed for {share:.0%} of each class's positive importance (numbers: channels)")
    save_figure(fig, path)
