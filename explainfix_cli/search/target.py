"""How much to prune for a target (docs/method.md §2): the pct of the 1 % grid that meets
`--max-drop` (the largest whose metric falls at most X) or `--max-params` / `--max-macs` (the
smallest that fits the budget), on one saliency pass (`search.curve.PruneCurve`).

Size falls with pct (nearly: keeping a cut representable can give a few channels back), so a
budget is found by bisection. The metric is not monotone in pct: on the U-Net sample the Dice
drop wanders around 0.01 from pct 35 to 61 (one more zeroed kernel can fix a few pixels), and a
bisection stops at 34, far below the largest pct that keeps it (58). So `--max-drop` scans the
grid from the top down to the first pct that meets it, on the zeroed model alone (zeroing, then
at most one forward pass over the data, stopped once the metric cannot reach its floor: no
tracing, no channel removal), and confirms that pct with the real prune.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from explainfix_cli.errors import UserError, check_range
from explainfix_cli.evaluation.measure import metric, outputs
from explainfix_cli.io.data import Dataset
from explainfix_cli.io.outputs import check_target
from explainfix_cli.numbers import finite
from explainfix_cli.pruning.pipeline import PruneReport, PruneSettings, save_pruned
from explainfix_cli.search.curve import PruneCurve
from explainfix_cli.search.notes import params_removed, target_note

GRID = list(range(100))  # the 1 % grid of pcts a target is searched on
PATIENCE = 5  # grid steps past the last point that met a target before the search gives up
DROP_TOLERANCE = 1e-9  # a metric drop of exactly X (e.g. 0.9944 - 0.9844) meets --max-drop X


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
    settings: PruneSettings | None = None,
    *,
    adapt: Callable[[nn.Module], dict[str, Any] | None] | None = None,
    **options: Any,
) -> TargetReport:
    """`pruning.prune` at the pct that meets `target`, found on the 1 % grid of one ranking (§2).

    `settings` (a `PruneSettings`, its `pct` unused), or the same fields as keyword options, as
    `pruning.prune` takes them.

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
    s = PruneSettings.of(settings, options)
    if not target.given:
        raise UserError("give a target: `max_drop`, `max_params` or `max_macs`.")
    if target.max_drop is not None and data is None:
        raise UserError("`max_drop` needs `data` to measure the metric on.")
    if s.out is not None:
        check_target(Path(s.out), s.force)
    search = _Search(PruneCurve(model, data, s), target)
    search.check(data)
    chosen = search.choose()
    if adapt is not None:
        return _write_adapted(search, chosen, adapt, s, start)
    _, report = search.curve.prune(
        chosen, fix=s.fix, arch=s.arch, history=s.history, out=s.out, force=s.force, val=s.val, preprocessing=s.preprocessing,
    )  # fmt: skip
    if not (target.keeps_metric(report) and target.fits(report)):  # the same pipeline as the probe: cannot differ
        raise RuntimeError(f"the model written at pct {chosen} does not meet the target its probe met.")
    return TargetReport(report, target, float(chosen), search.trail, round(time.perf_counter() - start, 3))


class _Search:
    """The probes of one search on a curve: each pct pruned at most once, every probe in `trail`."""

    def __init__(self, curve: PruneCurve, target: Target):
        self.curve, self.target = curve, target
        self.probes: dict[int, PruneReport] = {}
        self.trail: list[dict[str, Any]] = []

    def check(self, data: Dataset | None) -> None:
        target, curve = self.target, self.curve
        if target.max_drop is not None and curve.settings.granularity != "kernel":
            raise UserError("`max_drop` is searched along the kernel ranking; use kernel `granularity`, or `max_params` / `max_macs` with channel granularity.")
        if target.max_drop is not None and curve.metric is None:
            raise UserError(f"the {data.metric_name if data else 'metric'} is not defined on this data (e.g. a class with one kind of label only), so a drop cannot be measured.")

    def probe(self, pct: int) -> PruneReport:
        """The prune at `pct` (a copy, nothing written)."""
        if pct not in self.probes:
            r = self.probes[pct] = self.curve.prune(pct)[1]
            meets = self.target.keeps_metric(r) and self.target.fits(r)
            self.trail.append({"pct": pct, "model": "pruned", "params": r.params_after, "macs": r.macs_after, "metric": finite(r.metric_after), "meets": meets})
        return self.probes[pct]

    def scan(self, pct: int) -> bool:
        """Does the zeroed model at `pct` keep the metric? (One forward pass at most, stopped early.)"""
        curve, target = self.curve, self.target
        assert curve.metric is not None and target.max_drop is not None
        zeroed = curve.zeroed_metric(pct, lowest=curve.metric - target.max_drop - DROP_TOLERANCE)  # None: stopped, cannot meet
        self.trail.append({"pct": pct, "model": "zeroed", "params": None, "macs": None, "metric": zeroed, "meets": target.drop_ok(curve.metric, zeroed)})
        return target.drop_ok(curve.metric, zeroed)

    def choose(self) -> int:
        """The pct of the grid that meets the target (module docstring); `TargetNotMet` if none does."""
        target, probe = self.target, self.probe
        if target.max_drop is not None:
            chosen = next((p for p in reversed(GRID) if self.scan(p) and target.keeps_metric(probe(p))), None)
            failure = "even at pct 0 the metric falls by more than the largest drop"
        else:
            chosen = last_meeting(GRID[::-1], lambda p: target.fits(probe(p)))
            failure = f"even at pct {GRID[-1]} the model has {probe(GRID[-1]).params_after:,} parameters and {probe(GRID[-1]).macs_after:,} MACs, over the budget"
        if chosen is not None and not target.fits(probe(chosen)):
            failure = f"at pct {chosen}, the largest whose metric falls at most {target.max_drop}, the model has {probe(chosen).params_after:,} parameters and {probe(chosen).macs_after:,} MACs, over the budget"
            chosen = None
        if chosen is None:
            raise TargetNotMet(f"no pct meets the target: {failure}.")
        return chosen


def _write_adapted(
    search: _Search, chosen: int, adapt: Callable[[nn.Module], dict[str, Any] | None], s: PruneSettings, start: float
) -> TargetReport:
    """The target met after `adapt` (`_adapted_search`), that model written to `s.out`, and its report."""
    curve, val = search.curve, s.val
    model_out, report, step, adapted_metric = _adapted_search(curve, search.target, chosen, adapt, search.trail, fix=s.fix)
    if val is not None:  # the probes skip held-out data; the chosen pct's prune measures it once, for the report
        report = curve.prune(int(report.pct), fix=s.fix, val=val)[1]
    if s.out is not None:
        save_pruned(
            model_out, report, s.out, arch=s.arch, history=s.history, seed=s.seed, sample_shape=curve.sample_shape,
            preprocessing=s.preprocessing, force=s.force, then=[step] if step else [],
        )  # fmt: skip
    report.metric_after = adapted_metric  # the prune step written above keeps the metric before adapting
    report.val_metric_after = None if val is None else finite(metric(val, outputs(model_out, val, s.device)))
    report.out = None if s.out is None else str(s.out)
    return TargetReport(report, search.target, float(report.pct), search.trail, round(time.perf_counter() - start, 3), finetune=step)


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
