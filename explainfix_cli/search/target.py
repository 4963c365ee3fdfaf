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

A drop chosen on some samples must hold on others (`search.holdout`): given a `check` split, a
pct meets `--max-drop` only when its drop is at most X on the data and on the check split. The
check split is evaluated only for pcts that already meet on the data (on the zeroed model first,
then on the confirming prune), so it costs a forward pass over a few samples per such pct.
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
from explainfix_cli.search.holdout import check_note
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
    `metric_after` / `val_metric_after` are the adapted model's. With a check split, `check_*`
    are the metric there of the unpruned and of the written model (None without one)."""

    report: PruneReport
    target: Target
    pct_chosen: float
    probes: list[dict[str, Any]]  # in the order measured; model "zeroed" (scan), "pruned" or "adapted"
    seconds: float
    finetune: dict[str, Any] | None = None
    check_samples: int | None = None
    check_metric_before: float | None = None
    check_metric_after: float | None = None
    check_note: str | None = None

    @property
    def check_drop(self) -> float | None:
        before, after = self.check_metric_before, self.check_metric_after
        return None if before is None or after is None else round(before - after, 10)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.report.to_json(), "target": self.target.to_json(), "pct_chosen": self.pct_chosen, "probes": self.probes,
            "seconds": self.seconds, "finetune": self.finetune, "params_removed": params_removed(self.report),
            "note": target_note(self.report, self.target.max_drop, self.finetune is not None),
            "check_samples": self.check_samples, "check_metric_before": self.check_metric_before,
            "check_metric_after": self.check_metric_after, "check_drop": self.check_drop, "check_note": self.check_note,
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
    check: Dataset | None = None,
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

    `check`, samples that neither score, rank nor choose epochs (`search.holdout.check_split`
    carves them from the data, or takes `val`): a pct then meets `max_drop` only when the metric
    falls at most `max_drop` on `data` and on `check` too (module docstring).
    """
    start = time.perf_counter()
    s = PruneSettings.of(settings, options)
    if not target.given:
        raise UserError("give a target: `max_drop`, `max_params` or `max_macs`.")
    if target.max_drop is not None and data is None:
        raise UserError("`max_drop` needs `data` to measure the metric on.")
    if s.out is not None:
        check_target(Path(s.out), s.force)
    search = _Search(PruneCurve(model, data, s), target, check if target.max_drop is not None else None)
    search.check(data)
    chosen = search.choose()
    if adapt is not None:
        return _write_adapted(search, chosen, adapt, s, start)
    _, report = search.curve.prune(
        chosen, fix=s.fix, arch=s.arch, history=s.history, out=s.out, force=s.force, val=s.val, preprocessing=s.preprocessing,
    )  # fmt: skip
    if not (target.keeps_metric(report) and target.fits(report)):  # the same pipeline as the probe: cannot differ
        raise RuntimeError(f"the model written at pct {chosen} does not meet the target its probe met.")
    return search.result(report, float(chosen), round(time.perf_counter() - start, 3), search.held.get(chosen))


