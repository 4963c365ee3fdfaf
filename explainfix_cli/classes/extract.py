"""docs/method.md §6: `extract`, a one-vs-rest sub-model for one class (Avranas & Kountouris,
*Coded ResNeXt*).

The model is reduced to one score for the class (`OneVsRest`); the channels that score needs least
(`reader_importance`, a gradient-times-activation pass of `analysis`) are removed with the
channel-removal engine of `pruning.channels`: every coupled group keeps a share of its importance
(`cut_for_class`), or a greedy search cuts while the one-vs-rest AUC stays within a bound
(`greedy_cut`), on the data and on a check split that chose nothing (`search.holdout`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from explainfix_cli.classes.analysis import Probe, class_membership, gradient_times_activation
from explainfix_cli.errors import UserError, check_range
from explainfix_cli.io.data import Dataset
from explainfix_cli.models import model_output
from explainfix_cli.search.holdout import check_note


class OneVsRest(nn.Module):
    """A classifier reduced to one score for class `target`: its logit minus the largest other
    logit (`margin`, for class labels: positive exactly when the model predicts `target`), or its
    own logit (for multi-label targets, where each label is its own binary problem). (N, 1)."""

    def __init__(self, model: nn.Module, target: int, margin: bool = True) -> None:
        super().__init__()
        self.model = model
        self.target = target
        self.margin = margin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = model_output(self.model, x)  # (N, K)
        own = z[:, self.target : self.target + 1]  # (N, 1)
        if not self.margin:
            return own
        others = torch.cat([z[:, : self.target], z[:, self.target + 1 :]], dim=1)  # (N, K - 1)
        return own - others.amax(dim=1, keepdim=True)


def one_vs_rest(arch: dict[str, Any], target: int, margin: bool = True) -> OneVsRest:
    """The factory `load_model` rebuilds an extracted sub-model with: the original architecture
    (`{"factory": ..., "kwargs": ...}`) wrapped in `OneVsRest`."""
    from explainfix_cli.io.checkpoints import ArchSpec

    return OneVsRest(ArchSpec(**arch).build(), target, margin)


@dataclass
class BinaryScore:
    """How well a one-vs-rest score separates class K from the rest on one data set."""

    auc: float | None  # None when the data holds only one kind
    accuracy: float  # score > 0 against the truth


def binary_score(score: torch.Tensor, positive: torch.Tensor) -> BinaryScore:
    """ROC AUC (ties count half) and accuracy at threshold 0 of a (N,) score for (N,) bool truth."""
    from explainfix_cli.evaluation.measure import roc_auc

    auc = roc_auc(score, positive)
    return BinaryScore(None if auc is None else round(auc, 10), round(float(((score > 0) == positive).double().mean()), 10))


@dataclass
class ExtractReport:
    """What `extract` did: the sub-model's size and its one-vs-rest quality against the full model's."""

    target: int
    score: str  # "margin" (logit minus the largest other) or "logit" (multi-label)
    keep: float  # --keep: share of importance kept in every coupled group; --max-drop: share of the removable channels kept
    max_drop: float | None
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    channels_removed: int
    data: dict[str, BinaryScore]  # "full" and "extracted" on the data the channels were chosen on
    val: dict[str, BinaryScore] | None  # the same on held-out data
    bisection: list[dict[str, float | None]]  # with --max-drop, each candidate cut tried: keep, AUC drop (and on the check split)
    seconds: float
    out: str | None
    check: dict[str, BinaryScore] | None = None  # with --max-drop and a check split: "full" and "extracted" there
    check_samples: int | None = None
    check_note: str | None = None  # one sentence when the check split is too small to mean much
    drop_margin: float | None = None  # --max-drop: the standard errors added to a cut's AUC drop (None with --keep)

    @property
    def check_auc_drop(self) -> float | None:
        full, sub = (None, None) if self.check is None else (self.check["full"].auc, self.check["extracted"].auc)
        return None if full is None or sub is None else round(full - sub, 10)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "check_auc_drop": self.check_auc_drop}


@dataclass
class ReaderImportance:
    """Per conv and linear layer (by name), per input channel: importance for the one-vs-rest score
    and mean input."""

    importance: dict[str, torch.Tensor]  # (input channels,)
    means: dict[str, torch.Tensor]  # (input channels,) mean over the data and over space
    scores: torch.Tensor  # (N,) the one-vs-rest score of every sample, from the same pass


# a positive's weight is sigmoid(-s), a negative's sigmoid(s): the slope of the logistic loss of score s
_SLOPE_SIGNS = torch.tensor([-1.0, 1.0])


def reader_importance(model: nn.Module, data: Dataset, target: int, margin: bool = True, device: str = "cpu") -> ReaderImportance:
    """Per conv and linear layer (by name), (input channels,) the importance of what it reads for
    the one-vs-rest score `s` of class `target` (docs/method.md §6): with `t = Σ (a - ā) ∂s/∂a` at
    the layer's input (`ā` the mean input over the data), half the mean of `sigmoid(-s) |t|` over
    the class's samples plus half the mean of `sigmoid(s) |t|` over the others.

    `|t|` is the first-order change of the score when the channel is replaced by its mean; the
    sigmoid is the slope of the logistic loss of `s`, so samples the score already separates by a
    wide margin count little and those near or across the boundary count fully; the two halves
    weigh both kinds equally, as the AUC does. Removing a channel from a coupled group changes
    every layer that reads it, so a group's importance is the sum over its readers."""
    classes = model_output(model, data.x[:1].to(device)).shape[1]
    membership, _ = class_membership(data, classes)
    if not 0 <= target < classes:
        raise UserError(f"class {target} does not exist; the model has classes 0 to {classes - 1}.")
    probes = [Probe(n, m, "input") for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]

    def sides(y: torch.Tensor) -> torch.Tensor:
        positive = membership(y)[:, target] > 0
        return torch.stack([positive, ~positive], dim=1)  # (N, 2): the class, the rest

    measured = gradient_times_activation(
        OneVsRest(model, target, margin), data, probes, lambda s: s.expand(-1, 2), sides, True,
        centred=True, weights=lambda s: torch.sigmoid(s * _SLOPE_SIGNS.to(s)), device=device,
    )
    if int(measured.counts[0]) == 0:
        raise UserError(f"the data holds no sample of class {target}; its channels cannot be chosen.")
    means = {p.name: measured.probes[p.name].centre for p in probes}
    return ReaderImportance(
        {p.name: measured.mean(p.name, magnitude=True).sum(dim=0) / 2 for p in probes},
        {name: m for name, m in means.items() if m is not None},
        measured.outputs[:, 0],
    )


