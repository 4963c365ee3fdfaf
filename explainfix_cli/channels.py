"""METHOD.md §3: remove channels that no longer affect the output, over a dependency graph.

The coupling of channels (residual additions, concatenations, depthwise convolutions, batch
norms, flatten→linear, squeeze-excitation products, layer-scale parameters) comes from
torch-pruning's `DependencyGraph`, which traces the autograd graph of one forward pass and
knows how to cut every member of a coupled group at once. This module decides *which* channels
may go, and keeps the removal exact:

- a channel goes when every layer that reads it (its *terminal readers*: convolutions and
  linear layers whose output is not itself in the group) either ignores it (its kernels or
  columns for that channel are all zero) or receives it as a constant that can be folded
  exactly into that reader's bias (the constant is measured on the user's data: a channel whose
  writers are all silent carries conv bias → batch-norm shift → activation, the same value
  everywhere);
- groups whose removal cannot be exact are left alone, with the reason reported: channels that
  reach the model output, grouped (non-depthwise) convolutions, normalisation across channels
  (GroupNorm, LayerNorm), and permutations of the channel axis (channel shuffle).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning._helpers import GroupItem

from .data import Dataset
from .saliency import model_output

# relative spread below which a measured channel counts as constant (a silent channel is constant
# to the last bit; the tolerance only absorbs summation order in pooling)
CONSTANT_TOLERANCE = 1e-6


@dataclass
class ChannelRemoval:
    """What `remove_dead_channels` did."""

    removed: int = 0  # channels removed, counted once per coupled group
    folded: int = 0  # of those, channels whose constant output was folded into readers' biases
    blocked: Counter[str] = field(default_factory=Counter)  # groups left alone, by reason
    # per conv (by module name): the original indices of the output and input channels it kept
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {"removed": self.removed, "folded": self.folded, "blocked_groups": dict(sorted(self.blocked.items()))}


@dataclass
class _Reader:
    """One terminal reader's view of a group: its local channel indices and their root indices."""

    module: nn.Module
    local: torch.Tensor  # (n,) channel (conv) or feature (linear) indices in the reader's input
    root: torch.Tensor  # (n,) the group-root channel each local index belongs to


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.in_channels == m.out_channels and m.groups > 1


def _is_grouped(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and not _is_depthwise(m)


def _blocking_reason(group: tp.Group, DG: tp.DependencyGraph) -> str | None:
    for item in group.items:
        node, module = item.dep.target, item.dep.target.module
        # the traced graph ends at the model's outputs: a node nothing reads is one of them,
        # unless the group only enters it as that layer's input
        if node.type == tp.ops.OPTYPE.OUTPUT or (not node.outputs and not _reads(item, DG)):
            return "reaches the model output"
        if _is_grouped(module):
            return "grouped convolution"
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
            return "normalisation across channels"
        if node.type == tp.ops.OPTYPE.ELEMENTWISE and any(k in str(module) for k in ("Transpose", "Permute")):
            return "channel permutation (e.g. channel shuffle)"
    return None


def _reads(item: GroupItem, DG: tp.DependencyGraph) -> bool:
    """Does the group enter this layer only as input? (A depthwise conv passes channels on.)"""
    module = item.dep.target.module
    return (
        DG.is_in_channel_pruning_fn(item.dep.handler)
        and isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))
        and not _is_depthwise(module)
    )


def _terminal_readers(group: tp.Group, DG: tp.DependencyGraph) -> list[_Reader]:
    return [
        _Reader(item.dep.target.module, torch.tensor(item.idxs), torch.tensor(item.root_idxs))
        for item in group.items
        if _reads(item, DG)
    ]


def _ignored(reader: _Reader) -> torch.Tensor:
    """(n,) True where the reader's weights for that input channel are all zero."""
    w = reader.module.weight.detach()
    if isinstance(reader.module, nn.Linear):
        return (w[:, reader.local] == 0).all(dim=0)
    if reader.module.transposed:  # (I, O/groups, kh, kw)
        return (w[reader.local] == 0).flatten(1).all(dim=1)
    return (w[:, reader.local] == 0).transpose(0, 1).flatten(1).all(dim=1)  # (O, I, kh, kw) -> (n,)


def _fold_is_exact(m: nn.Module) -> bool:
    """A constant input maps to a constant added to every output: linear layers, and convolutions
    that never see padding zeros (padding 0, or reflect/replicate/circular padding)."""
    if isinstance(m, nn.Linear):
        return True
    if m.transposed or m.groups != 1:
        return False
    return m.padding_mode != "zeros" or all(p == 0 for p in m.padding)  # type: ignore[union-attr]


