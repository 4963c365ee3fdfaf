"""docs/method.md §1-3 at many pcts for the cost of one: a model scored once, pruned on demand.

Scoring (docs/method.md §1) is the costly step of a prune and does not depend on the pct: §2 ranks all
kernels in one list, and `pct` only says how long a prefix of it is zeroed. `PruneCurve` scores a
model once and then prunes a fresh copy at any pct with `pruning.prune` itself (§2 zeroing, §3
channel removal, `--fill`), so each point of the curve is exactly the model `prune --pct` writes.
The sweep (`search.sweep`) and the search for a target (`search.target`) both walk it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from explainfix_cli.errors import UserError
from explainfix_cli.evaluation.measure import metric, metric_upper_bound, model_size, outputs
from explainfix_cli.io.data import Dataset
from explainfix_cli.models import model_output, spatial_convs
from explainfix_cli.numbers import finite
from explainfix_cli.pruning.channel_ranking import remove_least_salient_channels
from explainfix_cli.pruning.channels import ChannelRemoval
from explainfix_cli.pruning.dead_channels import has_dead_weights, remove_dead_channels
from explainfix_cli.pruning.pipeline import PruneReport, PruneSettings, prune, zero_least_salient
from explainfix_cli.saliency import spatial_saliency

BOUND_MARGIN = 1e-6  # a float32 metric may round above the exact bound


class PruneCurve:
    """A model scored once (§1) and pruned on demand at any pct, each time a fresh copy (§2-3).

    The model itself is left unchanged. `reference` holds its outputs on the data (from the
    saliency pass's own forwards), so no prune needs to run the unpruned model again. `settings`
    (or its fields as keyword options) say how to prune; what they say about writing, held-out
    data and fixing is dropped: each prune gives those itself (`prune(pct, out=..., fix=...)`).
    """

    def __init__(self, model: nn.Module, data: Dataset | None, settings: PruneSettings | None = None, **options: Any):
        s = PruneSettings.of(settings, options)
        sample_shape = tuple(data.x.shape[1:]) if data is not None else s.sample_shape
        if sample_shape is None:
            raise UserError("without data, give the `input_size` (C, H, W) to trace the model and count MACs.")
        self.model, self.data, self.device, self.sample_shape = model.eval().to(s.device), data, s.device, sample_shape
        seen: list[torch.Tensor] = []
        self.scores = s.scores if s.scores is not None else spatial_saliency(model, data, s.criterion, s.device, outputs=seen)
        self.reference = None if data is None else torch.cat(seen) if seen else outputs(model, data, s.device)
        self.settings = replace(
            s, scores=self.scores, sample_shape=sample_shape, reference_outputs=self.reference,
            fix=False, out=None, force=False, arch=None, history=None, val=None, preprocessing=None,
        )  # fmt: skip
        self.size = model_size(model, sample_shape)
        self.metric = None if self.reference is None or data is None else finite(metric(data, self.reference))
        self._zeroed: nn.Module | None = None  # a copy for `zeroed_metric`, and its spatial weights unzeroed
        self._weights: dict[str, torch.Tensor] = {}

    def prune(self, pct: float, **write: Any) -> tuple[nn.Module, PruneReport]:
        """`pruning.prune` on a copy at `pct`; `write` takes its writing options (out, fix, arch, ...)."""
        return prune(copy.deepcopy(self.model), self.data, replace(self.settings, pct=pct, **write))

    def point(self, pct: float) -> tuple[nn.Module, Point]:
        """A copy pruned at `pct` (§2 zeroing and §3 removal, no fill, filters left as they are)
        and its measurements, for one model's forward pass over the data where `prune` runs two
        (the zeroed model, and the removed one to compare with it). Exact removal needs no
        data (its constants follow from the structure) and does not change what the zeroed model
        computes (`prune` checks it and reports the difference, float rounding), so the metric is
        measured after the cut, on the smaller model. Calibrated removal measures the zeroed
        model's outputs on the data anyway, and does not change them there."""
        assert self.data is not None
        model = copy.deepcopy(self.model)
        example = self.data.x[:1].to(self.device)
        zeroed, removal = 0, self.settings.removal
        if self.settings.granularity == "kernel":
            masks = zero_least_salient(model, self.scores, pct, self.settings.min_kernels_per_layer)
            zeroed = sum(int(m.sum()) for m in masks.values())
            if removal == "exact" and not has_dead_weights(model):  # nothing can leave: no trace needed
                removed = ChannelRemoval()
            else:
                removed = remove_dead_channels(model, example, None if removal == "exact" else self.data, self.device, removal)
        else:
            removed = remove_least_salient_channels(model, example, self.scores, pct)
        calibrated = self.settings.granularity == "kernel" and removal == "calibrated"
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

    def zeroed_metric(self, pct: float, lowest: float = -math.inf, on: Dataset | None = None) -> float | None:
        """The metric of the model with only §2's zeroing at `pct`, no channel removal: to float
        rounding what `prune` writes with exact removal and no fill (removal does not change the
        outputs), for one forward pass over the data (or over `on`, other samples: a check split).
        The pass stops early, returning None, once the metric cannot reach `lowest` any more
        (`measure.metric_upper_bound`)."""
        data = self.data if on is None else on
        assert data is not None
        if self._zeroed is None:
            self._zeroed = copy.deepcopy(self.model)
            self._weights = {name: conv.weight.detach().clone() for name, conv in spatial_convs(self._zeroed)}
        with torch.no_grad():
            for name, conv in spatial_convs(self._zeroed):
                conv.weight.copy_(self._weights[name])
        zero_least_salient(self._zeroed, self.scores, pct, self.settings.min_kernels_per_layer)
        seen: list[torch.Tensor] = []
        with torch.no_grad():
            for x, _ in data:
                seen.append(model_output(self._zeroed, x.to(self.device)).cpu())
                if metric_upper_bound(data, torch.cat(seen)) < lowest - BOUND_MARGIN:
                    return None
        return finite(metric(data, torch.cat(seen)))


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

