"""How much to prune: the trade-off curve from one saliency pass, and the pct that meets a target.

Scoring (docs/method.md §1) is the costly step of a prune and does not depend on the pct: §2 ranks all
kernels in one list, and `pct` only says how long a prefix of it is zeroed. `PruneCurve` scores a
model once and then prunes a fresh copy at any pct with `pruning.prune` itself (§2 zeroing, §3
channel removal, `--fill`), so each point of the curve is exactly the model `prune --pct` writes.

- `sweep`: the metric, parameters, MACs, spatial kernels and latency at a list of pcts, written as
  `sweep.json`, `sweep.csv` and a figure of metric against parameters and against latency.
- `prune_to_target`: the pct of the 1 % grid that meets `--max-drop` (the largest whose metric
  falls at most X) or `--max-params` / `--max-macs` (the smallest that fits the budget).

Size falls with pct (nearly: keeping a cut representable can give a few channels back), so a
budget is found by bisection. The metric is not monotone in pct: on the U-Net sample the Dice
drop wanders around 0.01 from pct 35 to 61 (one more zeroed kernel can fix a few pixels), and a
bisection stops at 34, far below the largest pct that keeps it (58). So `--max-drop` scans the
grid from the top down to the first pct that meets it, on the zeroed model alone (zeroing, then
at most one forward pass over the data, stopped once the metric cannot reach its floor: no
tracing, no channel removal), and confirms that pct with the real prune.
"""

from __future__ import annotations

import copy
import csv
import functools
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from torch import nn

from explainfix_cli.choices import Criterion, Fill, Granularity, LatencyForm, Removal
from explainfix_cli.errors import UserError, check_pct, check_range
from explainfix_cli.evaluation.bench import deployment_form
from explainfix_cli.evaluation.measure import median_latency_ms, metric, metric_upper_bound, model_size, outputs
from explainfix_cli.io.checkpoints import ArchSpec
from explainfix_cli.io.data import Dataset, Preprocessing
from explainfix_cli.io.outputs import atomic_dir, check_folder_target, check_target
from explainfix_cli.models import model_output, spatial_convs
from explainfix_cli.numbers import finite
from explainfix_cli.pruning.channels import (
    ChannelRemoval,
    has_dead_weights,
    remove_dead_channels,
    remove_least_salient_channels,
)
from explainfix_cli.pruning.pipeline import PruneReport, prune, save_pruned, zero_least_salient
from explainfix_cli.saliency import spatial_saliency
from explainfix_cli.search.notes import params_removed, target_note

GRID = list(range(100))  # the 1 % grid of pcts a target is searched on
PATIENCE = 5  # grid steps past the last point that met a target before the search gives up
LATENCY_WARMUP = 3
SWEEP_FILES = ("sweep.json", "sweep.csv")
DROP_TOLERANCE = 1e-9  # a metric drop of exactly X (e.g. 0.9944 - 0.9844) meets --max-drop X
BOUND_MARGIN = 1e-6  # a float32 metric may round above the exact bound


