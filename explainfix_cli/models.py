"""What explainfix needs of any model: its spatial convolutions, and running it with a clear
error when the inputs do not fit (used by every stage)."""

from __future__ import annotations

import torch
from torch import nn

from explainfix_cli.errors import UserError


def is_spatial(module: nn.Module) -> bool:
    """A 2-D convolution whose kernel is larger than 1x1 in every dimension (docs/method.md, "Words used throughout")."""
    return isinstance(module, nn.Conv2d) and all(k > 1 for k in module.kernel_size)


def spatial_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The spatial convolutions of `model`, in module order, by module name."""
    return [(name, m) for name, m in model.named_modules() if is_spatial(m)]


def require_spatial_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    convs = spatial_convs(model)
    if not convs:
        raise UserError("the model has no spatial convolutions (Conv2d with a kernel larger than 1x1); there is nothing to score.")
    return convs


class InputMismatch(UserError):
    """The model raised on the inputs: bad input while the model is as the user gave it; after
    pruning changed it, a failure of the prune (`surgery.surgery_failures`)."""

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause


def model_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`model(x)` with a clear error when the data does not fit the model."""
    try:
        out = model(x)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise InputMismatch(f"inputs of shape {tuple(x.shape[1:])} do not fit the model ({first}); check the data or `input_size`.", first) from None
    if isinstance(out, (tuple, list)):  # e.g. auxiliary heads: the first output is the prediction
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise UserError(f"the model returns {type(out).__name__}; explainfix needs a tensor output.")
    return out
