"""METHOD.md §2 (zeroing the least salient kernels) and the whole prune: §1 → §2 → §3 → §4."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .channels import ChannelRemoval, Removal, remove_dead_channels, remove_least_salient_channels
from .checkpoints import ArchSpec, save_model
from .data import Dataset
from .errors import UserError
from .fixed import fix_spatial_filters
from .measure import metric, model_size, outputs
from .outputs import check_target
from .saliency import Criterion, require_spatial_convs, spatial_saliency

Fill = Literal["zero", "reset", "fillzero"]
Granularity = Literal["kernel", "channel"]


def zero_least_salient(model: nn.Module, scores: dict[str, torch.Tensor], pct: float) -> dict[str, torch.Tensor]:
    """Zero the `floor(pct/100 * total)` least salient spatial kernels of the whole model (§2).

    One global ranking, ascending; ties broken by layer order, then o, then i (a stable sort of
    the scores laid out in that order). Returns per layer the (O, I/groups) mask of zeroed kernels.
    """
    if not 0 <= pct < 100:
        raise UserError(f"--pct must be in [0, 100), not {pct}.")
    convs = require_spatial_convs(model)
    flat = torch.cat([scores[name].double().flatten() for name, _ in convs])  # layer, then o, then i
    chosen = _smallest_first(flat, math.floor(pct / 100 * len(flat)))
    masks, start = {}, 0
    for name, conv in convs:
        n = conv.weight.shape[0] * conv.weight.shape[1]
        masks[name] = chosen[start : start + n].reshape(conv.weight.shape[:2])  # (O, I/groups)
        start += n
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


def fill_zeroed(model: nn.Module, original: dict[str, torch.Tensor], fill: Fill, generator: torch.Generator) -> int:
    """Handle the zeroed kernels that stayed in the model (§3 `--fill`); returns how many were refilled.

    `original` holds each spatial conv's weight before zeroing, already cut to the channels that
    remain. `reset` restores those values; `fillzero` redraws the zeroed entries of partly-zero
    kernels from a normal with that kernel's mean and std, and all-zero kernels from PyTorch's
    default Kaiming-uniform.
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
            all_zero = (w == 0).flatten(2).all(dim=2) & touched
            partly = touched & ~all_zero
            flat = old.flatten(2)  # (O, I/groups, kh*kw)
            mean, std = flat.mean(dim=2), flat.std(dim=2, unbiased=False)
            noise = torch.randn(w.shape, generator=generator)
            drawn = mean[..., None, None] + std[..., None, None] * noise
            w[zero_entries & partly[..., None, None]] = drawn[zero_entries & partly[..., None, None]]
            bound = 1 / math.sqrt(w[0].numel())  # kaiming_uniform_(a=sqrt(5)) as in nn.Conv2d.reset_parameters
            uniform = (torch.rand(w.shape, generator=generator) * 2 - 1) * bound
            w[all_zero] = uniform[all_zero]
    return refilled


@dataclass
class PruneReport:
    """Everything `prune` measured (PRODUCT.md: `prune --json` fields)."""

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
    pct: float
    granularity: str
    criterion: str
    fill: str
    removal: str
    fixed_tensors: int
    seconds: float
    out: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def prune(
    model: nn.Module,
    data: Dataset | None,
    *,
    pct: float = 50.0,
    granularity: Granularity = "kernel",
    criterion: Criterion = "gradient",
    scores: dict[str, torch.Tensor] | None = None,
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
    reference_outputs: torch.Tensor | None = None,
) -> tuple[nn.Module, PruneReport]:
    """METHOD §1-4 end to end: score, zero, remove channels, fill, fix, and write to `out`.

    With `granularity="channel"` whole channels are ranked and removed instead (§3), and
    `max_logit_change` compares with the original model. `model` is changed in place and returned. Without data, `sample_shape` (C, H, W) gives the
    input size for tracing and MACs, and no output-based numbers are reported.
    `reference_outputs`, the unpruned model's outputs on `data` when the caller already has them
    (a sweep that scores once and prunes many copies), saves a forward pass over the data.
    """
    start = time.perf_counter()
    if not 0 <= pct < 100:
        raise UserError(f"--pct must be in [0, 100), not {pct}.")
    if out is not None:
        check_target(Path(out), force)
    if data is not None:
        sample_shape = tuple(data.x.shape[1:])
    if sample_shape is None:
        raise UserError("without --data, give the input size with --input-size C,H,W.")
    torch.manual_seed(seed)
    model.eval().to(device)
    convs = require_spatial_convs(model)
    seen: list[torch.Tensor] = []  # the saliency passes' outputs: the original model's
    if scores is None:
        scores = spatial_saliency(model, data, criterion, device, outputs=seen)
    before = model_size(model, sample_shape)
    if data is None:
        out_before = None
    else:
        out_before = torch.cat(seen) if seen else reference_outputs if reference_outputs is not None else outputs(model, data, device)

    original = {name: conv.weight.detach().clone() for name, conv in convs} if fill != "zero" else {}
    example = (data.x[:1] if data is not None else torch.zeros(1, *sample_shape)).to(device)
    removed: ChannelRemoval
    if granularity == "kernel":
        masks = zero_least_salient(model, scores, pct)
        removed = remove_dead_channels(model, example, data, device, removal)
        out_zeroed = removed.outputs_before
    else:  # nothing is zeroed: the removal is measured against the original model
        masks, out_zeroed = {}, out_before
        removed = remove_least_salient_channels(model, example, scores, pct)
    out_removed = outputs(model, data, device) if data is not None else None
    remaining = {name: removed.kept[name].original(w) for name, w in original.items()}
    fill_zeroed(model, remaining, fill, torch.Generator().manual_seed(seed))

    fixed = fix_spatial_filters(model) if fix else []
    after = model_size(model, sample_shape)
    out_after = out_removed if fill == "zero" or data is None else outputs(model, data, device)
    report = PruneReport(
        params_before=before.params,
        params_after=after.params,
        spatial_kernels_before=before.spatial_kernels,
        spatial_kernels_after=after.spatial_kernels,
        zeroed_kernels=sum(int(m.sum()) for m in masks.values()),
        channels_removed=removed.removed,
        channels_folded=removed.folded,
        blocked_groups=dict(sorted(removed.blocked.items())),
        macs_before=before.macs,
        macs_after=after.macs,
        max_logit_change=_max_change(out_removed, out_zeroed),
        predictions_changed=_predictions_changed(out_removed, out_zeroed, data),
        metric=data.metric_name if data is not None else None,
        metric_before=metric(data, out_before) if data is not None and out_before is not None else None,
        metric_after=metric(data, out_after) if data is not None and out_after is not None else None,
        pct=pct,
        granularity=granularity,
        criterion=criterion,
        fill=fill,
        removal=removal,
        fixed_tensors=len(fixed),
        seconds=0.0,
        out=str(out) if out is not None else None,
    )
    if out is not None:
        step = {"step": "prune", **{k: v for k, v in report.to_json().items() if k not in ("seconds", "out")}, "seed": seed, "input_size": list(sample_shape)}
        save_model(model, out, arch=arch, history=[*(history or []), step], report=step, force=force)
    report.seconds = round(time.perf_counter() - start, 3)
    return model, report


def _max_change(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    return None if a is None or b is None else float((a - b).abs().max())


def _predictions_changed(a: torch.Tensor | None, b: torch.Tensor | None, data: Dataset | None) -> int | None:
    if a is None or b is None or data is None:
        return None
    if data.target_kind == "labels":
        return int((a.argmax(dim=1) != b.argmax(dim=1)).sum())
    return int(((a > 0) != (b > 0)).sum())
