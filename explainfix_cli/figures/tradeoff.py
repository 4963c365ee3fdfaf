"""The sweep's trade-off figure (`search.sweep`): the metric against parameters and against latency, one point per pct."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from explainfix_cli.figures.common import new_figure, save_figure


def draw_tradeoff(
    path: Path, *, pcts: np.ndarray, params: np.ndarray, metric: np.ndarray, latency_ms: np.ndarray | None, metric_name: str,
    latency_form: str = "eager",
) -> None:
    """Metric against parameters (and against latency): one labelled point per pct, the unpruned
    model starred. `params`, `metric`, `latency_ms` hold the unpruned model first, then one
    entry per pct of `pcts`. Numpy in, one figure out (like `figures.spectra`)."""
    from matplotlib.ticker import MaxNLocator, StrMethodFormatter
    from matplotlib.transforms import offset_copy

    latency_label = "latency at batch 1 (ms, median)" if latency_form == "eager" else "latency at batch 1, deployment form (ms, median)"
    panels = [(params, "parameters")] + ([(latency_ms, latency_label)] if latency_ms is not None else [])
    # fixed margins: a constrained layout would draw the figure twice, half the cost of a sweep's files
    fig = new_figure(5.2 * len(panels), 4.2, constrained=False)
    fig.subplots_adjust(left=0.14 / len(panels), right=1 - 0.04 / len(panels), bottom=0.13, top=0.86, wspace=0.08)
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]  # one metric axis, labelled once
    for ax, (x, label) in zip(axes, panels, strict=True):
        ax.axhline(metric[0], color="tab:red", linewidth=0.8, linestyle=":")
        ax.plot(x[1:], metric[1:], "o-", color="tab:blue", label="pruned, at pct")
        labels: dict[tuple[float, float], list[str]] = {}  # points at one place share a label
        for xi, yi, pct in zip(x[1:], metric[1:], pcts, strict=True):
            labels.setdefault((float(xi), float(yi)), []).append(f"{pct:g}")
        above, below = (offset_copy(ax.transData, fig=fig, x=5, y=dy, units="points") for dy in (5, -11))
        for i, ((xi, yi), names) in enumerate(sorted(labels.items())):  # alternate below / above, so neighbours do not collide
            ax.text(xi, yi, f"{', '.join(names)}%", transform=below if i % 2 else above, fontsize=8)  # a label, no arrow: cheaper than annotate
        ax.plot(x[:1], metric[:1], "*", color="tab:red", markersize=14, label="unpruned")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        ax.margins(x=0.12, y=0.08)  # room for the labels of the outermost points
        ax.xaxis.set_major_locator(MaxNLocator(5))  # six-digit parameter counts side by side would collide
        if x is params:
            ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    axes[0].set_ylabel(metric_name)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{metric_name} against {'size and speed' if len(panels) > 1 else 'size'}\none point per pct of kernels zeroed", fontsize=11)
    save_figure(fig, path)