class _InputRange:
    """Per-channel min and max of the inputs that some modules receive, over a data set."""

    def __init__(self, modules: Iterable[nn.Module]):
        self.low: dict[nn.Module, torch.Tensor] = {}
        self.high: dict[nn.Module, torch.Tensor] = {}
        self._modules = list(dict.fromkeys(modules))

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach()
        # channels: dim 1 of a conv input (N, C, ...), last dim of a linear input (..., F)
        per_channel = x.transpose(0, 1).flatten(1) if isinstance(module, nn.modules.conv._ConvNd) else x.flatten(0, -2).T
        lo, hi = per_channel.amin(dim=1).cpu(), per_channel.amax(dim=1).cpu()
        if module in self.low:
            lo, hi = torch.minimum(lo, self.low[module]), torch.maximum(hi, self.high[module])
        self.low[module], self.high[module] = lo, hi

    @torch.no_grad()
    def measure(self, model: nn.Module, data: Dataset, device: str) -> None:
        hooks = [m.register_forward_pre_hook(self._hook) for m in self._modules]
        try:
            for x, _ in data:
                model_output(model, x.to(device))
        finally:
            for h in hooks:
                h.remove()

    def constants(self, module: nn.Module, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(is_constant, value) per local index; unknown (no data) counts as not constant."""
        if module not in self.low:
            return torch.zeros(len(local), dtype=torch.bool), torch.zeros(len(local))
        lo, hi = self.low[module][local], self.high[module][local]
        const = (hi - lo) <= CONSTANT_TOLERANCE * (1 + hi.abs())
        return const, torch.where(const, (hi + lo) / 2, torch.zeros_like(lo))


def _fold(reader: _Reader, positions: torch.Tensor, values: torch.Tensor) -> None:
    """Add the contribution of constant inputs `values` at `positions` to the reader's bias."""
    m = reader.module
    w = m.weight.detach()[:, reader.local[positions]]  # (O, n) or (O, n, kh, kw)
    delta = (w.flatten(2).sum(dim=2) if w.dim() > 2 else w) @ values.to(w.dtype)  # (O,)
    if m.bias is None:
        m.bias = nn.Parameter(torch.zeros_like(delta))
    with torch.no_grad():
        m.bias += delta


def build_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of `model`, traced on one example input."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)


def channel_groups(DG: tp.DependencyGraph) -> list[tp.Group]:
    """Every coupled group of output channels of convolutions and linear layers."""
    roots = (nn.modules.conv._ConvNd, nn.Linear)
    return list(DG.get_all_groups(root_module_types=roots))


def remove_dead_channels(
    model: nn.Module,
    example: torch.Tensor,
    data: Dataset | None,
    device: str = "cpu",
) -> ChannelRemoval:
    """Remove, in place, every channel whose removal is exact (see the module docstring)."""
    DG = build_graph(model, example)
    result = ChannelRemoval()
    candidates: list[tuple[tp.Group, list[_Reader]]] = []
    for group in channel_groups(DG):
        reason = _blocking_reason(group, DG)
        readers = _terminal_readers(group, DG)
        if reason is None and not readers:
            reason = "no layer reads it"
        if reason is not None:
            result.blocked[reason] += 1
        else:
            candidates.append((group, readers))
    ranges = _InputRange(r.module for _, readers in candidates for r in readers)
    if data is not None:
        ranges.measure(model, data, device)

    plan: list[tuple[nn.Module, list[int]]] = []
    for group, readers in candidates:
        n_root = len(group.items[0].idxs)
        blocked = torch.zeros(n_root, dtype=torch.long)  # per root channel: readers that still need it
        decisions = []
        for r in readers:
            ignored = _ignored(r)
            const, value = ranges.constants(r.module, r.local)
            foldable = const & _fold_is_exact(r.module)
            blocked.index_add_(0, r.root, (~(ignored | foldable)).long())
            decisions.append((r, ignored, value))
        removable = (blocked == 0).nonzero().flatten()
        if len(removable) == n_root:  # a layer needs at least one channel: keep the first
            removable = removable[1:]
        if len(removable) == 0:
            continue
        is_removed = torch.zeros(n_root, dtype=torch.bool)
        is_removed[removable] = True
        folded = torch.zeros(n_root, dtype=torch.bool)
        for r, ignored, value in decisions:
            to_fold = (is_removed[r.root] & ~ignored).nonzero().flatten()
            if len(to_fold):
                _fold(r, to_fold, value[to_fold])
                folded[r.root[to_fold]] = True
        plan.append((group.items[0].dep.target.module, removable.tolist()))
        result.removed += len(removable)
        result.folded += int(folded.sum())

    kept = {m: [torch.arange(m.weight.shape[0]), torch.arange(m.weight.shape[1])] for m in model.modules()
            if isinstance(m, nn.modules.conv._ConvNd)}
    for root, idxs in plan:
        group = DG.get_pruning_group(root, DG.get_pruner_of_module(root).prune_out_channels, idxs)
        _track_kept(kept, group, DG)
        group.prune()
    names = {m: name for name, m in model.named_modules()}
    result.kept = {names[m]: (ids[0], ids[1]) for m, ids in kept.items()}
    return result


def _track_kept(kept: dict[nn.Module, list[torch.Tensor]], group: tp.Group, DG: tp.DependencyGraph) -> None:
    """Mirror the group's cuts on the original-index vectors of each conv weight's first two dims."""
    for item in group.items:
        m = item.dep.target.module
        if m not in kept:
            continue
        is_out = DG.is_out_channel_pruning_fn(item.dep.handler)
        # weight layout: conv (O, I/groups, ...), transposed conv (I, O/groups, ...); depthwise has I/groups = 1
        dim = int(is_out == m.transposed)
        if dim == 1 and _is_depthwise(m):
            continue
        ids = kept[m][dim]
        stays = torch.ones(len(ids), dtype=torch.bool)
        stays[list(item.idxs)] = False
        kept[m][dim] = ids[stays]