def _kept_share(importance: torch.Tensor, keep: float) -> torch.Tensor:
    """(C,) True at the fewest channels (largest first) whose importance reaches `keep` of the total."""
    total = float(importance.sum())
    if total <= 0:
        return torch.zeros(len(importance), dtype=torch.bool)
    order = torch.sort(importance, descending=True, stable=True).indices
    reached = importance[order].cumsum(0) >= keep * total * (1 - 1e-6)
    n = int(reached.double().argmax()) + 1 if keep > 0 else 0
    kept = torch.zeros(len(importance), dtype=torch.bool)
    kept[order[:n]] = True
    return kept


@dataclass
class GroupScores:
    """One coupled group that may lose channels: per root channel, its importance (summed over the
    group's readers) and the parameters that leave with it."""

    importance: torch.Tensor  # (n,)
    params: torch.Tensor  # (n,)


def group_scores(model: nn.Module, example: torch.Tensor, measured: ReaderImportance) -> list[GroupScores]:
    """Every coupled group that may lose channels, in the channel-removal engine's order."""
    from explainfix_cli.pruning.channels import remove_chosen_channels

    names = {m: n for n, m in model.named_modules()}
    groups: list[GroupScores] = []

    def record(readers: list[Any], params: torch.Tensor) -> None:
        importance = torch.zeros(len(params), dtype=torch.float64)
        for r in readers:
            importance.index_add_(0, r.root, measured.importance[names[r.module]][r.local].double())
        groups.append(GroupScores(importance, params))

    remove_chosen_channels(model, example, record)  # chooses nothing: the model stays as it is
    return groups


