"""docs/method.md §3: channel removal over torch-pruning's dependency graph, whoever chooses the channels.

The coupling of channels (residual additions, concatenations, depthwise convolutions, batch
norms, flatten→linear, squeeze-excitation products, layer-scale parameters) comes from
torch-pruning's `DependencyGraph`, which traces the autograd graph of one forward pass and
knows how to cut every member of a coupled group at once. This module holds what every way of
choosing channels shares: the traced `Graph`, the coupled groups that may lose channels at all
(`candidate_groups`, with their terminal readers), the shrinking of a choice to a cut a grouped
convolution and a channel shuffle can represent (`representable`), the folds of constants into
readers' biases, and carrying out a plan of cuts, undoing those that break the model
(`carry_out`, with `surgery.Surgeon`). Which channels go is decided by `dead_channels` (the
exact, calibrated and aggressive removal of channels that no longer matter), `channel_ranking`
(`--granularity channel`) and `remove_chosen_channels` (a caller's own choice).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from explainfix_cli.choices import Removal
from explainfix_cli.models import model_output
from explainfix_cli.pruning.grouped_convs import cut_grouped_inputs, is_depthwise, is_grouped
from explainfix_cli.pruning.shuffle import Crossing, Shuffle, find_shuffles, repair, symmetric
from explainfix_cli.pruning.surgery import (
    Cut,
    Surgeon,
    equal_split_parts,
    indices_fit,
    is_risky,
    output_check,
    reparameterised_convs,
    unsafe_nodes,
)
from explainfix_cli.pruning.tp_adapter import DependencyGraph, GroupItem


class KeptChannels:
    """The cuts channel removal made to one conv weight (O, I/groups, ...), in order, to cut the
    weight it had before (its original kernels, for `--fill`) the same way."""

    def __init__(self, m: nn.Conv2d):
        self.shape = tuple(m.weight.shape[:2])
        self.groups = m.groups
        self.cuts: list[tuple[bool, list[int]]] = []  # (output channels?, indices removed)

    def cut(self, item: GroupItem, DG: tp.DependencyGraph) -> None:
        m = item.dep.target.module
        self.cuts.append((DG.is_out_channel_pruning_fn(item.dep.handler) or is_depthwise(m), list(item.idxs)))

    def original(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` as it was before removal, cut to the kept channels: (O', I'/groups, ...)."""
        for out, idxs in self.cuts:
            if out:
                stays = torch.ones(len(weight), dtype=torch.bool)
                stays[idxs] = False
                weight = weight[stays]
            else:
                weight = cut_grouped_inputs(weight, self.groups, idxs)
        return weight

    @property
    def in_ids(self) -> torch.Tensor:
        """(O', I'/groups) per kept output channel, the original offset of every kept input."""
        return self.original(torch.arange(self.shape[1]).expand(*self.shape))



@dataclass
class ChannelRemoval:
    """What `remove_dead_channels` did."""

    removed: int = 0  # channels removed, counted once per coupled group
    folded: int = 0  # of those, channels whose constant output was folded into readers' biases
    blocked: Counter[str] = field(default_factory=Counter)  # groups left alone, by reason
    kept: dict[str, KeptChannels] = field(default_factory=dict)  # per Conv2d, by module name
    outputs_before: torch.Tensor | None = None  # the outputs before removal, from the calibration pass (calibrated, aggressive with data)

    def to_json(self) -> dict[str, object]:
        return {"removed": self.removed, "folded": self.folded, "blocked_groups": dict(sorted(self.blocked.items()))}



@dataclass
class Reader:
    """One terminal reader's view of a group: its local channel indices and their root indices."""

    module: nn.Module
    local: torch.Tensor  # (n,) channel (conv) or feature (linear) indices in the reader's input
    root: torch.Tensor  # (n,) the group-root channel each local index belongs to



NORM_ACROSS_CHANNELS = "normalisation across channels"  # a `blocked_groups` reason: a LayerNorm/GroupNorm reads the group


def _blocking_reason(group: tp.Group, DG: tp.DependencyGraph, removal: Removal) -> str | None:
    for item in group.items:
        node, module = item.dep.target, item.dep.target.module
        # the traced graph ends at the model's outputs: a node nothing reads is one of them,
        # unless the group only enters it as that layer's input
        if node.type == tp.ops.OPTYPE.OUTPUT or (not node.outputs and not _reads(item, DG)):
            return "reaches the model output"
        if is_grouped(module) and module.transposed:
            return "grouped transposed convolution"
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and removal != "aggressive":
            return NORM_ACROSS_CHANNELS
    return None



def _reads(item: GroupItem, DG: tp.DependencyGraph) -> bool:
    """Does the group enter this layer only as input? (A depthwise conv passes channels on.)"""
    module = item.dep.target.module
    return (
        DG.is_in_channel_pruning_fn(item.dep.handler)
        and isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))
        and not is_depthwise(module)
    )



def _terminal_readers(group: tp.Group, DG: tp.DependencyGraph) -> list[Reader]:
    return [
        Reader(item.dep.target.module, torch.tensor(item.idxs), torch.tensor(item.root_idxs))
        for item in group.items
        if _reads(item, DG)
    ]



