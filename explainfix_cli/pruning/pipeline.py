"""docs/method.md §2 (zeroing the least salient kernels) and the whole prune: §1 → §2 → §3 → §4."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from explainfix_cli import progress
from explainfix_cli.choices import Criterion, Fill, Granularity, Removal
from explainfix_cli.distributed import rank_and_world
from explainfix_cli.errors import UserError, check_pct
from explainfix_cli.evaluation.measure import Size, metric, model_size, outputs, outputs_together
from explainfix_cli.io.checkpoints import ArchSpec, save_model
from explainfix_cli.io.data import Dataset
from explainfix_cli.io.outputs import check_target
from explainfix_cli.io.preprocessing import Preprocessing
from explainfix_cli.models import require_spatial_convs, spatial_convs
from explainfix_cli.numbers import strict
from explainfix_cli.pruning.channel_ranking import remove_least_salient_channels
from explainfix_cli.pruning.channels import ChannelRemoval
from explainfix_cli.pruning.dead_channels import remove_dead_channels
from explainfix_cli.pruning.surgery import surgery_failures
from explainfix_cli.saliency import spatial_saliency
from explainfix_cli.training.fixed import fix_spatial_filters


def least_salient_kernels(
    model: nn.Module, scores: dict[str, torch.Tensor], pct: float, min_kernels_per_layer: int = 0
) -> dict[str, torch.Tensor]:
    """The `floor(pct/100 * total)` least salient spatial kernels of the whole model (§2), per
    layer an (O, I/groups) mask, without changing the model.

    One global ranking, ascending; ties broken by layer order, then o, then i (a stable sort of
    the scores laid out in that order). `min_kernels_per_layer` K > 0 is a floor against layer
    collapse: the K most salient kernels of every layer (ties to the earlier o, i) stay out of
    the ranking, which is otherwise unchanged, and at most the kernels left in it are chosen.
    """
    check_pct("pct", pct)
    if min_kernels_per_layer < 0:
        raise UserError(f"the minimum of kernels kept per layer must be 0 or more, not {min_kernels_per_layer}.")
    convs = require_spatial_convs(model)
    flat = torch.cat([scores[name].double().flatten() for name, _ in convs])  # layer, then o, then i
    k = math.floor(pct / 100 * len(flat))
    if min_kernels_per_layer == 0:
        chosen = _smallest_first(flat, k)
    else:
        ranked = ~torch.cat([_most_salient(scores[name].double().flatten(), min_kernels_per_layer) for name, _ in convs])  # (total,)
        chosen = torch.zeros(len(flat), dtype=torch.bool)
        chosen[ranked] = _smallest_first(flat[ranked], min(k, int(ranked.sum())))
    masks, start = {}, 0
    for name, conv in convs:
        n = conv.weight.shape[0] * conv.weight.shape[1]
        masks[name] = chosen[start : start + n].reshape(conv.weight.shape[:2])  # (O, I/groups)
        start += n
    return masks


def zero_least_salient(
    model: nn.Module, scores: dict[str, torch.Tensor], pct: float, min_kernels_per_layer: int = 0
) -> dict[str, torch.Tensor]:
    """Zero the kernels `least_salient_kernels` picks (§2); returns its masks."""
    masks = least_salient_kernels(model, scores, pct, min_kernels_per_layer)
    for name, conv in require_spatial_convs(model):
        with torch.no_grad():
            conv.weight[masks[name]] = 0
    return masks


def _smallest_first(flat: torch.Tensor, k: int) -> torch.Tensor:
    """(n,) True at the first k entries of a stable ascending sort of `flat`, without sorting:
    everything below the k-th smallest value, then the earliest entries equal to it."""
    if k == 0:
        return torch.zeros(len(flat), dtype=torch.bool)
    if flat.isnan().any():
        raise UserError("the saliency scores contain NaN (the model's outputs or gradients are not finite on this data).")
    kth = flat.kthvalue(k).values
    chosen = flat < kth
    ties = (flat == kth).nonzero().flatten()
    chosen[ties[: k - int(chosen.sum())]] = True
    return chosen


def _most_salient(layer: torch.Tensor, k: int) -> torch.Tensor:
    """(n,) True at the k highest scores of one layer; among equal scores the earlier kernel."""
    keep = torch.zeros(len(layer), dtype=torch.bool)
    keep[torch.sort(layer, descending=True, stable=True).indices[:k]] = True
    return keep


def collapsed_layers(model: nn.Module) -> list[str]:
    """Spatial convs with no nonzero kernel left: their output no longer depends on their input,
    so neither does the model's, unless a skip connection goes around them."""
    return [name for name, conv in spatial_convs(model) if not bool(conv.weight.detach().ne(0).any())]