class PruneCurve:
    """A model scored once (§1) and pruned on demand at any pct, each time a fresh copy (§2-3).

    The model itself is left unchanged. `reference` holds its outputs on the data (from the
    saliency pass's own forwards), so no prune needs to run the unpruned model again.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Dataset | None,
        *,
        criterion: Criterion = "gradient",
        scores: dict[str, torch.Tensor] | None = None,
        granularity: Granularity = "kernel",
        fill: Fill = "zero",
        removal: Removal = "exact",
        seed: int = 0,
        device: str = "cpu",
        sample_shape: tuple[int, ...] | None = None,
        min_kernels_per_layer: int = 0,
    ):
        if data is not None:
            sample_shape = tuple(data.x.shape[1:])
        if sample_shape is None:
            raise UserError("without data, give the `input_size` (C, H, W) to trace the model and count MACs.")
        self.model, self.data, self.device, self.sample_shape = model.eval().to(device), data, device, sample_shape
        self.options: dict[str, Any] = {
            "criterion": criterion, "granularity": granularity, "fill": fill, "removal": removal, "seed": seed, "min_kernels_per_layer": min_kernels_per_layer,
        }  # fmt: skip
        seen: list[torch.Tensor] = []
        self.scores = scores if scores is not None else spatial_saliency(model, data, criterion, device, outputs=seen)
        self.reference = None if data is None else torch.cat(seen) if seen else outputs(model, data, device)
        self.size = model_size(model, sample_shape)
        self.metric = None if self.reference is None or data is None else finite(metric(data, self.reference))
        self._zeroed: nn.Module | None = None  # a copy for `zeroed_metric`, and its spatial weights unzeroed
        self._weights: dict[str, torch.Tensor] = {}

    def prune(self, pct: float, **write: Any) -> tuple[nn.Module, PruneReport]:
        """`pruning.prune` on a copy at `pct`; `write` takes its writing options (out, fix, arch, ...)."""
        write.setdefault("fix", False)
        return prune(
            copy.deepcopy(self.model), self.data, pct=pct, scores=self.scores, device=self.device,
            sample_shape=self.sample_shape, reference_outputs=self.reference, **self.options, **write,
        )  # fmt: skip

    def point(self, pct: float) -> tuple[nn.Module, Point]:
        """A copy pruned at `pct` (§2 zeroing and §3 removal, no fill, filters left as they are)
        and its measurements, for one forward pass over the data where `prune` makes two (the
        zeroed model, and the removed one to compare with it). Exact removal needs no
        data (its constants follow from the structure) and does not change what the zeroed model
        computes (`prune` checks it and reports the difference, float rounding), so the metric is
        measured after the cut, on the smaller model. Calibrated removal measures the zeroed
        model's outputs on the data anyway, and does not change them there."""
        assert self.data is not None
        model = copy.deepcopy(self.model)
        example = self.data.x[:1].to(self.device)
        zeroed, removal = 0, self.options["removal"]
        if self.options["granularity"] == "kernel":
            masks = zero_least_salient(model, self.scores, pct, self.options["min_kernels_per_layer"])
            zeroed = sum(int(m.sum()) for m in masks.values())
            if removal == "exact" and not has_dead_weights(model):  # nothing can leave: no trace needed
                removed = ChannelRemoval()
            else:
                removed = remove_dead_channels(model, example, None if removal == "exact" else self.data, self.device, removal)
        else:
            removed = remove_least_salient_channels(model, example, self.scores, pct)
        calibrated = self.options["granularity"] == "kernel" and removal == "calibrated"
        unchanged = zeroed == 0 and removed.removed == 0  # pct 0 on a model with nothing to remove: the model itself
        if unchanged and self.reference is not None:
            out = self.reference
        elif calibrated and removed.outputs_before is not None:
            out = removed.outputs_before
        else:
            out = outputs(model, self.data, self.device)
        size = self.size if unchanged else model_size(model, self.sample_shape)
        measured = finite(metric(self.data, out))
        return model, Point(
            pct=pct, params=size.params, macs=size.macs, spatial_kernels=size.spatial_kernels,
            nonzero_spatial_kernels=size.spatial_kernels - size.zero_kernels, zeroed_kernels=zeroed, channels_removed=removed.removed,
            metric=measured, metric_drop=None if measured is None or self.metric is None else self.metric - measured,
        )  # fmt: skip

    def zeroed_metric(self, pct: float, lowest: float = -math.inf) -> float | None:
        """The metric of the model with only §2's zeroing at `pct`, no channel removal: to float
        rounding what `prune` writes with exact removal and no fill (removal does not change the
        outputs), for one forward pass over the data. The pass stops early, returning None,
        once the metric cannot reach `lowest` any more (`measure.metric_upper_bound`)."""
        assert self.data is not None
        if self._zeroed is None:
            self._zeroed = copy.deepcopy(self.model)
            self._weights = {name: conv.weight.detach().clone() for name, conv in spatial_convs(self._zeroed)}
        with torch.no_grad():
            for name, conv in spatial_convs(self._zeroed):
                conv.weight.copy_(self._weights[name])
        zero_least_salient(self._zeroed, self.scores, pct, self.options["min_kernels_per_layer"])
        seen: list[torch.Tensor] = []
        with torch.no_grad():
            for x, _ in self.data:
                seen.append(model_output(self._zeroed, x.to(self.device)).cpu())
                if metric_upper_bound(self.data, torch.cat(seen)) < lowest - BOUND_MARGIN:
                    return None
        return finite(metric(self.data, torch.cat(seen)))


