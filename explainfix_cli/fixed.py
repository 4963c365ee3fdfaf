"""docs/method.md §4: spatially fixed filters (never learned: requires_grad=False)."""

from __future__ import annotations

from torch import nn

from .saliency import spatial_convs


def fix_spatial_filters(model: nn.Module) -> list[str]:
    """Freeze every spatial conv's weight and bias; return the names of the fixed tensors."""
    fixed = []
    for name, conv in spatial_convs(model):
        for pname, p in conv.named_parameters(recurse=False):
            p.requires_grad_(False)
            fixed.append(f"{name}.{pname}")
    return fixed