def fill_zeroed(model: nn.Module, original: dict[str, torch.Tensor], fill: Fill, generator: torch.Generator) -> int:
    """Handle the zeroed kernels that stayed in the model (§3 `--fill`); returns how many were refilled.

    `original` holds each spatial conv's weight before zeroing, already cut to the channels that
    remain. `reset` restores those values; `fillzero` redraws the zeroed kernels from PyTorch's
    default Kaiming-uniform. (Zeroing takes whole kernels, so no kernel is left partly zero.)
    """
    if fill == "zero":
        return 0
    refilled = 0
    for name, conv in require_spatial_convs(model):
        w = conv.weight.detach()  # (O, I/groups, kh, kw)
        old = original[name]
        zero_entries = (w == 0) & (old != 0)
        touched = zero_entries.flatten(2).any(dim=2)  # (O, I/groups) kernels changed by zeroing
        refilled += int(touched.sum())
        with torch.no_grad():
            if fill == "reset":
                w[zero_entries] = old[zero_entries]
                continue
            bound = 1 / math.sqrt(w[0].numel())  # kaiming_uniform_(a=sqrt(5)) as in nn.Conv2d.reset_parameters
            uniform = (torch.rand(w.shape, generator=generator) * 2 - 1) * bound
            w[zero_entries] = uniform[zero_entries]
    return refilled


@dataclass
class PruneReport:
    """Everything `prune` measured (docs/cli.md: `prune --json` fields)."""

    params_before: int
    params_after: int
    spatial_kernels_before: int
    spatial_kernels_after: int
    zeroed_kernels: int
    channels_removed: int
    channels_folded: int
    blocked_groups: dict[str, int]
    macs_before: int
    macs_after: int
    max_logit_change: float | None
    predictions_changed: int | None
    metric: str | None
    metric_before: float | None
    metric_after: float | None
    calibration_samples: int | None  # samples of the data the scores and the removal saw
    val_samples: int | None  # held-out samples (`val`), never seen by the prune
    val_max_logit_change: float | None
    val_predictions_changed: int | None
    val_metric_before: float | None
    val_metric_after: float | None
    pct: float
    granularity: str
    criterion: str
    fill: str
    removal: str
    fixed_tensors: int
    seconds: float
    out: str | None
    min_kernels_per_layer: int = 0
    collapsed_layers: list[str] = field(default_factory=list)  # spatial convs left with every kernel zero
    constant_output: bool | None = None  # the written model gives every sample of the data the same output
    removal_check_samples: int | None = None  # samples of the data `max_logit_change` and `predictions_changed` cover
    val_removal_check_samples: int | None = None  # the same on `val`

    def to_json(self) -> dict[str, Any]:
        return strict(asdict(self))

    def warnings(self) -> list[str]:
        """Sentences for a person: layer collapse is never silent (docs/method.md §2 at high pct)."""
        if not self.collapsed_layers:
            return []
        names = ", ".join(self.collapsed_layers[:5]) + (f" and {len(self.collapsed_layers) - 5} more" if len(self.collapsed_layers) > 5 else "")
        effect = (
            "the pruned model gives every sample of the data the same output"
            if self.constant_output
            else "their outputs are constants, so only paths around them still carry the input"
        )
        return [
            f"pruning zeroed every kernel of {len(self.collapsed_layers)} spatial layer(s) ({names}): {effect}; "
            "keep a floor of kernels per layer (--min-kernels-per-layer K) or prune less."
        ]


@dataclass(frozen=True)
class PruneSettings:
    """Every option of a prune (docs/method.md §1-4), checked once when made: what to do (pct,
    granularity, criterion, fill, removal, fix, seed, the per-layer floor), what the caller
    already has (saliency `scores`, the unpruned model's `reference_outputs` on the data, held-out
    `val`, the input size without data) and what to write (`out`, `force`, `arch`, `history`,
    `preprocessing`). `prune` takes one, as black passes one `Mode`; its keyword options make one."""

    pct: float = 50.0
    granularity: Granularity = "kernel"
    criterion: Criterion = "gradient"
    scores: dict[str, torch.Tensor] | None = None
    fill: Fill = "zero"
    removal: Removal = "exact"
    fix: bool = True
    arch: ArchSpec | None = None
    history: list[dict[str, Any]] | None = None
    out: str | Path | None = None
    force: bool = False
    seed: int = 0
    device: str = "cpu"
    sample_shape: tuple[int, ...] | None = None
    val: Dataset | None = None
    preprocessing: Preprocessing | None = None
    min_kernels_per_layer: int = 0
    reference_outputs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_pct("pct", self.pct)

    @classmethod
    def of(cls, settings: PruneSettings | None, options: dict[str, Any]) -> PruneSettings:
        """`settings` (or the defaults) with the fields in `options` replaced; an unknown option is a TypeError."""
        if settings is None:
            return cls(**options)
        return replace(settings, **options) if options else settings