def remove_for_class(model: nn.Module, example: torch.Tensor, measured: ReaderImportance, chosen: list[torch.Tensor]) -> int:
    """Remove, in place, the channels `chosen` (a mask per group, in `group_scores`' order), each
    replaced by its mean input, folded into its readers' biases; returns the channels removed."""
    from explainfix_cli.pruning.channels import remove_chosen_channels

    names = {m: n for n, m in model.named_modules()}
    masks = iter(chosen)
    means = {m: measured.means[n].to(m.weight.dtype) for m, n in names.items() if n in measured.means}
    removed = remove_chosen_channels(model, example, lambda _readers, _params: next(masks), means).removed
    assert next(masks, None) is None, "the model's groups changed between scoring and cutting"
    return removed


def cut_for_class(model: nn.Module, example: torch.Tensor, measured: ReaderImportance, keep: float) -> int:
    """Remove, in place, in every coupled group the channels outside the fewest that keep `keep` of
    the group's importance; returns the channels removed."""
    chosen = [~_kept_share(g.importance, keep) for g in group_scores(model, example, measured)]
    return remove_for_class(model, example, measured, chosen)


GREEDY_STEP = 0.2  # the largest share of the remaining channels one candidate cut removes
GREEDY_EVALUATIONS = 60  # candidate cuts measured at most
# A candidate cut stays when its AUC drop plus this many standard errors (DeLong, paired on the same
# samples) is within --max-drop: the greedy search tries dozens of cuts and keeps those whose
# measured drop happens to be small, so on samples that chose nothing the drop comes out larger
# (benchmarks/holdout_targets.py: 5 of 9 ResNet classes outside X + 0.01 without it; with it none
# on the halves that chose the 4, 3 of 20 classes on two other halvings, where 4-5 missed before).
DROP_MARGIN_SE = 4.0


@dataclass
class GreedyCut:
    """`greedy_cut`'s result."""

    model: nn.Module
    kept: float  # share of the removable channels (those of groups that may lose channels) kept
    removed: int  # channels removed


def greedy_cut(
    model: nn.Module,
    example: torch.Tensor,
    score: Callable[[nn.Module], ReaderImportance],
    drop: Callable[[nn.Module], float | tuple[float, float]],
    max_drop: float,
    tried: list[dict[str, float | None]],
    check: Callable[[nn.Module], float] | None = None,
) -> GreedyCut:
    """`extract --max-drop` (docs/method.md §6): a copy of `model` cut in rounds, each channel
    ranked by its importance per parameter (`score` of the model as it is now). A candidate cut
    removes the `n` lowest-ranked channels and stays when `drop(candidate) <= max_drop` (a drop
    given as (drop, bound) stays when the bound is); then the
    smaller model is scored again and `n` doubles (at most `GREEDY_STEP` of the channels left).
    When it fails, `n` halves; when one channel alone fails, it is passed over and the next one
    is tried. Ends after `GREEDY_EVALUATIONS` candidates or when every channel was passed over.
    With `check` (the drop on a check split), a candidate stays only when that drop is at most
    `max_drop` too; it is measured only for candidates whose `drop` already is.
    `model` is not changed; `tried` gets every candidate's share of channels kept and its drops."""
    import copy

    measured = score(model)
    current = copy.deepcopy(model)
    groups = group_scores(current, example, measured)
    channels_before = sum(len(g.params) for g in groups)
    n, skip = max(1, int(GREEDY_STEP * channels_before)), 0
    for _ in range(GREEDY_EVALUATIONS):
        ratio = torch.cat([g.importance / g.params.clamp_min(1) for g in groups])
        order = torch.sort(ratio, stable=True).indices
        if skip >= len(order):
            break
        mask = torch.zeros(len(order), dtype=torch.bool)
        mask[order[skip : skip + n]] = True
        candidate = copy.deepcopy(current)
        removed = remove_for_class(candidate, example, measured, list(mask.split([len(g.params) for g in groups])))
        if removed == 0:
            skip += n  # nothing there may leave (each group keeps a channel)
            continue
        measured_drop = drop(candidate)
        d, bound = measured_drop if isinstance(measured_drop, tuple) else (measured_drop, measured_drop)
        held = None if check is None or bound > max_drop else check(candidate)
        kept = (len(order) - removed) / channels_before
        tried.append({
            "keep": round(kept, 10), "auc_drop": round(d, 10), "auc_drop_bound": round(bound, 10),
            **({} if check is None else {"check_auc_drop": None if held is None else round(held, 10)}),
        })  # fmt: skip
        if bound <= max_drop and (held is None or held <= max_drop):
            current, skip = candidate, 0
            measured = score(current)
            groups = group_scores(current, example, measured)
            n = min(2 * n, max(1, int(GREEDY_STEP * len(order))))
        elif n > 1:
            n //= 2
        else:
            skip += 1
    left = sum(len(g.params) for g in groups)
    return GreedyCut(current, round(left / channels_before, 10), channels_before - left)


