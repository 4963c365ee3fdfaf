"""docs/method.md §3 on architectures torch-pruning only half understands: cut, check, undo.

Channel removal decides per coupled group which channels may leave (`channels.py`); this module
carries the cuts out so that a model is never left broken, whatever the architecture:

- before any cut, a group whose channels pass through something a cut cannot follow stays
  whole, with the reason (`unsafe_nodes`): a reshape that moves the channel axis (split
  attention's radix, multi-head self-attention, MobileViT's patches), a split into unequal fixed
  sizes (Res2Net, MixNet: the model's code keeps the sizes), a concatenation or flatten
  torch-pruning could not map, a group whose members it cannot even enumerate (tp_adapter);
- a *reparameterised* convolution, one whose forward does not convolve with its stored weight
  (timm's weight-standardised `ScaledStdConv2d`/`StdConv2d` in NF-ResNet and NFNet), reads every
  input channel: zeroing acts on the stored weight as for any convolution (that is what the
  saliency and the zeroed model see), but standardisation subtracts each output row's mean, so a
  zeroed kernel is not zero after it and removing an input channel would change every row's mean
  and spread. Its output channels may still leave: an all-zero stored row standardises to zero
  (0 / sqrt(0 + eps)), and its per-output gain is cut with it (any parameter or buffer of the
  layer whose first dimension is the output width is cut the same way);
- each group's cut is a transaction: the state of every module it touches is kept, so a cut that
  raises is undone on the spot; after all cuts one forward pass on the example input checks the
  model against the zeroed model's output (exact removal) or at least that it runs and keeps its
  output shape (removal modes that change the output). If the check fails, the cuts are undone
  and redone by halves, and each cut that breaks the model on its own stays undone, with the
  reason. That costs two forward passes when nothing is wrong (see `Surgeon.run`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from explainfix_cli.errors import UserError
from explainfix_cli.models import InputMismatch
from explainfix_cli.pruning.grouped_convs import cut_grouped_inputs, grouped_input_cuts, is_depthwise
from explainfix_cli.pruning.shuffle import Shuffle
from explainfix_cli.pruning.tp_adapter import (
    graph_maps,
    output_sizes,
    parameter_name,
    restore_graph_maps,
    saved_dim,
    self_sizes,
)

OPTYPE = tp.ops.OPTYPE
# |cut - zeroed| above this fraction of the zeroed model's largest output fails the check
CHECK_TOLERANCE = 1e-4


class PruningFailed(RuntimeError):
    """The request was fine (the data fit the original model) but the model could not be pruned."""


@contextmanager
def surgery_failures() -> Iterator[None]:
    """Around everything after the original model ran on the data: a model that no longer fits
    its inputs, or any other error, is a failure of the prune (exit 1), not bad input (exit 2)."""
    try:
        yield
    except InputMismatch as e:
        raise PruningFailed(f"the model could not be pruned: after channel removal it no longer runs on its inputs ({e.cause}).") from e
    except UserError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise PruningFailed(f"the model could not be pruned: {type(e).__name__} during channel removal ({first}).") from e


def _keeps_channel_axis(node: tp.Node) -> bool:
    """A reshape a cut can follow: it leaves dim 1 alone, or flattens (N, C, H, W) to (N, C*H*W)."""
    before, after = self_sizes(node.grad_fn), output_sizes(node.grad_fn)
    if before is None or after is None:
        return False
    if before == after or (len(before) >= 2 and len(after) >= 2 and before[:2] == after[:2]):
        return True
    return len(after) == 2 and after[0] == before[0] and after[1] == math.prod(before[1:])


def _slices_channels(node: tp.Node) -> bool:
    """A slice `x[:, a:b]` along dim 1: its bounds are numbers in the model's code (GhostNet keeps
    the first channels of a concatenation, ReXNet adds its shortcut to the first ones)."""
    dim, sizes = saved_dim(node.grad_fn), self_sizes(node.grad_fn)
    return dim is None or sizes is None or dim % len(sizes) == 1


def _shuffle_reshapes(shuffles: Iterable[Shuffle]) -> set[tp.Node]:
    """The view before and the reshape after each channel shuffle's transpose (shuffle.py repairs those)."""
    nodes: set[tp.Node] = set()
    for s in shuffles:
        nodes.update(n for n in s.transpose.inputs if n.type == OPTYPE.RESHAPE)
        frontier = list(s.transpose.outputs)
        for _ in range(2):  # transpose → (clone →) reshape
            nodes.update(n for n in frontier if n.type == OPTYPE.RESHAPE)
            frontier = [o for n in frontier if n.type != OPTYPE.RESHAPE for o in n.outputs]
    return nodes