def fold_constant(reader: Reader, positions: torch.Tensor, values: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """What the constant inputs `values` at `positions` add to the reader's bias: (reader, (O,)),
    added when the cut is made (`surgery.Surgeon`)."""
    w = reader.module.weight.detach()[:, reader.local[positions]]  # (O, n) or (O, n, kh, kw)
    return reader.module, (w.flatten(2).sum(dim=2) if w.dim() > 2 else w) @ values.to(w.dtype)  # (O,)



@dataclass
class Graph:
    """torch-pruning's dependency graph of a model, with its channel shuffles repaired."""

    DG: tp.DependencyGraph
    shuffles: list[Shuffle]
    unsafe: dict[tp.Node, str] = field(default_factory=dict)  # nodes no cut may pass, with the reason
    reparameterised: set[nn.Module] = field(default_factory=set)  # convs that read every input channel

    @classmethod
    def trace(cls, model: nn.Module, example: torch.Tensor) -> Graph:
        """Trace `model` on one example input."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            DG = DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
        shuffles = find_shuffles(DG)
        return cls(DG, shuffles, unsafe_nodes(DG, shuffles), reparameterised_convs(model))

    def groups(self) -> list[tuple[tp.Group, list[Crossing] | None]]:
        """Every coupled group of output channels of convolutions and linear layers, with the
        shuffles it crosses (None: crosses one in a way a cut cannot follow)."""
        roots = (nn.modules.conv._ConvNd, nn.Linear)
        result = []
        groups = self.DG.get_all_groups(root_module_types=roots)
        while True:
            try:
                group = next(groups)
            except StopIteration:
                return result
            except Exception:  # torch-pruning gave up on the rest: those channels stay
                return result
            if getattr(group, "tangled", False):
                result.append((group, None))
                continue
            crossings = repair(group, self.shuffles)
            if crossings is not None and not all(c.shuffle.whole(len(c.at_transpose.idxs)) for c in crossings):
                crossings = None  # the shuffled tensor also holds channels of other groups
            result.append((group, crossings))

    def group_of(self, root: nn.Module, idxs: list[int]) -> tp.Group:
        """The group that removing `idxs` from `root`'s output channels cuts, indices repaired."""
        group = self.DG.get_pruning_group(root, self.DG.get_pruner_of_module(root).prune_out_channels, idxs)
        if not getattr(group, "tangled", False):
            repair(group, self.shuffles)
        return group

    def unsafe_reason(self, group: tp.Group) -> str | None:
        """Why no cut of this group can be exact, if a member is a node `surgery` rules out."""
        if getattr(group, "tangled", False):
            return "coupling torch-pruning cannot enumerate"
        reason = next((self.unsafe[i.dep.target] for i in group.items if i.dep.target in self.unsafe), None)
        if reason is None and not indices_fit(group, self.DG):
            return "channel indices torch-pruning cannot map"
        return reason



def _balanced(removable: torch.Tensor, group: tp.Group, DG: tp.DependencyGraph) -> torch.Tensor:
    """Shrink `removable` (per root channel) until every grouped conv loses as many channels in
    each of its groups, the only cut an `nn.Conv2d(groups=g)` can represent. Keeping a channel is
    always exact, so this only gives up removals."""
    constraints = []
    for item in group.items:
        m = item.dep.target.module
        if is_grouped(m):
            size = (m.out_channels if DG.is_out_channel_pruning_fn(item.dep.handler) else m.in_channels) // m.groups
            local = torch.tensor(item.idxs)
            constraints.append((torch.tensor(item.root_idxs), local // size, m.groups))
    constraints += equal_split_parts(group)  # a chunk into equal parts: as many from each part
    removable = removable.clone()
    changed = bool(constraints)
    while changed:
        changed = False
        for root, conv_group, groups in constraints:
            chosen = removable[root]
            counts = torch.bincount(conv_group[chosen], minlength=groups)
            for g in (counts > counts.min()).nonzero().flatten().tolist():
                surplus = (chosen & (conv_group == g)).nonzero().flatten()[int(counts.min()) :]
                removable[root[surplus]] = False
                changed = True
    return removable



@dataclass
class Candidate:
    group: tp.Group
    readers: list[Reader]
    crossings: list[Crossing]



def candidate_groups(graph: Graph, removal: Removal, result: ChannelRemoval) -> list[Candidate]:
    """The groups whose channels may leave, with their terminal readers; the rest is counted as blocked."""
    candidates = []
    for group, crossings in graph.groups():
        reason = graph.unsafe_reason(group)
        if reason is None:
            reason = "channel shuffle of several groups" if crossings is None else _blocking_reason(group, graph.DG, removal)
        readers = _terminal_readers(group, graph.DG)
        if reason is None and not readers:
            reason = "no layer reads it"
        if reason is not None:
            result.blocked[reason] += 1
        else:
            candidates.append(Candidate(group, readers, crossings or []))
    return candidates



def representable(removable: torch.Tensor, c: Candidate, DG: tp.DependencyGraph) -> torch.Tensor:
    """Keep at least one channel; balance the cut across the groups of grouped convs and make it
    symmetric across the blocks of channel shuffles (both only give up removals)."""
    removable = removable.clone()
    if bool(removable.all()):
        removable[0] = False
    while True:
        shrunk = symmetric(_balanced(removable, c.group, DG), c.crossings)
        if torch.equal(shrunk, removable):
            return removable
        removable = shrunk



def traced(model: nn.Module, example: torch.Tensor, result: ChannelRemoval) -> Graph | None:
    """The model's graph; None (every channel stays, the reason counted) where torch-pruning fails."""
    try:
        return Graph.trace(model, example)
    except Exception as e:
        result.blocked[f"torch-pruning cannot trace the model ({type(e).__name__})"] += 1
        return None



def channel_params(group: tp.Group, DG: tp.DependencyGraph) -> torch.Tensor:
    """(n,) per root channel of a group, the parameters that leave with it: its row of every
    convolution or linear layer writing it, its column of every one reading it (all groups of a
    grouped convolution counted), its entries in batch norms."""
    params = torch.zeros(len(group.items[0].idxs), dtype=torch.float64)
    for item in group.items:
        m = item.dep.target.module
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            writes = DG.is_out_channel_pruning_fn(item.dep.handler)
            if is_depthwise(m) and not writes:
                continue  # a depthwise conv's channel is one filter, counted where it is written
            width = m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
            if not writes:
                width = m.in_channels if isinstance(m, nn.modules.conv._ConvNd) else m.in_features
            per = (m.weight.numel() + (m.bias.numel() if writes and m.bias is not None else 0)) / width
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            per = 2.0 if m.affine else 0.0
        else:
            continue
        params.index_add_(0, torch.tensor(item.root_idxs), torch.full((len(item.idxs),), float(per), dtype=torch.float64))
    return params



def remove_chosen_channels(
    model: nn.Module,
    example: torch.Tensor,
    choose: Callable[[list[Reader], torch.Tensor], torch.Tensor | None],
    means: dict[nn.Module, torch.Tensor] | None = None,
) -> ChannelRemoval:
    """Remove, in place, the channels a caller chooses: in every coupled group that may lose
    channels, `choose(readers, params)` gets the group's terminal readers (module, local input
    indices, their root channels) and, per root channel, the parameters that leave with it
    (`channel_params`, n root channels), and returns a (n,) mask of channels to remove, or None.
    Groups come in the same order for the same model. The
    cut is made representable as in `remove_least_salient_channels`; the output changes. With
    `means` (per reader, a value per input channel, e.g. its mean over data), a removed channel is
    replaced by that constant, folded into its readers' biases (exact where the channel is constant
    and the reader sees no zero padding, an approximation elsewhere)."""
    result = ChannelRemoval()
    graph = traced(model, example, result)
    plan: list[Cut] = []
    for candidate in candidate_groups(graph, "aggressive", result) if graph is not None else []:
        chosen = choose(candidate.readers, channel_params(candidate.group, graph.DG))
        if chosen is None:
            continue
        removable = representable(chosen, candidate, graph.DG)
        if not removable.any():
            continue
        cut = Cut(candidate.group.items[0].dep.target.module, removable.nonzero().flatten().tolist(), int(removable.sum()), risky=is_risky(candidate.group))
        for r in candidate.readers if means is not None else []:
            if isinstance(r.module, nn.modules.conv._ConvNd) and (r.module.transposed or r.module.groups != 1):
                continue  # their weights are not (O, I): no fold, the channel just leaves
            gone = removable[r.root].nonzero().flatten()
            if len(gone):
                cut.folds.append(fold_constant(r, gone, means[r.module][r.local[gone]]))
        plan.append(cut)
    result.kept = carry_out(model, graph, plan, "aggressive", example, result)
    return result



def carry_out(
    model: nn.Module, graph: Graph | None, plan: list[Cut], removal: Removal, example: torch.Tensor, result: ChannelRemoval
) -> dict[str, KeptChannels]:
    """Remove each group-root's channels in `plan` from every member of its group (with the folds
    that go with them), undoing every cut that breaks the model (`surgery.Surgeon`); counts the
    removed and folded channels, and the undone groups by reason, into `result`."""
    kept = {m: KeptChannels(m) for m in model.modules() if isinstance(m, nn.Conv2d)}
    if graph is not None and plan:
        with torch.no_grad():
            reference = model_output(model, example)  # the zeroed model's output: the cuts must keep it
        check = output_check(model, example, reference, removal == "exact", model_output)
        failed = Surgeon(model, graph, kept, check).run(plan)
        undone = {id(c) for c, _ in failed}
        for _, reason in failed:
            result.blocked[reason] += 1
        for c in plan:
            if id(c) not in undone:
                result.removed += c.removed
                result.folded += c.folded
    names = {m: name for name, m in model.named_modules()}
    return {names[m]: k for m, k in kept.items()}