def prune(model: nn.Module, data: Dataset | None, settings: PruneSettings | None = None, **options: Any) -> tuple[nn.Module, PruneReport]:
    """docs/method.md §1-4 end to end: score, zero, remove channels, fill, fix, and write to `out`.

    `settings` (a `PruneSettings`), or the same fields as keyword options:
    `prune(model, data, pct=70, fill="fillzero", out="m.safetensors")`. With
    `granularity="channel"` whole channels are ranked and removed instead (§3), and
    `max_logit_change` compares with the original model. `model` is changed in place and returned. Without data, `sample_shape` (C, H, W) gives the
    input size for tracing and MACs, and no output-based numbers are reported. `val`, held-out
    data the prune never sees, gets the same comparisons as `data`: the check that a removal
    is exact beyond the data it was calibrated on. `seed` seeds only `fill`'s own generator.
    `preprocessing` (the input normalisation) is recorded in the written file, for the input
    size pruned on. `reference_outputs`, the unpruned model's outputs on `data` when the caller
    already has them (a sweep that scores once and prunes many copies), saves a forward pass.
    """
    start = time.perf_counter()
    s = PruneSettings.of(settings, options)
    if s.out is not None:
        check_target(Path(s.out), s.force)
    sample_shape = tuple(data.x.shape[1:]) if data is not None else s.sample_shape
    if sample_shape is None:
        raise UserError("without `data`, give the input size with `input_size` C,H,W.")
    model.eval().to(s.device)
    stages = _stages(model, data, s, sample_shape)
    report = stages.report(data, s)
    if s.out is not None:
        save_pruned(
            model, report, s.out, arch=s.arch, history=s.history, seed=s.seed, sample_shape=sample_shape,
            preprocessing=s.preprocessing, force=s.force,
        )  # fmt: skip
    report.seconds = round(time.perf_counter() - start, 3)
    return model, report


@dataclass
class _Stages:
    """What each stage of a prune left: sizes, the zeroing masks, what removal did, the outputs."""

    before: Size
    after: Size
    masks: dict[str, torch.Tensor]
    removed: ChannelRemoval
    collapsed: list[str]
    fixed: int
    original_out: _Outputs  # the unpruned model's
    zeroed_out: _Outputs  # what removal is compared with: the zeroed model's (the original's for channel granularity)
    removed_out: _Outputs  # after removal
    written_out: _Outputs  # after fill and fix: the model written

    def report(self, data: Dataset | None, s: PruneSettings) -> PruneReport:
        val = s.val
        return PruneReport(
            params_before=self.before.params, params_after=self.after.params,
            spatial_kernels_before=self.before.spatial_kernels, spatial_kernels_after=self.after.spatial_kernels,
            zeroed_kernels=sum(int(m.sum()) for m in self.masks.values()),
            channels_removed=self.removed.removed, channels_folded=self.removed.folded,
            blocked_groups=dict(sorted(self.removed.blocked.items())),
            macs_before=self.before.macs, macs_after=self.after.macs,
            max_logit_change=_max_change(self.removed_out.data, self.zeroed_out.data),
            predictions_changed=_predictions_changed(self.removed_out.data, self.zeroed_out.data, data),
            metric=data.metric_name if data is not None else None,
            metric_before=_metric(data, self.original_out.data), metric_after=_metric(data, self.written_out.data),
            calibration_samples=None if data is None else data.num_samples, val_samples=None if val is None else val.num_samples,
            val_max_logit_change=_max_change(self.removed_out.val, self.zeroed_out.val),
            val_predictions_changed=_predictions_changed(self.removed_out.val, self.zeroed_out.val, val),
            val_metric_before=_metric(val, self.original_out.val), val_metric_after=_metric(val, self.written_out.val),
            pct=s.pct, granularity=s.granularity, criterion=s.criterion, fill=s.fill, removal=s.removal,
            fixed_tensors=self.fixed, seconds=0.0, out=str(s.out) if s.out is not None else None,
            min_kernels_per_layer=s.min_kernels_per_layer, collapsed_layers=self.collapsed,
            constant_output=_constant(self.written_out.data),
            removal_check_samples=_covered(self.removed_out.data, self.zeroed_out.data),
            val_removal_check_samples=_covered(self.removed_out.val, self.zeroed_out.val),
        )  # fmt: skip


