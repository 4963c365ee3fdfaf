"""Everything explainfix uses of torch-pruning beyond its public API, in one place, for the one
minor version it is tested with (1.6; `pyproject.toml` pins it): `GroupItem`, the graph's
module and parameter names (and the maps a cut that is undone restores), the sizes autograd saved
that torch-pruning reads, and the two functions swapped below.

torch-pruning 1.6 reads two autograd attributes by names torch 2 no longer uses.

Its dependency graph sizes channel splits from `grad_fn._saved_split_sizes` / `_saved_self_sizes`
and skips reshapes that are not 1-D or 4-D by `_saved_self_sizes`; torch 2 saves
`_saved_split_size` and `_saved_self_sym_sizes` instead. Without them torch-pruning guesses: a
`chunk` feeding a concatenation gets the concatenation's width as its first part, and a 5-D view
(a channel shuffle written with `.view`, as torchvision's ShuffleNet does) is read as a flatten
and divides by zero. `DependencyGraph` here is torch-pruning's, with its two entry points that
size tensors (building the graph, and `get_pruning_group`, which re-maps indices on every call)
run while those two functions read torch 2's names; torch-pruning itself is left as installed.

Three more holes, for the long tail of architectures (issue 14), patched the same way:
- a concatenation whose input widths torch-pruning cannot infer (DPN concatenates slices) gets
  them from autograd (each input's shape is in its `grad_fn`'s input metadata); where even that
  fails, the concatenation is marked unmapped instead of raising `TypeError` (None + int);
- a flatten whose input width infers as 0 (fed by the model input) is marked unmapped instead of
  dividing by zero;
- the search for a group's members revisits a node each time it arrives with other indices;
  through slices and partial residuals (ReXNet, HaloNet) that is exponential. A node reached more
  than `MAX_VISITS` times stops the search (`TangledGroup`), and the caller leaves the group whole.
Unmapped nodes get `unmapped = True`: a group through them has wrong indices and must stay whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from typing import Any

import torch_pruning as tp
from torch import nn

TESTED = (1, 6)  # the torch-pruning minor version whose private names this module relies on
if tuple(int(p) for p in version("torch-pruning").split(".")[:2]) != TESTED:
    raise ImportError(
        f"explainfix is tested with torch-pruning {TESTED[0]}.{TESTED[1]}.x, and this is {version('torch-pruning')}; "
        f"install 'torch-pruning>={TESTED[0]}.{TESTED[1]},<{TESTED[0]}.{TESTED[1] + 1}'."
    )

# private names: behind the version check
from torch_pruning._helpers import GroupItem  # noqa: E402
from torch_pruning.dependency import graph as tp_graph  # noqa: E402
from torch_pruning.dependency import index_mapping, shape_infer  # noqa: E402
from torch_pruning.dependency.dependency import Dependency  # noqa: E402
from torch_pruning.dependency.group import Group  # noqa: E402

__all__ = [
    "DependencyGraph", "GraphMaps", "GroupItem", "graph_maps", "module_name", "output_sizes", "parameter_name",
    "restore_graph_maps", "saved_dim", "saved_sizes_of_torch2", "self_sizes",
]  # fmt: skip

MAX_VISITS = 32  # times one node may join a group's search (a sane graph needs 2: in and out)


def module_name(DG: tp.DependencyGraph, module: nn.Module) -> str:
    """The name of `module` in the traced model ("" when the graph does not know it)."""
    return DG._module2name.get(module, "")


def parameter_name(DG: tp.DependencyGraph, parameter: nn.Parameter) -> str:
    """The dotted name of an unwrapped parameter in the traced model ("" when the graph does not know it)."""
    return DG._param_to_name.get(parameter, "")


GraphMaps = tuple[dict[Any, str], dict[Any, tp.Node], list[tuple[tp.Node, Any]]]


def graph_maps(DG: tp.DependencyGraph) -> GraphMaps:
    """A copy of the graph's maps from parameters and modules to names and nodes: pruning an
    unwrapped parameter re-keys them, so a cut that is undone puts them back (`restore_graph_maps`)."""
    return dict(DG._param_to_name), dict(DG.module2node), [(n, n.module) for n in DG.module2node.values()]


def restore_graph_maps(DG: tp.DependencyGraph, maps: GraphMaps) -> None:
    DG._param_to_name, DG.module2node = maps[0], maps[1]
    for node, module in maps[2]:
        node.module = module


def self_sizes(grad_fn: object) -> tuple[int, ...] | None:
    """The input size an autograd node saved (a reshape's, a split's, a slice's), under torch 1's
    name or torch 2's."""
    for name in ("_saved_self_sizes", "_saved_self_sym_sizes"):
        sizes = getattr(grad_fn, name, None)
        if sizes is not None:
            return tuple(int(s) for s in sizes)
    return None


def output_sizes(grad_fn: Any) -> tuple[int, ...] | None:
    """The size of an autograd node's output, from its input metadata."""
    try:
        return tuple(int(s) for s in grad_fn._input_metadata[0].shape)
    except (AttributeError, IndexError, TypeError):
        return None


def saved_dim(grad_fn: object) -> int | None:
    """The dimension a split, slice or concatenation saved (None when it saved none)."""
    return getattr(grad_fn, "_saved_dim", None)


def _split_sizes(grad_fn: object) -> list[int] | None:
    """The channel sizes of a split along dim 1, from what autograd saved."""
    sizes, dim = self_sizes(grad_fn), getattr(grad_fn, "_saved_dim", None)
    if sizes is None or dim is None or dim % len(sizes) != 1:
        return None
    if hasattr(grad_fn, "_saved_split_sizes"):
        return [int(s) for s in grad_fn._saved_split_sizes]
    if hasattr(grad_fn, "_saved_split_size"):
        step, total = int(grad_fn._saved_split_size), sizes[1]
        return [min(step, total - start) for start in range(0, total, step)]
    return None


def _concat_sizes(node: tp.Node) -> list[int] | None:
    """The channel widths of a concatenation along dim 1, from its inputs' autograd metadata."""
    grad_fn = node.grad_fn
    dim, nexts = getattr(grad_fn, "_saved_dim", None), getattr(grad_fn, "next_functions", ())
    try:
        rank = len(grad_fn._input_metadata[0].shape)
        if dim is None or dim % rank != 1 or len(nexts) != len(node.inputs):
            return None
        if [fn for fn, _ in nexts] != [n.grad_fn for n in node.inputs]:
            return None  # an input that needs no gradient is missing from the traced inputs
        return [int(fn._input_metadata[i].shape[1]) for fn, i in nexts]
    except (AttributeError, IndexError, TypeError):
        return None


class TangledGroup(RuntimeError):
    """The search for a group's members went round in circles (see MAX_VISITS)."""


class _BoundedGroup(Group):
    def add_dep(self, dep: Any, idxs: Any) -> None:
        visits = self.__dict__.setdefault("_visits", {})
        visits[dep.target] = visits.get(dep.target, 0) + 1
        if visits[dep.target] > MAX_VISITS:
            raise TangledGroup(f"{dep.target.name} joined the group more than {MAX_VISITS} times")
        super().add_dep(dep, idxs)


@contextmanager
def saved_sizes_of_torch2() -> Iterator[None]:
    update_reshape, init_shapes = index_mapping.update_reshape_index_mapping, shape_infer.init_shape_information
    update_concat, group_class = index_mapping.update_concat_index_mapping, tp_graph.Group

    def reshape(graph: tp.DependencyGraph, node: tp.Node) -> None:
        sizes = self_sizes(node.grad_fn)
        if sizes is not None and len(sizes) not in (1, 4):
            return  # torch-pruning's own rule: it maps flattens of 1-D and 4-D tensors only
        try:
            update_reshape(graph, node)
        except ZeroDivisionError:
            node.unmapped = True

    def concat(graph: tp.DependencyGraph, node: tp.Node) -> None:
        chs = node.module.concat_sizes
        if chs is not None and any(c is None for c in chs):
            node.unmapped = True
            return
        try:
            update_concat(graph, node)
        except TypeError:  # a width it inferred as None
            node.unmapped = True

    def shapes(graph: tp.DependencyGraph) -> None:
        init_shapes(graph)
        for node in graph.module2node.values():
            chs = _split_sizes(node.grad_fn) if node.type == tp.ops.OPTYPE.SPLIT else None
            if chs is not None:
                node.module.split_sizes = chs
                node.module.offsets = [sum(chs[:i]) for i in range(len(chs) + 1)]
            if node.type == tp.ops.OPTYPE.CONCAT and node.module.concat_sizes is None:
                node.module.concat_sizes = _concat_sizes(node)

    index_mapping.update_reshape_index_mapping, shape_infer.init_shape_information = reshape, shapes
    index_mapping.update_concat_index_mapping, tp_graph.Group = concat, _BoundedGroup
    try:
        yield
    finally:
        index_mapping.update_reshape_index_mapping, shape_infer.init_shape_information = update_reshape, init_shapes
        index_mapping.update_concat_index_mapping, tp_graph.Group = update_concat, group_class


class DependencyGraph(tp.DependencyGraph):
    def build_dependency(self, *args: Any, **kwargs: Any) -> DependencyGraph:
        with saved_sizes_of_torch2():
            return super().build_dependency(*args, **kwargs)

    def get_pruning_group(self, module: Any, pruning_fn: Any, idxs: Any) -> tp.Group:
        """torch-pruning's group; for a tangled one (see TangledGroup), a group of the root alone
        with `tangled = True`, which no cut may use."""
        with saved_sizes_of_torch2():
            try:
                return super().get_pruning_group(module, pruning_fn, idxs)
            except TangledGroup:
                node = self.module2node[module]
                group = Group()
                item = GroupItem(Dependency(pruning_fn, pruning_fn, source=node, target=node), list(idxs))
                item.root_idxs = list(idxs)
                group.add_dep(item.dep, item.idxs)
                group[0] = item
                group._DG = self
                group.tangled = True
                return group
