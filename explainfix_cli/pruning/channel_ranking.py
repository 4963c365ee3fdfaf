"""docs/method.md §3, `--granularity channel`: rank whole channels by the saliency of their kernels and remove the least salient."""

from __future__ import annotations

import math

import torch
import torch_pruning as tp
from torch import nn

from explainfix_cli.pruning.channels import ChannelRemoval, candidate_groups, carry_out, representable, traced
from explainfix_cli.pruning.grouped_convs import by_input_channel, is_depthwise
from explainfix_cli.pruning.surgery import Cut, is_risky
from explainfix_cli.pruning.tp_adapter import module_name


def _channel_saliency(group: tp.Group, DG: tp.DependencyGraph, scores: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Per root channel, the summed saliency of every spatial kernel that reads or writes it."""
    total = torch.zeros(len(group.items[0].idxs), dtype=torch.float64)
    found = False
    for item in group.items:
        m = item.dep.target.module
        s = scores.get(module_name(DG, m))
        if s is None:
            continue
        found = True
        if DG.is_out_channel_pruning_fn(item.dep.handler) or is_depthwise(m):
            per_channel = s.sum(dim=1)  # (O,)
        else:
            per_channel = by_input_channel(s, m.groups).sum(dim=1)  # (I,)
        total.index_add_(0, torch.tensor(item.root_idxs), per_channel[list(item.idxs)].double())
    return total if found else None



def remove_least_salient_channels(
    model: nn.Module, example: torch.Tensor, scores: dict[str, torch.Tensor], pct: float
) -> ChannelRemoval:
    """`--granularity channel` (docs/method.md §3): in every coupled group that holds spatial kernels,
    remove the `floor(pct/100 * channels)` channels of least summed kernel saliency (ties: lower
    index first). The output changes; the caller measures by how much."""
    result = ChannelRemoval()
    graph = traced(model, example, result)
    plan: list[Cut] = []
    for candidate in candidate_groups(graph, "aggressive", result) if graph is not None else []:
        group = candidate.group
        saliency = _channel_saliency(group, graph.DG, scores)
        if saliency is None:
            continue
        removable = torch.zeros(len(saliency), dtype=torch.bool)
        removable[torch.sort(saliency, stable=True).indices[: math.floor(pct / 100 * len(saliency))]] = True
        removable = representable(removable, candidate, graph.DG)
        if removable.any():
            plan.append(Cut(group.items[0].dep.target.module, removable.nonzero().flatten().tolist(), int(removable.sum()), risky=is_risky(group)))
    result.kept = carry_out(model, graph, plan, "aggressive", example, result)
    return result