def _stages(model: nn.Module, data: Dataset | None, s: PruneSettings, sample_shape: tuple[int, ...]) -> _Stages:
    """§1 score, §2 zero, §3 remove and fill, §4 fix, in place, measuring the outputs after each.

    The data is read twice: §1's forward and backward passes (their forwards are the original
    model's outputs), then one pass that runs the zeroed model (a copy kept before removal), the
    removed one and, with a `fill`, the filled one on each minibatch (`_measured`). Calibrated and
    aggressive removal read it once more, between the two, for the zeroed model's input ranges.
    `val` is read twice: by the original model, and by the later stages together.
    """
    convs = require_spatial_convs(model)
    device, val = s.device, s.val
    # §1 score (its forward passes are the original model's outputs on the data)
    seen: list[torch.Tensor] = []
    scores = s.scores if s.scores is not None else spatial_saliency(model, data, s.criterion, device, outputs=seen)
    before = model_size(model, sample_shape)
    with progress.stage("measuring the original"):
        original_out = _Outputs.of(model, data, val, device, torch.cat(seen) if seen else s.reference_outputs)
    original = {name: conv.weight.detach().clone() for name, conv in convs} if s.fill != "zero" else {}

    # §2 zero, §3 remove: failures after the original model ran on the data are the prune's own
    example = (data.x[:1] if data is not None else torch.zeros(1, *sample_shape)).to(device)
    with surgery_failures():
        masks, removed, zeroed, collapsed = _zero_and_remove(
            model, scores, example, data, val, device, granularity=s.granularity, pct=s.pct, removal=s.removal,
            min_kernels_per_layer=s.min_kernels_per_layer, original_out=original_out,
        )  # fmt: skip
        measured = data is not None or val is not None
        unfilled = _Stage(copy.deepcopy(model) if measured and s.fill != "zero" else None)  # §3's model, before the fill
        # §3 the zeroed kernels that stay, §4 fix
        kept = {name: removed.kept[name].original(w) for name, w in original.items()}
        fill_zeroed(model, kept, s.fill, torch.Generator().manual_seed(s.seed))
        fixed = fix_spatial_filters(model) if s.fix else []
        after = model_size(model, sample_shape)
        with progress.stage("measuring the pruned model"):
            written = _Stage(model if measured else None)
            removed_stage = unfilled if s.fill != "zero" else written  # without a fill, the model written is §3's
            zeroed_out, removed_out, written_out = _measured([zeroed, removed_stage, written], data, val, device)
    return _Stages(before, after, masks, removed, collapsed, len(fixed), original_out, zeroed_out, removed_out, written_out)


@dataclass
class _Outputs:
    """A model's outputs at one stage of a prune: on the calibration data, and on held-out data."""

    data: torch.Tensor | None = None
    val: torch.Tensor | None = None

    @classmethod
    def of(cls, model: nn.Module, data: Dataset | None, val: Dataset | None, device: str, known: torch.Tensor | None = None) -> _Outputs:
        """`known`: the outputs on `data` when the caller already has them (one forward pass saved)."""
        on_data = None if data is None else known if known is not None else outputs(model, data, device)
        return cls(on_data, None if val is None else outputs(model, val, device))


# The zeroed model, what exact removal is checked against, runs on the first minibatches holding
# this many samples of the data (and of `val`), not on all of them: exact removal is exact by
# construction (§3) and this is its check, so on a large data set the prune costs its saliency pass
# and one forward of the pruned model, as a plain PyTorch script would (docs/benchmarks.md).
# Calibrated and aggressive removal compare on every sample: their calibration pass has them.
REMOVAL_CHECK_SAMPLES = 128


@dataclass
class _Stage:
    """A stage of a prune still to measure: the model as it was then (a copy, or the model itself
    for the last stage; None when nothing needs measuring), what is already known of its outputs,
    and how many samples it needs to run on (None: all)."""

    model: nn.Module | None
    known: _Outputs = field(default_factory=_Outputs)
    limit: int | None = None


