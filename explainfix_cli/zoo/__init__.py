"""Sample architectures, one family per file, importable as factories.

Between them they cover every channel coupling the pruning engine has to follow (residual adds,
concatenations, channel splits, depthwise and grouped convs, channel shuffles,
squeeze-excitation, flatten -> Linear, channels-last LayerNorm, layer scale, transposed convs,
U-Net skips). Each factory takes keyword arguments with defaults and returns an `nn.Module`; an
`--arch` such as `explainfix_cli.zoo:resnet` names one of them.

The factories share their names with their modules, so `explainfix_cli.zoo.resnet` is the
factory; reach a module's classes with `from explainfix_cli.zoo.resnet import BasicBlock`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from explainfix_cli.errors import UserError
from explainfix_cli.zoo.convnext import convnext
from explainfix_cli.zoo.densenet import densenet, densenet_bc
from explainfix_cli.zoo.mobilenet import mobilenet
from explainfix_cli.zoo.resnet import resnet
from explainfix_cli.zoo.shufflenet import shufflenet
from explainfix_cli.zoo.unet import unet
from explainfix_cli.zoo.vgg import vgg

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet": resnet,
    "densenet": densenet,
    "densenet_bc": densenet_bc,
    "mobilenet": mobilenet,
    "vgg": vgg,
    "shufflenet": shufflenet,
    "convnext": convnext,
    "unet": unet,
}


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the sample architecture `name` with the factory's keyword arguments."""
    if name not in MODELS:
        raise UserError(f"Unknown sample model {name!r}; choose one of {', '.join(sorted(MODELS))}.")
    return MODELS[name](**kwargs)


__all__ = [
    "MODELS",
    "convnext",
    "create_model",
    "densenet",
    "densenet_bc",
    "mobilenet",
    "resnet",
    "shufflenet",
    "unet",
    "vgg",
]
