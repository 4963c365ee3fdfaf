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

`channel_ranking.remove_least_salient_channels` is the `--granularity channel` variant: it ranks channels instead;
`channels` holds the graph, the groups and the cuts both share.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch_pruning as tp
from torch import nn

from explainfix_cli.choices import Removal
from explainfix_cli.io.data import Dataset
from explainfix_cli.models import model_output
from explainfix_cli.pruning.channels import (
    Candidate,
    ChannelRemoval,
    Graph,
    Reader,
    candidate_groups,
    carry_out,
    fold_constant,
    representable,
    traced,
)
from explainfix_cli.pruning.grouped_convs import by_input_channel, is_depthwise
from explainfix_cli.pruning.surgery import Cut, is_risky
from explainfix_cli.pruning.tp_adapter import GroupItem

# relative spread below which a measured channel counts as constant (a silent channel is constant
# to the last bit; the tolerance only absorbs summation order in pooling)
CONSTANT_TOLERANCE = 1e-6



def _ignored(reader: Reader) -> torch.Tensor:
    """(n,) True where the reader's weights for that input channel are all zero."""
    w = reader.module.weight.detach()
    if isinstance(reader.module, nn.Linear):
        return (w[:, reader.local] == 0).all(dim=0)
    if not reader.module.transposed:  # transposed weights are already (I, O/groups, kh, kw)
        w = by_input_channel(w, reader.module.groups)
    return (w[reader.local] == 0).flatten(1).all(dim=1)



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



def _writes(item: GroupItem, DG: tp.DependencyGraph) -> bool:
    m = item.dep.target.module
    return isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and (DG.is_out_channel_pruning_fn(item.dep.handler) or is_depthwise(m))



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
            by_input = w if m.transposed else by_input_channel(w, m.groups)  # (I, ...)
            by_output = by_input_channel(w, m.groups) if m.transposed else w  # (O, ...)
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

    Exact removal reads no data (its constants follow from the structure, read off `example` and
    noise); the other two read it once, and keep the model's outputs from that pass in
    `outputs_before`. A caller checking that exact removal changed nothing measures the model
    before and after itself (`pipeline` keeps a copy and runs both in one pass).
    """
    result = ChannelRemoval()
    graph = traced(model, example, result)
    candidates = candidate_groups(graph, removal, result) if graph is not None else []
    ranges = _InputRange(r.module for c in candidates for r in c.readers)
    by_structure = removal == "exact" or data is None  # only silent channels count as constant
    if by_structure:  # their constants, read off two unrelated inputs
        ranges.measure(model, [_probe(example)], device)
    else:  # one pass over the calibration data: reader input ranges, and the outputs to compare with afterwards
        result.outputs_before = ranges.measure(model, (x for x, _ in data), device)
    if graph is None:
        result.kept = carry_out(model, None, [], removal, example, result)
        return result

    plan = [cut for c in candidates if (cut := _planned_cut(c, graph, ranges, by_structure, removal)) is not None]
    result.kept = carry_out(model, graph, plan, removal, example, result)
    return result


def _planned_cut(candidate: Candidate, graph: Graph, ranges: _InputRange, by_structure: bool, removal: Removal) -> Cut | None:
    """One group's cut: the channels every terminal reader ignores or receives as a constant it
    may fold (under `aggressive` also the silent ones), made representable; None if none may go."""
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
    removable = representable(removable, candidate, graph.DG)
    if not removable.any():
        return None
    folded = torch.zeros(n_root, dtype=torch.bool)
    cut = Cut(group.items[0].dep.target.module, removable.nonzero().flatten().tolist(), int(removable.sum()), risky=is_risky(group))
    for r, foldable, value in decisions:
        to_fold = (removable[r.root] & foldable).nonzero().flatten()
        adds = to_fold[value[to_fold] != 0]  # a zero constant leaves the bias as it is
        if len(adds):
            cut.folds.append(fold_constant(r, adds, value[adds]))
        folded[r.root[to_fold]] = True
    cut.folded = int(folded.sum())
    return cut