def extract(
    model: nn.Module,
    data: Dataset,
    target: int,
    *,
    keep: float | None = None,
    max_drop: float | None = None,
    drop_margin: float = DROP_MARGIN_SE,
    val: Dataset | None = None,
    check: Dataset | None = None,
    arch: Any = None,
    history: list[dict[str, Any]] | None = None,
    out: str | Path | None = None,
    force: bool = False,
    device: str = "cpu",
) -> tuple[OneVsRest, ExtractReport]:
    """A one-vs-rest sub-model for class `target` (docs/method.md §6, Coded ResNeXt): remove the
    channels the class's one-vs-rest score needs least (`reader_importance`) with the
    channel-removal engine, and reduce the outputs to that one score. With `keep`, every coupled
    group keeps the fewest channels holding a share `keep` of its importance; with `max_drop`,
    `greedy_cut` removes channels in rounds while the one-vs-rest AUC on `data` stays at most
    `max_drop` below the full model's, and on `check` too when given (samples that neither score
    nor choose: `search.holdout.check_split` carves them from the data, or takes `val`). `model`
    is not changed; the sub-model is written to `out` (rebuilt by `load_model`).
    """
    from explainfix_cli.evaluation.measure import model_size
    from explainfix_cli.io.outputs import check_target

    start = time.perf_counter()
    _check_cut(keep, max_drop, drop_margin)
    if out is not None:
        check_target(Path(out), force)
    model.eval().to(device)
    margin = data.target_kind == "labels"
    importance = reader_importance(model, data, target, margin, device)
    full = OneVsRest(model, target, margin)
    full_score = binary_score(importance.scores, _truth(data, target, margin))  # the importance pass ran the full model on the data
    tried: list[dict[str, float | None]] = []
    check = check if max_drop is not None else None
    if max_drop is not None:
        greedy = _greedy(model, data, target, margin, importance, full_score, max_drop, tried, device, check, drop_margin)
        cut, keep, removed = greedy.model, greedy.kept, greedy.removed
    else:
        assert keep is not None
        cut = copy.deepcopy(model)
        removed = cut_for_class(cut, data.x[:1].to(device), importance, keep)
    sub, shape = OneVsRest(cut, target, margin).eval(), tuple(data.x.shape[1:])
    before, after = model_size(full, shape), model_size(sub, shape)
    report = ExtractReport(
        target=target, score="margin" if margin else "logit", keep=keep, max_drop=max_drop,
        params_before=before.params, params_after=after.params, macs_before=before.macs, macs_after=after.macs, channels_removed=removed,
        data={"full": full_score, "extracted": _binary(sub, data, target, margin, device)},
        val=_both(full, sub, val, target, margin, device), bisection=tried, seconds=0.0, out=None if out is None else str(out),
        check=_both(full, sub, check, target, margin, device), check_samples=None if check is None else check.num_samples, check_note=check_note(check),
        drop_margin=None if max_drop is None else drop_margin,
    )  # fmt: skip
    if out is not None:
        _save(sub, report, arch, history, shape, Path(out), force)
    report.seconds = round(time.perf_counter() - start, 3)
    return sub, report


def _both(full: nn.Module, sub: nn.Module, data: Dataset | None, target: int, margin: bool, device: str) -> dict[str, BinaryScore] | None:
    """The full model's and the sub-model's one-vs-rest scores on `data` (None without it)."""
    if data is None:
        return None
    return {"full": _binary(full, data, target, margin, device), "extracted": _binary(sub, data, target, margin, device)}


def _check_cut(keep: float | None, max_drop: float | None, drop_margin: float) -> None:
    """Exactly one of the two ways to choose the cut, within its range."""
    check_range("drop_margin", drop_margin, 0)
    if (keep is None) == (max_drop is None):
        raise UserError("give either a share of importance to keep or a largest allowed AUC drop, not both or neither.")
    if keep is not None and not 0 <= keep <= 1:
        raise UserError(f"the share of importance to keep must be in [0, 1], not {keep}.")
    if max_drop is not None and not 0 <= max_drop < 1:
        raise UserError(f"the largest allowed AUC drop must be in [0, 1), not {max_drop}.")


