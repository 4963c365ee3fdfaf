"""The optimiser `finetune` steps (docs/method.md §4): its parameter groups, one learning rate for
the weights and a multiple of it for normalisation layers' scales and shifts."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn


class Recipe(Protocol):
    """What the optimiser reads of `training.finetune.Recipe`."""

    lr: float
    norm_lr_scale: float
    weight_decay: float
    optimizer: str

NORMALISATIONS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def parameter_groups(model: nn.Module, params: list[nn.Parameter], recipe: Recipe) -> list[dict[str, Any]]:
    """The trainable `params` in two groups: normalisation layers' scales and shifts at
    `recipe.lr * recipe.norm_lr_scale`, everything else at `recipe.lr` (docs/method.md §4: an
    optimiser step moves a parameter by about the rate, and a scale is of order 1 where a
    convolution weight is of order 1/sqrt(fan_in))."""
    norms = {id(p) for m in model.modules() if isinstance(m, NORMALISATIONS) for p in m.parameters(recurse=False)}
    groups = [
        {"params": [p for p in params if id(p) not in norms], "lr": recipe.lr},
        {"params": [p for p in params if id(p) in norms], "lr": recipe.lr * recipe.norm_lr_scale},
    ]
    return [g for g in groups if g["params"]]


def optimizer_for(groups: list[dict[str, Any]], recipe: Recipe) -> torch.optim.Optimizer:
    """`recipe.optimizer` over `groups`: Adam, AdamW, or SGD with Nesterov momentum 0.9."""
    if recipe.optimizer == "adam":
        return torch.optim.Adam(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=0.9, nesterov=True, weight_decay=recipe.weight_decay)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}; choose adam, adamw or sgd.")