class _Search:
    """The probes of one search on a curve: each pct pruned at most once, every probe in `trail`;
    with a check split (`holdout`), its metric for each pruned pct that met on the data (`held`)."""

    def __init__(self, curve: PruneCurve, target: Target, holdout: Dataset | None = None):
        self.curve, self.target, self.holdout = curve, target, holdout
        self.probes: dict[int, PruneReport] = {}
        self.held: dict[int, float | None] = {}
        self.trail: list[dict[str, Any]] = []
        self.holdout_before = None if holdout is None else finite(metric(holdout, outputs(curve.model, holdout, curve.device)))

    def holds(self, model: nn.Module) -> tuple[bool, float | None]:
        """Does `model` keep the metric on the check split (always, without one), and its metric there."""
        if self.holdout is None:
            return True, None
        value = finite(metric(self.holdout, outputs(model, self.holdout, self.curve.device)))
        return self.target.drop_ok(self.holdout_before, value), value

    def result(self, report: PruneReport, pct: float, seconds: float, held: float | None, finetune: dict[str, Any] | None = None) -> TargetReport:
        """The search's `TargetReport` for the written model's `report` (`held`: its metric on the check split)."""
        h = self.holdout
        return TargetReport(
            report, self.target, pct, self.trail, seconds, finetune=finetune, check_samples=None if h is None else h.num_samples,
            check_metric_before=self.holdout_before, check_metric_after=held, check_note=check_note(h),
        )  # fmt: skip

    def check(self, data: Dataset | None) -> None:
        target, curve = self.target, self.curve
        if target.max_drop is not None and curve.settings.granularity != "kernel":
            raise UserError("`max_drop` is searched along the kernel ranking; use kernel `granularity`, or `max_params` / `max_macs` with channel granularity.")
        if target.max_drop is not None and curve.metric is None:
            raise UserError(f"the {data.metric_name if data else 'metric'} is not defined on this data (e.g. a class with one kind of label only), so a drop cannot be measured.")
        if self.holdout is not None and self.holdout_before is None:
            raise UserError(f"the {self.holdout.metric_name} is not defined on the check split (e.g. one kind of label only), so a drop cannot be checked there; give a larger `check_fraction`, other `val`, or `check_fraction` 0.")

    def probe(self, pct: int) -> PruneReport:
        """The prune at `pct` (a copy, nothing written)."""
        if pct not in self.probes:
            pruned, r = self.curve.prune(pct)
            self.probes[pct] = r
            meets = self.target.keeps_metric(r) and self.target.fits(r)
            if meets and self.holdout is not None:  # the check split only for a pct that met on the data
                holds, self.held[pct] = self.holds(pruned)
                meets = holds
            self.trail.append({
                "pct": pct, "model": "pruned", "params": r.params_after, "macs": r.macs_after, "metric": finite(r.metric_after),
                "check_metric": self.held.get(pct), "meets": meets,
            })  # fmt: skip
        return self.probes[pct]

    def meets_drop(self, pct: int) -> bool:
        """Does the prune at `pct` keep the metric on the data and on the check split (`probe`)?"""
        report = self.probe(pct)
        return self.target.keeps_metric(report) and (self.holdout is None or self.target.drop_ok(self.holdout_before, self.held.get(pct)))

    def scan(self, pct: int) -> bool:
        """Does the zeroed model at `pct` keep the metric? (One forward pass at most, stopped early.)"""
        curve, target = self.curve, self.target
        assert curve.metric is not None and target.max_drop is not None
        zeroed = curve.zeroed_metric(pct, lowest=curve.metric - target.max_drop - DROP_TOLERANCE)  # None: stopped, cannot meet
        meets, held = target.drop_ok(curve.metric, zeroed), None
        if meets and self.holdout is not None and self.holdout_before is not None:  # the check split only where the data met
            held = curve.zeroed_metric(pct, lowest=self.holdout_before - target.max_drop - DROP_TOLERANCE, on=self.holdout)
            meets = target.drop_ok(self.holdout_before, held)
        self.trail.append({"pct": pct, "model": "zeroed", "params": None, "macs": None, "metric": zeroed, "check_metric": held, "meets": meets})
        return meets

    def choose(self) -> int:
        """The pct of the grid that meets the target (module docstring); `TargetNotMet` if none does."""
        target, probe = self.target, self.probe
        if target.max_drop is not None:
            chosen = next((p for p in reversed(GRID) if self.scan(p) and self.meets_drop(p)), None)
            failure = "even at pct 0 the metric falls by more than the largest drop" + ("" if self.holdout is None else " on the data or on the check split")
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
    found = _adapted_search(search, chosen, adapt, fix=s.fix)
    model_out, report, step = found.model, found.report, found.step
    if val is not None:  # the probes skip held-out data; the chosen pct's prune measures it once, for the report
        report = curve.prune(int(report.pct), fix=s.fix, val=val)[1]
    if s.out is not None:
        save_pruned(
            model_out, report, s.out, arch=s.arch, history=s.history, seed=s.seed, sample_shape=curve.sample_shape,
            preprocessing=s.preprocessing, force=s.force, then=[step] if step else [],
        )  # fmt: skip
    report.metric_after = found.metric  # the prune step written above keeps the metric before adapting
    report.val_metric_after = None if val is None else finite(metric(val, outputs(model_out, val, s.device)))
    report.out = None if s.out is None else str(s.out)
    return search.result(report, float(report.pct), round(time.perf_counter() - start, 3), found.held, finetune=step)


@dataclass
class _Adapted:
    """`_adapted_search`'s answer: the model (pruned, then adapted unless `step` is None), its prune
    report, the step `adapt` returned, its metric on the data and on the check split."""

    pct: int
    model: nn.Module
    report: PruneReport
    step: dict[str, Any] | None
    metric: float | None
    held: float | None


def _adapted_search(search: _Search, start: int, adapt: Callable[[nn.Module], dict[str, Any] | None], *, fix: bool) -> _Adapted:
    """The target met after `adapt`: the last pct of the grid from `start` up whose adapted model
    meets it, and that model (pruned with `fix`, then adapted).

    `start`, the answer without adapting, meets the target after adapting too (`adapt` never
    lowers the metric on the data; sizes do not change), so the search is `last_meeting` on the
    grid from `start`: bisection, then `PATIENCE` steps past the boundary, each probe a prune and
    an adapt. A budget alone (`max_params` / `max_macs`) does not depend on adapting, and only
    the chosen model is adapted. With a check split an adapted model must keep the metric there
    too; `adapt` may lower it there (it chose its epoch on the data), so when no adapted model
    meets, the answer is `start` as pruned, not adapted (it met on both).
    """
    curve, target = search.curve, search.target
    best: list[_Adapted] = []  # the highest pct that met so far

    def adapted(pct: int) -> bool:
        model, report = curve.prune(pct, fix=fix)
        step = adapt(model)
        data = curve.data
        value = None if data is None else finite(metric(data, outputs(model, data, curve.device)))
        meets, held = target.drop_ok(curve.metric, value) and target.fits(report), None
        if meets and target.max_drop is not None:
            meets, held = search.holds(model)
        search.trail.append({"pct": pct, "model": "adapted", "params": report.params_after, "macs": report.macs_after, "metric": value, "check_metric": held, "meets": meets})
        if meets and (not best or pct >= best[-1].pct):
            best.append(_Adapted(pct, model, report, step, value, held))
        return meets

    grid = GRID[start:]
    if target.max_drop is not None:
        last_meeting(grid, lambda p: p == start or adapted(p))
    if not best and not adapted(start):  # nothing above `start` met, or a budget alone: adapt the answer itself
        if search.holdout is None:
            raise RuntimeError(f"the model at pct {start} does not meet the target after adapting, as it did before.")
        model, report = curve.prune(start, fix=fix)  # adapting lost the metric on the check split: as pruned
        return _Adapted(start, model, report, None, finite(report.metric_after), search.held.get(start))
    return best[-1]
