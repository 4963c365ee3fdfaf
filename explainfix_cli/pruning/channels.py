"""docs/method.md §3: remove channels that no longer affect the output, over a dependency graph.

The coupling of channels (residual additions, concatenations, depthwise convolutions, batch
norms, flatten→linear, squeeze-excitation products, layer-scale parameters) comes from
torch-pruning's `DependencyGraph`, which traces the autograd graph of one forward pass and
knows how to cut every member of a coupled group at once. This module decides *which* channels
may go, and keeps the removal exact:

- a channel goes when every layer that reads it (its *terminal readers*: convolutions and
  linear layers whose output is not itself in the group) either ignores it (its kernels or
  columns for that channel are all zero) or receives it as a constant that can be folded
  exactly into that reader's bias. Under `exact` removal a constant must hold for every input:
  every layer writing the channel is silent (all-zero weights), so it carries conv bias →
  batch-norm shift → activation, the same value whatever the input; its value is read off two
  unrelated inputs (a data sample and noise), which must agree. `calibrated` removal also folds
  channels that are merely constant on the calibration data (a ReLU dead on every sample seen):
  exact on that data only (docs/method.md §3);
- a cut must also be representable: a grouped convolution loses as many channels in each of
  its groups (torch-pruning cuts every group at the same offsets; the weight is re-cut per
  group), and a channel shuffle loses the same offsets from each of its blocks (`shuffle.py`);
- groups whose removal cannot be exact are left whole, with the reason reported: channels that
  reach the model output, normalisation across channels (GroupNorm, LayerNorm), shuffles that
  mix several coupled groups, grouped transposed convolutions, and what `surgery.py` finds a
  cut cannot follow (reshapes of the channel axis, splits into unequal sizes, ...);
- every cut is checked and undone if it breaks the model (`surgery.py`).

`remove_least_salient_channels` is the `--granularity channel` variant: it ranks channels instead.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from explainfix_cli.choices import Removal
from explainfix_cli.evaluation.measure import outputs
from explainfix_cli.io.data import Dataset
from explainfix_cli.models import model_output
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
from explainfix_cli.pruning.tp_adapter import DependencyGraph, GroupItem, module_name

# relative spread below which a measured channel counts as constant (a silent channel is constant
# to the last bit; the tolerance only absorbs summation order in pooling)
CONSTANT_TOLERANCE = 1e-6


class KeptChannels:
    """The cuts channel removal made to one conv weight (O, I/groups, ...), in order, to cut the
    weight it had before (its original kernels, for `--fill`) the same way."""

    def __init__(self, m: nn.Conv2d):
        self.shape = tuple(m.weight.shape[:2])
        self.groups = m.groups
        self.cuts: list[tuple[bool, list[int]]] = []  # (output channels?, indices removed)

    def cut(self, item: GroupItem, DG: tp.DependencyGraph) -> None:
        m = item.dep.target.module
        self.cuts.append((DG.is_out_channel_pruning_fn(item.dep.handler) or _is_depthwise(m), list(item.idxs)))

    def original(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` as it was before removal, cut to the kept channels: (O', I'/groups, ...)."""
        for out, idxs in self.cuts:
            if out:
                stays = torch.ones(len(weight), dtype=torch.bool)
                stays[idxs] = False
                weight = weight[stays]
            else:
                weight = _cut_grouped_inputs(weight, self.groups, idxs)
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
    outputs_before: torch.Tensor | None = None  # the model's outputs on the data before removal, if measured

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


def _blocking_reason(group: tp.Group, DG: tp.DependencyGraph, removal: Removal) -> str | None:
    for item in group.items:
        node, module = item.dep.target, item.dep.target.module
        # the traced graph ends at the model's outputs: a node nothing reads is one of them,
        # unless the group only enters it as that layer's input
        if node.type == tp.ops.OPTYPE.OUTPUT or (not node.outputs and not _reads(item, DG)):
            return "reaches the model output"
        if _is_grouped(module) and module.transposed:
            return "grouped transposed convolution"
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and removal != "aggressive":
            return "normalisation across channels"
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
    if not reader.module.transposed:  # transposed weights are already (I, O/groups, kh, kw)
        w = _by_input_channel(w, reader.module.groups)
    return (w[reader.local] == 0).flatten(1).all(dim=1)