# ---- the sweep ----------------------------------------------------------------------------------
@dataclass
class Point:
    """One model on the curve: the unpruned model (pct None) or the pruned one at `pct`."""

    pct: float | None
    params: int
    macs: int
    spatial_kernels: int  # in the model, zeroed ones included
    nonzero_spatial_kernels: int
    zeroed_kernels: int
    channels_removed: int
    metric: float | None
    metric_drop: float | None  # unpruned metric minus this one
    latency_ms: float | None = None  # median over repeats, batch 1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SweepResult:
    """What `sweep` measured and wrote. `curve_json()` is `sweep.json`: with latency off
    (`latency_repeats=0`) identical across runs; latency is a measurement and varies."""

    metric: str | None
    baseline: Point
    points: list[Point]
    settings: dict[str, Any]
    out: str | None = None
    files: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # by stage: saliency, points, latency, files

    def curve_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "baseline": self.baseline.to_json(), "points": [p.to_json() for p in self.points], "settings": self.settings}

    def to_json(self) -> dict[str, Any]:
        return {**self.curve_json(), "out": self.out, "files": self.files, "seconds": self.seconds}

    def csv_text(self) -> str:
        columns = ["model", *Point.__dataclass_fields__]
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(columns)
        for name, point in [("unpruned", self.baseline), *(("pruned", p) for p in self.points)]:
            writer.writerow([name, *("" if v is None else v for v in point.to_json().values())])
        return text.getvalue()