def unsafe_nodes(DG: tp.DependencyGraph, shuffles: Iterable[Shuffle]) -> dict[tp.Node, str]:
    """Nodes no cut may pass through, each with the reason its group stays whole."""
    unsafe: dict[tp.Node, str] = {}
    shuffled = _shuffle_reshapes(shuffles)
    for node in DG.module2node.values():
        if getattr(node, "unmapped", False):
            unsafe[node] = "concatenation or flatten torch-pruning cannot map"
        elif node.type == OPTYPE.RESHAPE and node not in shuffled and not _keeps_channel_axis(node):
            unsafe[node] = "reshape of the channel axis (attention heads, split attention, patches)"
        elif node.type == OPTYPE.SPLIT and len(set(getattr(node.module, "split_sizes", None) or [0, 1])) > 1:
            unsafe[node] = "split into unequal parts (the model's code keeps their sizes)"
        elif node.type == OPTYPE.SLICE and _slices_channels(node):
            unsafe[node] = "slice of the channel axis (the model's code keeps its bounds)"
    return unsafe


def indices_fit(group: tp.Group, DG: tp.DependencyGraph) -> bool:
    """Do the indices torch-pruning mapped to each layer of the group lie within that layer's
    channels? (Through slices and concatenations it can miscount; then no cut may use them.)"""
    for item in group.items:
        m = item.dep.target.module
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            out = DG.is_out_channel_pruning_fn(item.dep.handler)
            if isinstance(m, nn.Linear):
                width = m.out_features if out else m.in_features
            else:
                width = m.out_channels if out else m.in_channels
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            width = m.num_features
        else:
            continue
        if item.idxs and (max(item.idxs) >= width or min(item.idxs) < 0):
            return False
    return True