def _truth(data: Dataset, target: int, margin: bool) -> torch.Tensor:
    """(N,) bool: which samples of `data` are of class `target`."""
    y = torch.cat([y for _, y in data])
    return (y == target) if margin else (y[:, target] > 0.5)


def _scores(model: nn.Module, data: Dataset, device: str) -> torch.Tensor:
    """(N,) a one-vs-rest model's score of every sample."""
    from explainfix_cli.evaluation.measure import outputs

    return outputs(model, data, device)[:, 0]


def _binary(model: nn.Module, data: Dataset, target: int, margin: bool, device: str) -> BinaryScore:
    return binary_score(_scores(model, data, device), _truth(data, target, margin))


def _greedy(
    model: nn.Module,
    data: Dataset,
    target: int,
    margin: bool,
    importance: ReaderImportance,
    full_score: BinaryScore,
    max_drop: float,
    tried: list[dict[str, float | None]],
    device: str,
    check: Dataset | None = None,
    drop_margin: float = DROP_MARGIN_SE,
) -> GreedyCut:
    """`greedy_cut` of `model`, each candidate's drop its one-vs-rest AUC below the full model's
    on `data` (and on `check`), re-scored on `data` after each cut (`importance` is the full model's)."""
    if full_score.auc is None:
        raise UserError(f"the data holds only one kind of sample for class {target}; an AUC cannot guide the cut.")

    def auc_drop(on: Dataset, full_auc: float) -> Callable[[nn.Module], float]:
        truth = _truth(on, target, margin)

        def drop(m: nn.Module) -> float:
            auc = binary_score(_scores(OneVsRest(m, target, margin), on, device), truth).auc
            assert auc is not None
            return full_auc - auc

        return drop

    def bounded_drop(on: Dataset) -> Callable[[nn.Module], tuple[float, float]]:
        """(the AUC drop on `on`, it plus `drop_margin` standard errors)."""
        from explainfix_cli.evaluation.measure import paired_auc_drop

        truth, full_scores = _truth(on, target, margin), _scores(OneVsRest(model, target, margin), on, device)

        def drop(m: nn.Module) -> tuple[float, float]:
            scores = _scores(OneVsRest(m, target, margin), on, device)  # (N,) one forward pass per candidate
            paired = paired_auc_drop(full_scores, scores, truth)
            if paired is None:  # too few samples of a kind for an error: the drop alone
                full_auc, auc = binary_score(full_scores, truth).auc, binary_score(scores, truth).auc
                assert full_auc is not None and auc is not None
                return full_auc - auc, full_auc - auc
            return paired[0], paired[0] + drop_margin * paired[1]

        return drop

    def score(m: nn.Module) -> ReaderImportance:
        return importance if m is model else reader_importance(m, data, target, margin, device)

    held = None
    if check is not None:
        check_full = _binary(OneVsRest(model, target, margin), check, target, margin, device).auc
        if check_full is None:
            raise UserError(f"the check split holds only one kind of sample for class {target}, so the AUC drop cannot be checked there; give a larger `check_fraction`, other `val`, or `check_fraction` 0.")
        held = auc_drop(check, check_full)
    return greedy_cut(model, data.x[:1].to(device), score, bounded_drop(data), max_drop, tried, held)


def _save(sub: OneVsRest, report: ExtractReport, arch: Any, history: list[dict[str, Any]] | None, shape: tuple[int, ...], out: Path, force: bool) -> None:
    """Write the sub-model with its step in the history; `load_model` rebuilds it with `one_vs_rest`."""
    from explainfix_cli.io.checkpoints import ArchSpec, save_model

    spec = ArchSpec(f"{__name__}:one_vs_rest", {"arch": arch.to_json(), "target": sub.target, "margin": sub.margin}) if arch is not None else None
    step = {"step": "extract", **{k: v for k, v in report.to_json().items() if k not in ("seconds", "out")}, "input_size": list(shape)}
    save_model(sub, out, arch=spec, history=[*(history or []), step], report=step, force=force)