def sweep(
    model: nn.Module,
    data: Dataset,
    pcts: Sequence[float],
    *,
    out_dir: str | Path | None = None,
    criterion: Criterion = "gradient",
    scores: dict[str, torch.Tensor] | None = None,
    granularity: Granularity = "kernel",
    removal: Removal = "exact",
    latency_repeats: int = 30,
    latency_form: LatencyForm = "eager",
    fmt: str = "png",
    force: bool = False,
    device: str = "cpu",
    adapt: Callable[[nn.Module], Any] | None = None,
) -> SweepResult:
    """The metric / parameters / MACs / spatial kernels / latency trade-off at each pct, from one
    saliency pass (docs/method.md §1, then §2-3 per pct on a copy); written into `out_dir` if given.

    `adapt(model)` changes each pruned model in place before it is measured (its return value is
    ignored): the place for a short fine-tune of every point, e.g.
    `adapt=lambda m: finetune(m, train, val, recipe=Recipe(epochs=2))` (`training.finetune`),
    so the curve shows what a user would get. Points come unfixed (spatial filters
    trainable); fix them in `adapt` to train only the rest, as the paper does.
    `latency_repeats=0` skips latency (then the files are identical across runs). Latency is of
    the model as written (`latency_form="eager"`) or of its deployment form (batch norms folded,
    channels-last: `bench.deployment_form`), what an inference runtime would run.
    """
    start = time.perf_counter()
    pcts = sorted({float(p) for p in pcts})
    if not pcts:
        raise UserError("`pcts` must name at least one pct.")
    for p in pcts:
        check_pct("pcts", p)
    if latency_repeats < 0:
        raise UserError(f"`latency_repeats` must be 0 (no latency) or more, not {latency_repeats}.")
    if latency_form not in get_args(LatencyForm):
        raise UserError(f"`latency_form` must be one of {', '.join(get_args(LatencyForm))}, not {latency_form!r}.")
    figure = f"sweep.{fmt}"
    if out_dir is not None:
        check_folder_target(Path(out_dir), force)
        for name in (*SWEEP_FILES, figure):  # found before the work, not half-way through writing
            if (Path(out_dir) / name).is_dir():
                raise UserError(f"{Path(out_dir) / name} is a folder where the sweep writes a file; move it away first.")
    if data is None:
        raise UserError("a sweep measures the metric at each pct, so it needs `data`.")
    seconds: dict[str, float] = {}
    curve = PruneCurve(model, data, criterion=criterion, scores=scores, granularity=granularity, removal=removal, device=device)
    seconds["saliency"] = time.perf_counter() - start

    models, points = [curve.model], []
    for pct in pcts:
        pruned, point = curve.point(pct)
        if adapt is not None:
            adapt(pruned)
            point.metric = finite(metric(data, outputs(pruned, data, device)))
            point.metric_drop = None if point.metric is None or curve.metric is None else curve.metric - point.metric
        models.append(pruned)
        points.append(point)
    seconds["points"] = time.perf_counter() - start - seconds["saliency"]

    baseline = Point(
        pct=None, params=curve.size.params, macs=curve.size.macs, spatial_kernels=curve.size.spatial_kernels,
        nonzero_spatial_kernels=curve.size.spatial_kernels - curve.size.zero_kernels, zeroed_kernels=0, channels_removed=0,
        metric=curve.metric, metric_drop=0.0 if curve.metric is not None else None,
    )  # fmt: skip
    unfolded: list[str] = []  # deployment form: why batch norms stayed, per model timed
    if latency_repeats:  # timed once per architecture: zeroed kernels are still multiplied (pct 0 and 50 often share one)
        first = {_shapes(m): i for i, m in reversed(list(enumerate(models)))}
        timed_models, x = [models[i] for i in first.values()], data.x[:1].to(device)
        if latency_form == "deployment":
            deployed = [deployment_form(m) for m in timed_models]
            unfolded = sorted({d.note for d in deployed if d.note})
            timed_models, x = [d.model for d in deployed], x.contiguous(memory_format=torch.channels_last)
        timed = dict(zip(first.values(), median_latency_ms(timed_models, x, latency_repeats, LATENCY_WARMUP), strict=True))
        for model, point in zip(models, [baseline, *points], strict=True):
            point.latency_ms = round(timed[first[_shapes(model)]], 4)
    seconds["latency"] = time.perf_counter() - start - seconds["saliency"] - seconds["points"]

    settings = {
        "pcts": pcts, "criterion": criterion, "granularity": granularity, "removal": removal, "samples": data.num_samples,
        "latency": {
            "batch": 1, "repeats": latency_repeats, "warmup": LATENCY_WARMUP, "threads": torch.get_num_threads(), "device": device,
            "form": latency_form, "note": "; ".join(unfolded) or None,
        },
    }  # fmt: skip
    result = SweepResult(data.metric_name, baseline, points, settings)
    if out_dir is not None:
        _write(result, Path(out_dir), figure, force)
    seconds["files"] = time.perf_counter() - start - sum(seconds.values())
    result.seconds = {k: round(v, 3) for k, v in seconds.items()}
    return result


def _shapes(model: nn.Module) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The architecture as far as a dense forward's cost goes: every tensor's name and shape."""
    return tuple((name, tuple(t.shape)) for name, t in [*model.named_parameters(), *model.named_buffers()])




def _write(result: SweepResult, out_dir: Path, figure: str, force: bool) -> None:
    with atomic_dir(out_dir, force) as stage:
        paths = {name: stage / name for name in (*SWEEP_FILES, figure)}
        paths["sweep.json"].write_text(json.dumps(result.curve_json(), indent=2, allow_nan=False) + "\n")
        paths["sweep.csv"].write_text(result.csv_text())
        points, base = result.points, result.baseline
        latency = None if base.latency_ms is None else np.array([base.latency_ms, *(p.latency_ms for p in points)], dtype=float)
        draw_tradeoff(
            paths[figure],
            pcts=np.array([p.pct for p in points], dtype=float),
            params=np.array([base.params, *(p.params for p in points)], dtype=float),
            metric=np.array([_nan(base.metric), *(_nan(p.metric) for p in points)], dtype=float),
            latency_ms=latency,
            metric_name=result.metric or "metric",
            latency_form=result.settings["latency"]["form"],
        )
    result.out = str(out_dir)
    result.files = [str(out_dir / name) for name in (*SWEEP_FILES, figure)]


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def draw_tradeoff(
    path: Path, *, pcts: np.ndarray, params: np.ndarray, metric: np.ndarray, latency_ms: np.ndarray | None, metric_name: str,
    latency_form: str = "eager",
) -> None:
    """Metric against parameters (and against latency): one labelled point per pct, the unpruned
    model starred. `params`, `metric`, `latency_ms` hold the unpruned model first, then one
    entry per pct of `pcts`. Numpy in, one figure out (like `explain.figures`)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, StrMethodFormatter
    from matplotlib.transforms import offset_copy

    from explainfix_cli.figures.common import save_figure

    latency_label = "latency at batch 1 (ms, median)" if latency_form == "eager" else "latency at batch 1, deployment form (ms, median)"
    panels = [(params, "parameters")] + ([(latency_ms, latency_label)] if latency_ms is not None else [])
    # fixed margins: a constrained layout would draw the figure twice, half the cost of a sweep's files
    fig = Figure(figsize=(5.2 * len(panels), 4.2))
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