def _by_input_channel(w: torch.Tensor, groups: int) -> torch.Tensor:
    """(O, I/groups, ...) -> (I, O/groups, ...): for each input channel, the weights that read it
    (input channel g * I/groups + j is read by the rows of group g, at column j)."""
    o, per_group = w.shape[:2]
    return w.reshape(groups, o // groups, per_group, *w.shape[2:]).transpose(1, 2).flatten(0, 1)


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
    def measure(self, model: nn.Module, batches: Iterable[torch.Tensor], device: str) -> torch.Tensor:
        """Run the inputs through `model`, recording the ranges; returns the outputs (on the CPU)."""
        hooks = [m.register_forward_pre_hook(self._hook) for m in self._modules]
        try:
            return torch.cat([model_output(model, x.to(device)).cpu() for x in batches])
        finally:
            for h in hooks:
                h.remove()

    def constants(self, module: nn.Module, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(is_constant, value) per local index; unknown (no data) counts as not constant."""
        if module not in self.low:
            return torch.zeros(len(local), dtype=torch.bool), torch.zeros(len(local))
        lo, hi = self.low[module][local], self.high[module][local]
        # relative to the channel's own magnitude: an absolute floor would call every channel of
        # small activations (say 1e-9, as in a randomly initialised MobileNetV3) constant
        const = (hi - lo) <= CONSTANT_TOLERANCE * torch.maximum(hi.abs(), lo.abs())
        return const, torch.where(const, (hi + lo) / 2, torch.zeros_like(lo))


def _probe(example: torch.Tensor) -> torch.Tensor:
    """(2, ...) the example and a noise input of its scale: a channel that is constant across
    both and has silent writers does not depend on the input."""
    noise = torch.randn(example[:1].shape, generator=torch.Generator().manual_seed(0)).to(example)
    return torch.cat([example[:1], noise * example.std().clamp_min(1.0) + example.mean()])


def _fold(reader: _Reader, positions: torch.Tensor, values: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
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
        if _is_grouped(m):
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


def _writes(item: GroupItem, DG: tp.DependencyGraph) -> bool:
    m = item.dep.target.module
    return isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and (DG.is_out_channel_pruning_fn(item.dep.handler) or _is_depthwise(m))


def _silent(group: tp.Group, DG: tp.DependencyGraph, n_root: int, only: set[nn.Module] | None = None) -> torch.Tensor:
    """(n_root,) True where every conv or linear layer writing the channel (of those in `only`,
    if given) has all-zero weights for it, and at least one does."""
    silent = torch.ones(n_root, dtype=torch.bool)
    written = torch.zeros(n_root, dtype=torch.bool)
    for item in group.items:
        m = item.dep.target.module
        if _writes(item, DG) and (only is None or m in only):
            w = m.weight.detach().transpose(0, 1) if getattr(m, "transposed", False) else m.weight.detach()
            zero = (w[list(item.idxs)] == 0).flatten(1).all(dim=1)  # (n,) per written channel
            root = torch.tensor(item.root_idxs)
            silent[root[~zero]] = False
            written[root] = True
    return silent & written


def _parameters_only(node: tp.Node) -> bool:
    """A source made of parameters alone (a linear layer's transposed weight): the same for every
    input. The model's input shows as a missing autograd edge and does not count."""
    edges = getattr(node.grad_fn, "next_functions", ())
    return bool(edges) and all(fn is not None and type(fn).__name__ == "AccumulateGrad" for fn, _ in edges)


def _nearest_writers(reader: nn.Module, group: tp.Group, DG: tp.DependencyGraph) -> set[nn.Module] | None:
    """The members of `group` that write what `reader` reads with no other convolution or linear
    layer in between (a depthwise conv is one). None when another source reaches the reader
    through channel-wise operations (the model's input, a parameter, a layer outside the group
    combined by a product or sum): its channels cannot be silent. Sources behind a concatenation
    that are not members fill other slices of it and do not count."""
    members = {item.dep.target.module for item in group.items if _writes(item, DG)}
    writers: set[nn.Module] = set()
    seen: set[tp.Node] = set()
    stack = [(node, False) for node in DG.module2node[reader].inputs]  # (node, behind a concatenation?)
    while stack:
        node, behind_cat = stack.pop()
        if (node, behind_cat) in seen:
            continue
        seen.add((node, behind_cat))
        if isinstance(node.module, (nn.modules.conv._ConvNd, nn.Linear)):
            if node.module in members:
                writers.add(node.module)
            elif not behind_cat:
                return None
        elif not node.inputs:
            if not (behind_cat or _parameters_only(node)):
                return None
        else:
            behind_cat = behind_cat or node.type == tp.ops.OPTYPE.CONCAT
            stack.extend((n, behind_cat) for n in node.inputs)
    return writers


@dataclass
class _Candidate:
    group: tp.Group
    readers: list[_Reader]
    crossings: list[Crossing]


def _candidates(graph: Graph, removal: Removal, result: ChannelRemoval) -> list[_Candidate]:
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
            candidates.append(_Candidate(group, readers, crossings or []))
    return candidates


def _representable(removable: torch.Tensor, c: _Candidate, DG: tp.DependencyGraph) -> torch.Tensor:
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


def has_dead_weights(model: nn.Module) -> bool:
    """Does some convolution or linear layer have an all-zero output channel or an input channel
    all its weights ignore? Without one, removal by structure (exact, or aggressive without data)
    finds nothing to remove: every channel has a writer that is not silent and a reader that needs
    it (`_silent`, `_ignored`), so a caller that only needs the count may skip the trace. With data,
    calibrated and aggressive removal also take channels that are constant on it, dead weights or not."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            w = m.weight.detach() == 0  # (O, I)
            if bool(w.all(dim=1).any() or w.all(dim=0).any()):
                return True
        elif isinstance(m, nn.modules.conv._ConvNd):
            w = m.weight.detach() == 0  # (O, I/groups, ...); transposed: (I, O/groups, ...)
            by_input = w if m.transposed else _by_input_channel(w, m.groups)  # (I, ...)
            by_output = _by_input_channel(w, m.groups) if m.transposed else w  # (O, ...)
            if bool(by_input.flatten(1).all(dim=1).any() or by_output.flatten(1).all(dim=1).any()):
                return True
    return False


def remove_dead_channels(
    model: nn.Module,
    example: torch.Tensor,
    data: Dataset | None,
    device: str = "cpu",
    removal: Removal = "exact",
) -> ChannelRemoval:
    """Remove, in place, every channel whose removal is exact (see the module docstring).

    `removal="calibrated"` also folds channels that are constant on `data` only. `"aggressive"`
    adds the paper's original rule: a channel also goes when all its writers are silent, whatever
    reads it, with no fold where a fold would not be exact, and normalisation across channels does
    not stop it (for users who fine-tune afterwards). Each mode removes everything the one before
    removes, folded the same way, and more. Without `data` only silent channels count as constant.
    """
    result = ChannelRemoval()
    graph = _trace(model, example, result)
    candidates = _candidates(graph, removal, result) if graph is not None else []
    ranges = _InputRange(r.module for c in candidates for r in c.readers)
    by_structure = removal == "exact" or data is None  # only silent channels count as constant
    if by_structure:  # their constants, read off two unrelated inputs
        ranges.measure(model, [_probe(example)], device)
        if data is not None:
            result.outputs_before = outputs(model, data, device)
    else:  # one pass over the calibration data: reader input ranges, and the outputs to compare with afterwards
        result.outputs_before = ranges.measure(model, (x for x, _ in data), device)
    if graph is None:
        result.kept = _cut(model, None, [], removal, example, result)
        return result

    plan: list[Cut] = []
    for candidate in candidates:
        group, readers = candidate.group, candidate.readers
        n_root = len(group.items[0].idxs)
        needed = torch.zeros(n_root, dtype=torch.long)  # per root channel: readers that still need it
        decisions = []
        for r in readers:
            if r.module in graph.reparameterised:  # reads every input channel (surgery.py)
                needed.index_add_(0, r.root, torch.ones(len(r.root), dtype=torch.long))
                continue
            ignored = _ignored(r)
            const, value = ranges.constants(r.module, r.local)
            if by_structure:  # a constant for every input: what the reader sees has silent writers
                nearest = _nearest_writers(r.module, group, graph.DG)
                const &= torch.zeros_like(const) if nearest is None else _silent(group, graph.DG, n_root, nearest)[r.root]
            # a constant zero adds nothing anywhere, even where zero padding meets a constant
            foldable = const & (_fold_is_exact(r.module) | (value == 0)) & ~ignored
            needed.index_add_(0, r.root, (~(ignored | foldable)).long())
            decisions.append((r, foldable, value))
        removable = needed == 0
        if removal == "aggressive":  # and silent channels, whatever reads them: no fold where it is not exact
            removable |= _silent(group, graph.DG, n_root)
        removable = _representable(removable, candidate, graph.DG)
        if not removable.any():
            continue
        folded = torch.zeros(n_root, dtype=torch.bool)
        cut = Cut(group.items[0].dep.target.module, removable.nonzero().flatten().tolist(), int(removable.sum()), risky=is_risky(group))
        for r, foldable, value in decisions:
            to_fold = (removable[r.root] & foldable).nonzero().flatten()
            adds = to_fold[value[to_fold] != 0]  # a zero constant leaves the bias as it is
            if len(adds):
                cut.folds.append(_fold(r, adds, value[adds]))
            folded[r.root[to_fold]] = True
        cut.folded = int(folded.sum())
        plan.append(cut)
    result.kept = _cut(model, graph, plan, removal, example, result)
    return result


def _trace(model: nn.Module, example: torch.Tensor, result: ChannelRemoval) -> Graph | None:
    """The model's graph; None (every channel stays, the reason counted) where torch-pruning fails."""
    try:
        return Graph.trace(model, example)
    except Exception as e:
        result.blocked[f"torch-pruning cannot trace the model ({type(e).__name__})"] += 1
        return None


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
        if DG.is_out_channel_pruning_fn(item.dep.handler) or _is_depthwise(m):
            per_channel = s.sum(dim=1)  # (O,)
        else:
            per_channel = _by_input_channel(s, m.groups).sum(dim=1)  # (I,)
        total.index_add_(0, torch.tensor(item.root_idxs), per_channel[list(item.idxs)].double())
    return total if found else None


def remove_least_salient_channels(
    model: nn.Module, example: torch.Tensor, scores: dict[str, torch.Tensor], pct: float
) -> ChannelRemoval:
    """`--granularity channel` (docs/method.md §3): in every coupled group that holds spatial kernels,
    remove the `floor(pct/100 * channels)` channels of least summed kernel saliency (ties: lower
    index first). The output changes; the caller measures by how much."""
    result = ChannelRemoval()
    graph = _trace(model, example, result)
    plan: list[Cut] = []
    for candidate in _candidates(graph, "aggressive", result) if graph is not None else []:
        group = candidate.group
        saliency = _channel_saliency(group, graph.DG, scores)
        if saliency is None:
            continue
        removable = torch.zeros(len(saliency), dtype=torch.bool)
        removable[torch.sort(saliency, stable=True).indices[: math.floor(pct / 100 * len(saliency))]] = True
        removable = _representable(removable, candidate, graph.DG)
        if removable.any():
            plan.append(Cut(group.items[0].dep.target.module, removable.nonzero().flatten().tolist(), int(removable.sum()), risky=is_risky(group)))
    result.kept = _cut(model, graph, plan, "aggressive", example, result)
    return result


def channel_params(group: tp.Group, DG: tp.DependencyGraph) -> torch.Tensor:
    """(n,) per root channel of a group, the parameters that leave with it: its row of every
    convolution or linear layer writing it, its column of every one reading it (all groups of a
    grouped convolution counted), its entries in batch norms."""
    params = torch.zeros(len(group.items[0].idxs), dtype=torch.float64)
    for item in group.items:
        m = item.dep.target.module
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            writes = DG.is_out_channel_pruning_fn(item.dep.handler)
            if _is_depthwise(m) and not writes:
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
    choose: Callable[[list[_Reader], torch.Tensor], torch.Tensor | None],
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
    graph = _trace(model, example, result)
    plan: list[Cut] = []
    for candidate in _candidates(graph, "aggressive", result) if graph is not None else []:
        chosen = choose(candidate.readers, channel_params(candidate.group, graph.DG))
        if chosen is None:
            continue
        removable = _representable(chosen, candidate, graph.DG)
        if not removable.any():
            continue
        cut = Cut(candidate.group.items[0].dep.target.module, removable.nonzero().flatten().tolist(), int(removable.sum()), risky=is_risky(candidate.group))
        for r in candidate.readers if means is not None else []:
            if isinstance(r.module, nn.modules.conv._ConvNd) and (r.module.transposed or r.module.groups != 1):
                continue  # their weights are not (O, I): no fold, the channel just leaves
            gone = removable[r.root].nonzero().flatten()
            if len(gone):
                cut.folds.append(_fold(r, gone, means[r.module][r.local[gone]]))
        plan.append(cut)
    result.kept = _cut(model, graph, plan, "aggressive", example, result)
    return result


def _cut(
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


def _cut_grouped_inputs(t: torch.Tensor, groups: int, idxs: list[int]) -> torch.Tensor:
    """Remove input channels `idxs` (indices into I) from a (O, I/groups, ...) tensor, group by group
    (every group loses as many: `_balanced`)."""
    o, per_group, rest = t.shape[0], t.shape[1], t.shape[2:]
    keep = torch.ones(groups, per_group, dtype=torch.bool)
    keep.view(-1)[idxs] = False
    n = int(keep[0].sum())
    columns = keep.nonzero()[:, 1].reshape(groups, 1, n, *[1] * len(rest))  # per group, the kept offsets
    blocks = t.reshape(groups, o // groups, per_group, *rest)
    return blocks.gather(2, columns.expand(groups, o // groups, n, *rest)).reshape(o, n, *rest)


def _grouped_input_cuts(group: tp.Group, DG: tp.DependencyGraph) -> list[tuple[nn.Module, torch.Tensor, list[int]]]:
    return [
        (item.dep.target.module, item.dep.target.module.weight.detach().clone(), list(item.idxs))
        for item in group.items
        if _is_grouped(item.dep.target.module) and not DG.is_out_channel_pruning_fn(item.dep.handler)
    ]
