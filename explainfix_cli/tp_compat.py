"""Everything explainfix uses of torch-pruning beyond its public API, in one place, for the one
minor version it is tested with (1.6; `pyproject.toml` pins it): `GroupItem`, the graph's
module names, and the two functions swapped below.

torch-pruning 1.6 reads two autograd attributes by names torch 2 no longer uses.

Its dependency graph sizes channel splits from `grad_fn._saved_split_sizes` / `_saved_self_sizes`
and skips reshapes that are not 1-D or 4-D by `_saved_self_sizes`; torch 2 saves
`_saved_split_size` and `_saved_self_sym_sizes` instead. Without them torch-pruning guesses: a
`chunk` feeding a concatenation gets the concatenation's width as its first part, and a 5-D view
(a channel shuffle written with `.view`, as torchvision's ShuffleNet does) is read as a flatten
and divides by zero. `DependencyGraph` here is torch-pruning's, with its two entry points that
size tensors (building the graph, and `get_pruning_group`, which re-maps indices on every call)
run while those two functions read torch 2's names; torch-pruning itself is left as installed.
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

from torch_pruning._helpers import GroupItem  # noqa: E402  (private: behind the version check)
from torch_pruning.dependency import index_mapping, shape_infer  # noqa: E402

__all__ = ["DependencyGraph", "GroupItem", "module_name", "saved_sizes_of_torch2"]


def module_name(DG: tp.DependencyGraph, module: nn.Module) -> str:
    """The name of `module` in the traced model ("" when the graph does not know it)."""
    return DG._module2name.get(module, "")


def _self_sizes(grad_fn: object) -> tuple[int, ...] | None:
    for name in ("_saved_self_sizes", "_saved_self_sym_sizes"):
        sizes = getattr(grad_fn, name, None)
        if sizes is not None:
            return tuple(int(s) for s in sizes)
    return None


def _split_sizes(grad_fn: object) -> list[int] | None:
    """The channel sizes of a split along dim 1, from what autograd saved."""
    sizes, dim = _self_sizes(grad_fn), getattr(grad_fn, "_saved_dim", None)
    if sizes is None or dim is None or dim % len(sizes) != 1:
        return None
    if hasattr(grad_fn, "_saved_split_sizes"):
        return [int(s) for s in grad_fn._saved_split_sizes]
    if hasattr(grad_fn, "_saved_split_size"):
        step, total = int(grad_fn._saved_split_size), sizes[1]
        return [min(step, total - start) for start in range(0, total, step)]
    return None


@contextmanager
def saved_sizes_of_torch2() -> Iterator[None]:
    update_reshape, init_shapes = index_mapping.update_reshape_index_mapping, shape_infer.init_shape_information

    def reshape(graph: tp.DependencyGraph, node: tp.Node) -> None:
        sizes = _self_sizes(node.grad_fn)
        if sizes is not None and len(sizes) not in (1, 4):
            return  # torch-pruning's own rule: it maps flattens of 1-D and 4-D tensors only
        update_reshape(graph, node)

    def shapes(graph: tp.DependencyGraph) -> None:
        init_shapes(graph)
        for node in graph.module2node.values():
            chs = _split_sizes(node.grad_fn) if node.type == tp.ops.OPTYPE.SPLIT else None
            if chs is not None:
                node.module.split_sizes = chs
                node.module.offsets = [sum(chs[:i]) for i in range(len(chs) + 1)]

    index_mapping.update_reshape_index_mapping, shape_infer.init_shape_information = reshape, shapes
    try:
        yield
    finally:
        index_mapping.update_reshape_index_mapping, shape_infer.init_shape_information = update_reshape, init_shapes


class DependencyGraph(tp.DependencyGraph):
    def build_dependency(self, *args: Any, **kwargs: Any) -> DependencyGraph:
        with saved_sizes_of_torch2():
            return super().build_dependency(*args, **kwargs)

    def get_pruning_group(self, *args: Any, **kwargs: Any) -> tp.Group:
        with saved_sizes_of_torch2():
            return super().get_pruning_group(*args, **kwargs)
