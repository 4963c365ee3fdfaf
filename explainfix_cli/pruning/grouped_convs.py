"""docs/method.md §3: the geometry of grouped and depthwise convolutions, for cutting their channels.

A grouped convolution's weight is (O, I/groups, ...): input channel `g * I/groups + j` is read by
the rows of group g at column j. torch-pruning cuts every group at the same offsets; a cut that
removes other offsets per group (each group losing as many, `channels.representable`) re-cuts the
weight here, from a copy taken before torch-pruning ran (`surgery.Surgeon`).
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.in_channels == m.out_channels and m.groups > 1



def is_grouped(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and not is_depthwise(m)



def by_input_channel(w: torch.Tensor, groups: int) -> torch.Tensor:
    """(O, I/groups, ...) -> (I, O/groups, ...): for each input channel, the weights that read it
    (input channel g * I/groups + j is read by the rows of group g, at column j)."""
    o, per_group = w.shape[:2]
    return w.reshape(groups, o // groups, per_group, *w.shape[2:]).transpose(1, 2).flatten(0, 1)



def cut_grouped_inputs(t: torch.Tensor, groups: int, idxs: list[int]) -> torch.Tensor:
    """Remove input channels `idxs` (indices into I) from a (O, I/groups, ...) tensor, group by group
    (every group loses as many: `channels.representable` balances the cut)."""
    o, per_group, rest = t.shape[0], t.shape[1], t.shape[2:]
    keep = torch.ones(groups, per_group, dtype=torch.bool)
    keep.view(-1)[idxs] = False
    n = int(keep[0].sum())
    columns = keep.nonzero()[:, 1].reshape(groups, 1, n, *[1] * len(rest))  # per group, the kept offsets
    blocks = t.reshape(groups, o // groups, per_group, *rest)
    return blocks.gather(2, columns.expand(groups, o // groups, n, *rest)).reshape(o, n, *rest)



def grouped_input_cuts(group: tp.Group, DG: tp.DependencyGraph) -> list[tuple[nn.Module, torch.Tensor, list[int]]]:
    return [
        (item.dep.target.module, item.dep.target.module.weight.detach().clone(), list(item.idxs))
        for item in group.items
        if is_grouped(item.dep.target.module) and not DG.is_out_channel_pruning_fn(item.dep.handler)
    ]
