"""The trade-off curve (docs/method.md §1, then §2-3 per pct): metric, parameters, MACs, spatial
kernels and latency at a list of pcts, from one saliency pass (`search.curve.PruneCurve`), written
as `sweep.json`, `sweep.csv` and a figure of metric against parameters and against latency
(`figures.tradeoff`). The search for the pct that meets a target is `search.target`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from torch import nn

from explainfix_cli.choices import Criterion, Granularity, LatencyForm, Removal
from explainfix_cli.errors import UserError, check_pct
from explainfix_cli.evaluation.bench import deployment_form
from explainfix_cli.evaluation.measure import median_latency_ms, metric, outputs
from explainfix_cli.figures.tradeoff import draw_tradeoff
from explainfix_cli.io.data import Dataset
from explainfix_cli.io.outputs import atomic_dir, check_folder_target
from explainfix_cli.numbers import finite
from explainfix_cli.pruning.pipeline import PruneSettings
from explainfix_cli.search.curve import Point, PruneCurve

LATENCY_WARMUP = 3
SWEEP_FILES = ("sweep.json", "sweep.csv")


@dataclass(frozen=True)
class SweepSettings:
    """Every option of `sweep`, checked once when made: how each point is pruned (criterion,
    granularity, removal, saliency `scores` the caller already has, device), how latency is timed,
    and where the files go (`out_dir`, figure format `fmt`, `force`)."""

    out_dir: str | Path | None = None
    criterion: Criterion = "gradient"
    scores: dict[str, torch.Tensor] | None = None
    granularity: Granularity = "kernel"
    removal: Removal = "exact"
    latency_repeats: int = 30
    latency_form: LatencyForm = "eager"
    fmt: str = "png"
    force: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.latency_repeats < 0:
            raise UserError(f"`latency_repeats` must be 0 (no latency) or more, not {self.latency_repeats}.")
        if self.latency_form not in get_args(LatencyForm):
            raise UserError(f"`latency_form` must be one of {', '.join(get_args(LatencyForm))}, not {self.latency_form!r}.")

    @classmethod
    def of(cls, settings: SweepSettings | None, options: dict[str, Any]) -> SweepSettings:
        """`settings` (or the defaults) with the fields in `options` replaced; an unknown option is a TypeError."""
        if settings is None:
            return cls(**options)
        return replace(settings, **options) if options else settings

    @property
    def figure(self) -> str:
        return f"sweep.{self.fmt}"

    def prune_settings(self) -> PruneSettings:
        return PruneSettings(criterion=self.criterion, scores=self.scores, granularity=self.granularity, removal=self.removal, device=self.device)


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
    settings: SweepSettings | None = None,
    *,
    adapt: Callable[[nn.Module], Any] | None = None,
    **options: Any,
) -> SweepResult:
    """The metric / parameters / MACs / spatial kernels / latency trade-off at each pct, from one
    saliency pass (docs/method.md §1, then §2-3 per pct on a copy); written into `out_dir` if given.

    `settings` (a `SweepSettings`), or the same fields as keyword options:
    `sweep(model, data, [0, 50, 90], out_dir="curve", latency_repeats=0)`.
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
    pcts = _checked_pcts(pcts)
    s = SweepSettings.of(settings, options)
    if s.out_dir is not None:
        check_folder_target(Path(s.out_dir), s.force)
        for name in (*SWEEP_FILES, s.figure):  # found before the work, not half-way through writing
            if (Path(s.out_dir) / name).is_dir():
                raise UserError(f"{Path(s.out_dir) / name} is a folder where the sweep writes a file; move it away first.")
    if data is None:
        raise UserError("a sweep measures the metric at each pct, so it needs `data`.")
    seconds: dict[str, float] = {}
    curve = PruneCurve(model, data, s.prune_settings())
    seconds["saliency"] = time.perf_counter() - start
    models, points = _points(curve, pcts, adapt)
    seconds["points"] = time.perf_counter() - start - seconds["saliency"]
    baseline = Point(
        pct=None, params=curve.size.params, macs=curve.size.macs, spatial_kernels=curve.size.spatial_kernels,
        nonzero_spatial_kernels=curve.size.spatial_kernels - curve.size.zero_kernels, zeroed_kernels=0, channels_removed=0,
        metric=curve.metric, metric_drop=0.0 if curve.metric is not None else None,
    )  # fmt: skip
    unfolded = _time(models, [baseline, *points], data, s) if s.latency_repeats else []
    seconds["latency"] = time.perf_counter() - start - seconds["saliency"] - seconds["points"]
    recorded = {
        "pcts": pcts, "criterion": s.criterion, "granularity": s.granularity, "removal": s.removal, "samples": data.num_samples,
        "latency": {
            "batch": 1, "repeats": s.latency_repeats, "warmup": LATENCY_WARMUP, "threads": torch.get_num_threads(), "device": s.device,
            "form": s.latency_form, "note": "; ".join(unfolded) or None,
        },
    }  # fmt: skip
    result = SweepResult(data.metric_name, baseline, points, recorded)
    if s.out_dir is not None:
        _write(result, Path(s.out_dir), s.figure, s.force)
    seconds["files"] = time.perf_counter() - start - sum(seconds.values())
    result.seconds = {k: round(v, 3) for k, v in seconds.items()}
    return result


def _checked_pcts(pcts: Sequence[float]) -> list[float]:
    """The pcts in ascending order, each once; at least one, each in [0, 100)."""
    checked = sorted({float(p) for p in pcts})
    if not checked:
        raise UserError("`pcts` must name at least one pct.")
    for p in checked:
        check_pct("pcts", p)
    return checked


def _points(curve: PruneCurve, pcts: list[float], adapt: Callable[[nn.Module], Any] | None) -> tuple[list[nn.Module], list[Point]]:
    """The unpruned model and a pruned copy per pct (adapted, if asked, and measured after), and each copy's point."""
    assert curve.data is not None
    models, points = [curve.model], []
    for pct in pcts:
        pruned, point = curve.point(pct)
        if adapt is not None:
            adapt(pruned)
            point.metric = finite(metric(curve.data, outputs(pruned, curve.data, curve.device)))
            point.metric_drop = None if point.metric is None or curve.metric is None else curve.metric - point.metric
        models.append(pruned)
        points.append(point)
    return models, points


def _time(models: list[nn.Module], points: list[Point], data: Dataset, s: SweepSettings) -> list[str]:
    """Each point's latency at batch 1, timed once per architecture: zeroed kernels are still
    multiplied (pct 0 and 50 often share one). Returns, for the deployment form, why batch norms stayed."""
    unfolded: list[str] = []
    first = {_shapes(m): i for i, m in reversed(list(enumerate(models)))}
    timed_models, x = [models[i] for i in first.values()], data.x[:1].to(s.device)
    if s.latency_form == "deployment":
        deployed = [deployment_form(m) for m in timed_models]
        unfolded = sorted({d.note for d in deployed if d.note})
        timed_models, x = [d.model for d in deployed], x.contiguous(memory_format=torch.channels_last)
    timed = dict(zip(first.values(), median_latency_ms(timed_models, x, s.latency_repeats, LATENCY_WARMUP), strict=True))
    for model, point in zip(models, points, strict=True):
        point.latency_ms = round(timed[first[_shapes(model)]], 4)
    return unfolded


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