# ---- a target instead of a pct ------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """`--max-drop` (metric on the data falls at most this), `--max-params`, `--max-macs`."""

    max_drop: float | None = None
    max_params: int | None = None
    max_macs: int | None = None

    def __post_init__(self) -> None:
        check_range("max_drop", self.max_drop, 0, 1)
        check_range("max_params", self.max_params, 1)
        check_range("max_macs", self.max_macs, 1)

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.max_drop, self.max_params, self.max_macs))

    def keeps_metric(self, report: PruneReport) -> bool:
        return self.drop_ok(report.metric_before, report.metric_after)

    def drop_ok(self, before: float | None, after: float | None) -> bool:
        if self.max_drop is None:
            return True
        return before is not None and after is not None and before - after <= self.max_drop + DROP_TOLERANCE

    def fits(self, report: PruneReport) -> bool:
        return (self.max_params is None or report.params_after <= self.max_params) and (self.max_macs is None or report.macs_after <= self.max_macs)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class TargetNotMet(Exception):
    """No pct meets the target: a correct request that cannot be satisfied (exit code 1)."""


@dataclass
class TargetReport:
    """`prune` to a target: the written model's report, the target, the pct chosen and every probe.

    With `adapt` (a fine-tune of every probe), `finetune` is the step `adapt` returned for the
    written model (`FinetuneReport.history_step()` from the command line), and the report's
    `metric_after` / `val_metric_after` are the adapted model's."""

    report: PruneReport
    target: Target
    pct_chosen: float
    probes: list[dict[str, Any]]  # in the order measured; model "zeroed" (scan), "pruned" or "adapted"
    seconds: float
    finetune: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            **self.report.to_json(), "target": self.target.to_json(), "pct_chosen": self.pct_chosen, "probes": self.probes,
            "seconds": self.seconds, "finetune": self.finetune, "params_removed": params_removed(self.report),
            "note": target_note(self.report, self.target.max_drop, self.finetune is not None),
        }  # fmt: skip


def last_meeting(grid: Sequence[int], meets: Callable[[int], bool], patience: int = PATIENCE) -> int | None:
    """The last grid point that meets a condition which holds at the start of the grid and stops
    holding somewhere along it, nearly monotonically (None if the first point fails).

    Bisection finds a boundary (a point that meets, the next one fails) in about log2(len) probes.
    A size is not quite monotone in pct (keeping a cut representable can give a few channels
    back), so the scan goes on past the boundary until `patience` points in a row fail, and
    returns the last point that met. The answer was evaluated and meets; it is the last such point
    of the grid unless the condition comes back after `patience` failures in a row
    (benchmarks/target_search.py compares with a full scan). Each point is evaluated at most once
    (the scan past the boundary can reach a point the bisection already tried).
    """
    meets = functools.cache(meets)
    if not meets(grid[0]):
        return None
    if meets(grid[-1]):
        return grid[-1]
    lo, hi = 0, len(grid) - 1  # meets(grid[lo]) and not meets(grid[hi])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if meets(grid[mid]) else (lo, mid)
    best, failures = lo, 1
    for i in range(hi + 1, len(grid)):
        if failures >= patience:
            break
        best, failures = (i, 0) if meets(grid[i]) else (best, failures + 1)
    return grid[best]