def equal_split_parts(group: tp.Group) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """For each split into equal parts the group passes through: (root index, part, parts) per
    channel entering it. A cut must take as many channels from every part (`torch.chunk` gives
    equal parts again; a split into fixed sizes breaks, which the check after the cut catches)."""
    constraints = []
    for item in group.items:
        node = item.dep.target
        sizes = getattr(node.module, "split_sizes", None) if node.type == OPTYPE.SPLIT else None
        if sizes and len(set(sizes)) == 1 and len(sizes) > 1:
            local = torch.tensor(item.idxs)
            constraints.append((torch.tensor(item.root_idxs), local // sizes[0], len(sizes)))
    return constraints


def reparameterised_convs(model: nn.Module) -> set[nn.Module]:
    """Convolutions whose forward does not convolve the input with the stored weight and bias
    (weight standardisation, weight normalisation, dynamic 'same' padding): probed on a small
    random input, since subclasses are free to override `forward`."""
    found: set[nn.Module] = set()
    plain = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward}
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if not isinstance(m, nn.modules.conv._ConvNd) or type(m).forward in plain:
            continue
        if m.transposed or not hasattr(m, "_conv_forward"):
            found.add(m)
            continue
        weight = m.weight.detach()
        size = [2 * k + 1 for k in m.kernel_size]
        x = torch.randn(1, m.in_channels, *size, generator=generator).to(weight)  # (1, I, ...)
        try:
            with torch.no_grad():
                same = torch.allclose(m(x), m._conv_forward(x, weight, m.bias), rtol=1e-5, atol=1e-6)
        except Exception:
            same = False
        if not same:
            found.add(m)
    return found


def _per_output_tensors(m: nn.Module, width: int) -> list[str]:
    """Names of a conv or linear layer's own tensors, other than weight and bias, that hold one
    entry per output channel (a weight-standardised conv's gain)."""
    own = {**m._parameters, **m._buffers}
    return [n for n, t in own.items() if n not in ("weight", "bias") and t is not None and t.dim() >= 1 and t.shape[0] == width]


@dataclass
class Cut:
    """One group's removal: the root layer's output channels to cut, and the folds that go with it."""

    root: nn.Module
    idxs: list[int]
    removed: int
    folded: int = 0
    folds: list[tuple[nn.Module, torch.Tensor]] = field(default_factory=list)  # (reader, bias delta over its original outputs)
    risky: bool = False  # passes through nodes a cut more often breaks (`is_risky`)


RISKY_TYPES = {OPTYPE.SPLIT, OPTYPE.CONCAT, OPTYPE.RESHAPE, OPTYPE.SLICE, OPTYPE.UNBIND, OPTYPE.EXPAND, OPTYPE.CUSTOMIZED}
RISKY_OPS = ("Convolution", "Mm", "Bmm", "Matmul", "Index", "Gather", "Scatter", "Pad")


def is_risky(group: tp.Group) -> bool:
    """Does the group pass through splits, concatenations, reshapes, slices, or operations
    torch-pruning takes for element-wise though they are not (a functional convolution with a
    fixed filter, matrix products, indexing)? Those cuts are checked one by one."""
    for item in group.items:
        node = item.dep.target
        if node.type in RISKY_TYPES:
            return True
        if node.type == OPTYPE.ELEMENTWISE and any(op in type(node.grad_fn).__name__ for op in RISKY_OPS):
            return True
    return False


class _Snapshot:
    """The state of some modules (and of torch-pruning's bookkeeping) to go back to."""

    def __init__(self, modules: Iterable[nn.Module], surgeon: Surgeon, parameters: bool):
        self.modules = [
            (m, {k: list(v) if isinstance(v, list) else v for k, v in m.__dict__.items()}, dict(m._parameters), dict(m._buffers))
            for m in dict.fromkeys(modules)
        ]
        self.alive = dict(surgeon.alive)
        self.kept = {k: len(k.cuts) for k in surgeon.kept.values()}
        self.dg = graph_maps(surgeon.DG) if parameters else None  # pruning an unwrapped parameter re-keys them

    def restore(self, surgeon: Surgeon) -> None:
        for m, state, params, buffers in self.modules:
            m.__dict__.clear()
            m.__dict__.update(state)
            m.__dict__["_parameters"], m.__dict__["_buffers"] = params, buffers
        surgeon.alive = self.alive
        for k, n in self.kept.items():
            del k.cuts[n:]
        if self.dg is not None:
            restore_graph_maps(surgeon.DG, self.dg)


class Surgeon:
    """Carries out cuts on a traced model, undoing those that break it (see the module docstring)."""

    def __init__(self, model: nn.Module, graph: Any, kept: dict[nn.Module, Any], check: Callable[[], str | None]):
        self.model, self.graph, self.DG, self.kept, self.check = model, graph, graph.DG, kept, check
        self.alive = {
            m: torch.arange(m.weight.shape[1 if getattr(m, "transposed", False) else 0])
            for m in model.modules()
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
        }
        self.failed: list[tuple[Cut, str]] = []

    def run(self, cuts: list[Cut]) -> list[tuple[Cut, str]]:
        """Make every cut that keeps the model whole; returns the others with their reasons.

        The plain cuts first, all at once, then the risky ones, all at once: one forward pass
        each when nothing breaks. Where the check fails, plain cuts are redone by halves (few
        of them break) and risky ones one at a time (many may break: Res2Net's every split)."""
        self._settle([c for c in cuts if not c.risky], by_halves=True)
        self._settle([c for c in cuts if c.risky], by_halves=False)
        return self.failed

    def _settle(self, cuts: list[Cut], by_halves: bool) -> None:
        done = [(c, s) for c in cuts if (s := self._apply(c)) is not None]
        if not done:
            return
        reason = self.check()
        if reason is None:
            return
        for _, snapshot in reversed(done):
            snapshot.restore(self)
        if len(done) == 1:
            self.failed.append((done[0][0], reason))
        elif by_halves:
            half = len(done) // 2
            self._settle([c for c, _ in done[:half]], by_halves)
            self._settle([c for c, _ in done[half:]], by_halves)
        else:
            for c, _ in done:
                self._settle([c], by_halves)

    def _apply(self, cut: Cut) -> _Snapshot | None:
        """One group's cut as a transaction: its snapshot when done, None (recorded) when it raised."""
        snapshot: _Snapshot | None = None
        try:
            group = self.graph.group_of(cut.root, cut.idxs)
            if getattr(group, "tangled", False):
                self.failed.append((cut, "coupling torch-pruning cannot enumerate"))
                return None
            parameters = any(isinstance(item.dep.target.module, nn.Parameter) for item in group.items)
            snapshot = _Snapshot(self._touched(group), self, parameters)
            for reader, delta in cut.folds:
                self._fold(reader, delta)
            self._prune(group)
            return snapshot
        except Exception as e:
            if snapshot is not None:
                snapshot.restore(self)
            self.failed.append((cut, f"torch-pruning cannot cut it ({type(e).__name__})"))
            return None

    def _touched(self, group: tp.Group) -> list[nn.Module]:
        modules = []
        for item in group.items:
            node = item.dep.target
            if isinstance(node.module, nn.Parameter):  # an unwrapped parameter: its owner changes
                name = parameter_name(self.DG, node.module)
                owner = self.model
                for part in name.split(".")[:-1]:
                    owner = getattr(owner, part)
                modules.append(owner)
            elif isinstance(node.module, nn.Module):
                modules.append(node.module)
        return modules

    def _fold(self, reader: nn.Module, delta: torch.Tensor) -> None:
        delta = delta[self.alive[reader]].to(reader.weight.dtype)  # (O',) the outputs still there
        if reader.bias is None:
            reader.bias = nn.Parameter(torch.zeros_like(delta), requires_grad=reader.weight.requires_grad)
        with torch.no_grad():
            reader.bias += delta

    def _prune(self, group: tp.Group) -> None:
        DG = self.DG
        grouped_inputs = grouped_input_cuts(group, DG)
        outputs_cut: list[tuple[nn.Module, list[int], list[tuple[str, torch.Tensor]]]] = []
        for item in group.items:
            m = item.dep.target.module
            if m in self.kept:
                self.kept[m].cut(item, DG)
            out = DG.is_out_channel_pruning_fn(item.dep.handler) or is_depthwise(m)
            if m in self.alive and out and all(m is not done for done, _, _ in outputs_cut):
                width = len(self.alive[m])
                extra = [(n, getattr(m, n)) for n in _per_output_tensors(m, width)]
                outputs_cut.append((m, list(item.idxs), extra))
        group.prune()
        for m, weight, idxs_in in grouped_inputs:
            # torch-pruning cuts a grouped conv's inputs at the same offsets in every group;
            # ours differ per group, so cut the weight again from its pre-pruning copy
            m.weight = nn.Parameter(cut_grouped_inputs(weight, m.groups, idxs_in), requires_grad=weight.requires_grad)
        for m, idxs, extra in outputs_cut:
            stays = torch.ones(len(self.alive[m]), dtype=torch.bool)
            stays[idxs] = False
            self.alive[m] = self.alive[m][stays]
            for name, t in extra:
                if t.shape[0] != len(stays):
                    continue  # torch-pruning cut it already
                cut = t.detach()[stays]
                if isinstance(t, nn.Parameter):
                    setattr(m, name, nn.Parameter(cut, requires_grad=t.requires_grad))
                else:
                    m._buffers[name] = cut


def output_check(
    model: nn.Module, example: torch.Tensor, reference: torch.Tensor, exact: bool, run: Callable[[nn.Module, torch.Tensor], torch.Tensor]
) -> Callable[[], str | None]:
    """The check after cuts: on `example`, the model runs, keeps the shape of `reference` and,
    when the removal is meant to be exact, computes it to CHECK_TOLERANCE of its largest value."""
    scale = float(reference.abs().max()) if reference.numel() else 0.0

    def check() -> str | None:
        try:
            with torch.no_grad():
                out = run(model, example)
        except Exception:
            return "cutting it breaks the model's forward pass"
        if out.shape != reference.shape:
            return "cutting it changes the output's shape"
        if exact and not float((out - reference).abs().max()) <= CHECK_TOLERANCE * scale:
            return "cutting it changes the model's output"
        return None

    return check