def _measured(stages: Sequence[_Stage], data: Dataset | None, val: Dataset | None, device: str) -> list[_Outputs]:
    """Each stage's outputs on `data` and on `val`, reading each of them once (`outputs_together`):
    outputs already known are taken as they are, and a model in two stages runs once."""
    found = [replace(stage.known) for stage in stages]
    for part, dataset in (("data", data), ("val", val)):
        if dataset is None:
            continue
        todo = {id(st.model): st for st in stages if st.model is not None and getattr(st.known, part) is None}
        models = [st.model for st in todo.values() if st.model is not None]  # (all are: narrows the type)
        for key, out in zip(todo, outputs_together(models, dataset, device, [st.limit for st in todo.values()]), strict=True):
            for stage, outs in zip(stages, found, strict=True):
                if id(stage.model) == key and getattr(stage.known, part) is None:
                    setattr(outs, part, out)
    return found


def _zero_and_remove(
    model: nn.Module,
    scores: dict[str, torch.Tensor],
    example: torch.Tensor,
    data: Dataset | None,
    val: Dataset | None,
    device: str,
    *,
    granularity: Granularity,
    pct: float,
    removal: Removal,
    min_kernels_per_layer: int,
    original_out: _Outputs,
) -> tuple[dict[str, torch.Tensor], ChannelRemoval, _Stage, list[str]]:
    """§2-3 in place: zero the least salient kernels, then remove the channels that may go (kernel
    granularity); or remove the least salient channels (channel granularity). Returns the zeroing
    masks, what the removal did, the stage the removal is measured against (the zeroed model,
    kept as a copy where its outputs are still to measure, or the original for channel
    granularity) and the layers left with no kernel."""
    if granularity == "channel":
        with progress.stage("removing channels"):
            removed = remove_least_salient_channels(model, example, scores, pct)
        return {}, removed, _Stage(None, original_out), collapsed_layers(model)
    with progress.stage("zeroing"):
        masks = zero_least_salient(model, scores, pct, min_kernels_per_layer)
        collapsed = collapsed_layers(model)
    calibrates = data is not None and removal != "exact"  # removal's own pass gives the zeroed model's outputs on the data
    keep = val is not None or (data is not None and not calibrates)
    zeroed = copy.deepcopy(model) if keep else None  # one model more in memory, for one reading of the data less
    with progress.stage("removing channels"):
        removed = remove_dead_channels(model, example, data, device, removal)
    return masks, removed, _Stage(zeroed, _Outputs(removed.outputs_before), REMOVAL_CHECK_SAMPLES), collapsed


def _metric(data: Dataset | None, out: torch.Tensor | None) -> float | None:
    return None if data is None or out is None else metric(data, out)


def save_pruned(
    model: nn.Module,
    report: PruneReport,
    out: str | Path,
    *,
    arch: ArchSpec | None,
    history: list[dict[str, Any]] | None,
    seed: int,
    sample_shape: tuple[int, ...],
    preprocessing: Preprocessing | None = None,
    force: bool = False,
    then: Sequence[dict[str, Any]] = (),
) -> None:
    """The write stage of a prune: the model, with a `prune` step (the report, the seed and the
    input size) added to its history, then the steps in `then` (a fine-tune after the prune),
    and its input preprocessing for that size. Under torchrun only process 0 writes."""
    if rank_and_world()[0] != 0:
        return
    step = {"step": "prune", **{k: v for k, v in report.to_json().items() if k not in ("seconds", "out")}, "seed": seed, "input_size": list(sample_shape)}
    if preprocessing is not None:
        preprocessing = replace(preprocessing, channels=sample_shape[0], size=(sample_shape[1], sample_shape[2]))
    steps = [step, *then]
    with progress.stage("writing"):
        save_model(model, out, arch=arch, history=[*(history or []), *steps], report=steps[-1], preprocessing=preprocessing, force=force)


def _constant(out: torch.Tensor | None) -> bool | None:
    """Whether every sample's output equals the first one's (to float rounding)."""
    if out is None or len(out) < 2:
        return None
    spread = (out - out[:1]).abs().max()
    return bool(spread <= 1e-5 * out.abs().max().clamp_min(1e-12))


def _covered(a: torch.Tensor | None, b: torch.Tensor | None) -> int | None:
    return None if a is None or b is None else min(len(a), len(b))


def _max_change(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    """Over the samples both have: `b` (the zeroed model's) may cover only the first ones."""
    return None if a is None or b is None else float((a[: len(b)] - b).abs().max())


def _predictions_changed(a: torch.Tensor | None, b: torch.Tensor | None, data: Dataset | None) -> int | None:
    if a is None or b is None or data is None:
        return None
    a = a[: len(b)]
    if data.target_kind == "labels":
        return int((a.argmax(dim=1) != b.argmax(dim=1)).sum())
    return int(((a > 0) != (b > 0)).sum())