def prune_to_target(
    model: nn.Module,
    data: Dataset | None,
    target: Target,
    *,
    criterion: Criterion = "gradient",
    scores: dict[str, torch.Tensor] | None = None,
    granularity: Granularity = "kernel",
    fill: Fill = "zero",
    removal: Removal = "exact",
    fix: bool = True,
    arch: ArchSpec | None = None,
    history: list[dict[str, Any]] | None = None,
    out: str | Path | None = None,
    force: bool = False,
    seed: int = 0,
    device: str = "cpu",
    sample_shape: tuple[int, ...] | None = None,
    val: Dataset | None = None,
    preprocessing: Preprocessing | None = None,
    min_kernels_per_layer: int = 0,
    adapt: Callable[[nn.Module], dict[str, Any] | None] | None = None,
) -> TargetReport:
    """`pruning.prune` at the pct that meets `target`, found on the 1 % grid of one ranking (§2).

    - `max_drop` alone: the largest pct whose metric on the data is at most `max_drop` below the
      unpruned model's (the smallest model that keeps the metric);
    - `max_params` / `max_macs` alone: the smallest pct whose model fits (the most accurate model
      within the budget), since size falls as pct grows;
    - both: the largest pct that keeps the metric, which must also fit (else no pct meets both).

    One saliency pass. A budget is found by bisection (`last_meeting`), each probe a prune of a
    copy (`PruneCurve.prune`). The metric is scanned from pct 99 down on the zeroed model
    (`PruneCurve.zeroed_metric`) and the first pct that keeps it is confirmed by a prune; with
    exact removal and no fill that is the largest pct of the grid that keeps the metric. With
    `fill` or aggressive removal the written model differs from the zeroed one, and the answer
    is the largest pct at which both keep it. The chosen pct is pruned once more and written
    (with `val` and `preprocessing`, which the search does not use). Raises `TargetNotMet` when no
    pct of the grid meets the target.

    `adapt(model)` (a short fine-tune, from the command line `--finetune-epochs K`) changes each
    probe in place and returns a step for the written file's history: the target is then met
    after adapting (`_adapted_search`). `adapt` must never lower the metric on `data` (a
    fine-tune that validates on `data` and keeps the model as given when no epoch beats it).
    """
    start = time.perf_counter()
    if not target.given:
        raise UserError("give a target: `max_drop`, `max_params` or `max_macs`.")
    if target.max_drop is not None and data is None:
        raise UserError("`max_drop` needs `data` to measure the metric on.")
    if out is not None:
        check_target(Path(out), force)
    curve = PruneCurve(
        model, data, criterion=criterion, scores=scores, granularity=granularity, fill=fill, removal=removal, seed=seed,
        device=device, sample_shape=sample_shape, min_kernels_per_layer=min_kernels_per_layer,
    )  # fmt: skip
    if target.max_drop is not None and granularity != "kernel":
        raise UserError("`max_drop` is searched along the kernel ranking; use kernel `granularity`, or `max_params` / `max_macs` with channel granularity.")
    if target.max_drop is not None and curve.metric is None:
        raise UserError(f"the {data.metric_name if data else 'metric'} is not defined on this data (e.g. a class with one kind of label only), so a drop cannot be measured.")
    probes: dict[int, PruneReport] = {}
    trail: list[dict[str, Any]] = []

    def probe(pct: int) -> PruneReport:
        if pct not in probes:
            r = probes[pct] = curve.prune(pct)[1]
            trail.append({"pct": pct, "model": "pruned", "params": r.params_after, "macs": r.macs_after, "metric": finite(r.metric_after), "meets": target.keeps_metric(r) and target.fits(r)})
        return probes[pct]

    def scan(pct: int) -> bool:
        assert curve.metric is not None and target.max_drop is not None
        zeroed = curve.zeroed_metric(pct, lowest=curve.metric - target.max_drop - DROP_TOLERANCE)  # None: stopped, cannot meet
        trail.append({"pct": pct, "model": "zeroed", "params": None, "macs": None, "metric": zeroed, "meets": target.drop_ok(curve.metric, zeroed)})
        return target.drop_ok(curve.metric, zeroed)

    if target.max_drop is not None:
        chosen = next((p for p in reversed(GRID) if scan(p) and target.keeps_metric(probe(p))), None)
        failure = "even at pct 0 the metric falls by more than the largest drop"
    else:
        chosen = last_meeting(GRID[::-1], lambda p: target.fits(probe(p)))
        failure = f"even at pct {GRID[-1]} the model has {probe(GRID[-1]).params_after:,} parameters and {probe(GRID[-1]).macs_after:,} MACs, over the budget"
    if chosen is not None and not target.fits(probe(chosen)):
        failure = f"at pct {chosen}, the largest whose metric falls at most {target.max_drop}, the model has {probe(chosen).params_after:,} parameters and {probe(chosen).macs_after:,} MACs, over the budget"
        chosen = None
    if chosen is None:
        raise TargetNotMet(f"no pct meets the target: {failure}.")
    if adapt is not None:
        model_out, report, step, adapted_metric = _adapted_search(curve, target, chosen, adapt, trail, fix=fix)
        if val is not None:  # the probes skip held-out data; the chosen pct's prune measures it once, for the report
            report = curve.prune(int(report.pct), fix=fix, val=val)[1]
        if out is not None:
            save_pruned(
                model_out, report, out, arch=arch, history=history, seed=seed, sample_shape=curve.sample_shape,
                preprocessing=preprocessing, force=force, then=[step] if step else [],
            )  # fmt: skip
        report.metric_after = adapted_metric  # the prune step written above keeps the metric before adapting
        report.val_metric_after = None if val is None else finite(metric(val, outputs(model_out, val, device)))
        report.out = None if out is None else str(out)
        return TargetReport(report, target, float(report.pct), trail, round(time.perf_counter() - start, 3), finetune=step)

    _, report = curve.prune(chosen, fix=fix, arch=arch, history=history, out=out, force=force, val=val, preprocessing=preprocessing)
    if not (target.keeps_metric(report) and target.fits(report)):  # the same pipeline as the probe: cannot differ
        raise RuntimeError(f"the model written at pct {chosen} does not meet the target its probe met.")
    return TargetReport(report, target, float(chosen), trail, round(time.perf_counter() - start, 3))


