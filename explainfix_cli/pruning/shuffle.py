"""Channel shuffles (ShuffleNet) in torch-pruning's dependency graph.

A shuffle `x.view(n, g, C/g, h, w).transpose(1, 2).reshape(n, C, h, w)` sends input channel
`a * C/g + b` to output channel `b * g + a`. torch-pruning reads the transpose as an element-wise
op and pairs channel i before it with channel i after it, so the members of a group on the far
side of a shuffle get the wrong indices. This module repairs a group's indices across each shuffle
it crosses, and states the one cut a shuffle can carry: the same offsets `b` removed from every
block `a` (then the smaller tensor splits into g equal blocks and interleaves exactly as before).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from explainfix_cli.pruning.tp_adapter import GroupItem, self_sizes

OPTYPE = tp.ops.OPTYPE


@dataclass
class Shuffle:
    """One channel shuffle found in the traced graph."""

    transpose: tp.Node
    groups: int  # g
    channels: int  # C at trace time
    after: set[tp.Node]  # nodes that carry the shuffled channels (up to the layers that read them)

    def whole(self, crossing_idxs: int) -> bool:
        """Does a group holding this many of the shuffled channels hold all of them?"""
        return crossing_idxs == self.channels

    def forward(self, i: int) -> int:
        """Channel index after the shuffle of input channel i."""
        per_block = self.channels // self.groups
        return (i % per_block) * self.groups + i // per_block

    def backward(self, j: int) -> int:
        """Channel index before the shuffle of output channel j."""
        return (j % self.groups) * (self.channels // self.groups) + j // self.groups


def _passes_channels_on(node: tp.Node) -> bool:
    """Does the node's output carry the channels of its input (not a conv or linear layer)?"""
    m = node.module
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.groups == m.in_channels == m.out_channels  # depthwise
    return not isinstance(m, nn.Linear)


def find_shuffles(DG: tp.DependencyGraph) -> list[Shuffle]:
    """Every view → transpose → (clone →) view of the channel axis in the graph."""
    shuffles = []
    for node in DG.module2node.values():
        if node.type != OPTYPE.ELEMENTWISE or not any(k in str(node.module) for k in ("Transpose", "Permute")):
            continue
        if not any(i.type == OPTYPE.RESHAPE for i in node.inputs):
            continue  # a permute that only moves the channel axis (channels-last LayerNorm) is fine
        # the reshape after the transpose saved its input size (n, C/g, g, h, w)
        sizes = _following_reshape_input(node)
        if sizes is None or len(sizes) != 5:
            continue
        after: set[tp.Node] = set()
        stack = list(node.outputs)
        while stack:
            n = stack.pop()
            if n in after:
                continue
            after.add(n)
            if _passes_channels_on(n):
                stack.extend(n.outputs)
        shuffles.append(Shuffle(node, int(sizes[2]), int(sizes[1]) * int(sizes[2]), after))
    return shuffles


def _following_reshape_input(node: tp.Node) -> tuple[int, ...] | None:
    for _ in range(3):  # transpose → clone → reshape at most
        reshapes = [o for o in node.outputs if o.type == OPTYPE.RESHAPE]
        if reshapes:
            return self_sizes(reshapes[0].grad_fn)
        if len(node.outputs) != 1:
            return None
        node = node.outputs[0]
    return None


@dataclass
class Crossing:
    """A group crossing a shuffle: the group's item at the transpose, in pre-shuffle indices."""

    shuffle: Shuffle
    at_transpose: GroupItem


def repair(group: tp.Group, shuffles: list[Shuffle]) -> list[Crossing] | None:
    """Rewrite, in place, the indices of the group's members on the far side of each shuffle it
    crosses (from the root's point of view). None when the group crosses a shuffle in a way the
    cut cannot follow (the shuffled channels are split or concatenated again)."""
    crossings = []
    nodes = {item.dep.target for item in group.items}
    root = group.items[0].dep.target
    for shuffle in shuffles:
        if shuffle.transpose not in nodes:
            continue
        after = shuffle.after & nodes
        if any(n.type in (OPTYPE.CONCAT, OPTYPE.SPLIT, OPTYPE.SLICE, OPTYPE.UNBIND) for n in after):
            return None
        # members on the root's side hold true indices; the far side got them unshuffled
        far_side, remap = (nodes - after, shuffle.backward) if root in after else (after, shuffle.forward)
        for k, item in enumerate(group.items):
            if item.dep.target in far_side:
                _remap(group, k, remap)
        at_transpose = next(item for item in group.items if item.dep.target is shuffle.transpose)
        crossings.append(Crossing(shuffle, at_transpose))
    return crossings


def _remap(group: tp.Group, k: int, fn: Callable[[int], int]) -> None:
    item = group.items[k]
    fixed = GroupItem(item.dep, [fn(i) for i in item.idxs])
    fixed.root_idxs = item.root_idxs
    group[k] = fixed


def symmetric(removable: torch.Tensor, crossings: list[Crossing]) -> torch.Tensor:
    """Shrink `removable` (per root channel) to cuts every crossed shuffle can carry: offset b is
    removed from all g blocks or from none."""
    removable = removable.clone()
    for c in crossings:
        per_block = c.shuffle.channels // c.shuffle.groups
        local = torch.tensor(c.at_transpose.idxs)  # pre-shuffle channel a * C/g + b
        root = torch.tensor(c.at_transpose.root_idxs)
        offset_ok = torch.ones(per_block, dtype=torch.long)
        offset_ok.scatter_reduce_(0, local % per_block, removable[root].long(), reduce="amin")
        removable[root] &= offset_ok[local % per_block].bool()
    return removable