def _adapted_search(
    curve: PruneCurve,
    target: Target,
    start: int,
    adapt: Callable[[nn.Module], dict[str, Any] | None],
    trail: list[dict[str, Any]],
    *,
    fix: bool,
) -> tuple[nn.Module, PruneReport, dict[str, Any] | None, float | None]:
    """The target met after `adapt`: the last pct of the grid from `start` up whose adapted model
    meets it, and that model (pruned with `fix`, then adapted), its prune report, the step
    `adapt` returned and its metric on the data.

    `start`, the answer without adapting, meets the target after adapting too (`adapt` never
    lowers the metric on the data; sizes do not change), so the search is `last_meeting` on the
    grid from `start`: bisection, then `PATIENCE` steps past the boundary, each probe a prune and
    an adapt. A budget alone (`max_params` / `max_macs`) does not depend on adapting, and only
    the chosen model is adapted.
    """
    best: dict[str, Any] = {}  # the highest pct that met so far: model, report, step, metric

    def adapted(pct: int) -> bool:
        model, report = curve.prune(pct, fix=fix)
        step = adapt(model)
        data = curve.data
        value = None if data is None else finite(metric(data, outputs(model, data, curve.device)))
        meets = target.drop_ok(curve.metric, value) and target.fits(report)
        trail.append({"pct": pct, "model": "adapted", "params": report.params_after, "macs": report.macs_after, "metric": value, "meets": meets})
        if meets and pct >= best.get("pct", -1):
            best.update(pct=pct, model=model, report=report, step=step, metric=value)
        return meets

    grid = GRID[start:]
    if target.max_drop is not None:
        last_meeting(grid, lambda p: p == start or adapted(p))
    if not best and not adapted(start):  # nothing above `start` met, or a budget alone: adapt the answer itself
        raise RuntimeError(f"the model at pct {start} does not meet the target after adapting, as it did before.")
    return best["model"], best["report"], best["step"], best["metric"]
