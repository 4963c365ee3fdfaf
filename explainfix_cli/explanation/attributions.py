"""Input attributions with captum: which pixels drive the output the saliency objective uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import torch
from torch import Tensor, nn

from explainfix_cli.choices import AttributionMethod
from explainfix_cli.data import Dataset
from explainfix_cli.saliency import model_output

IG_STEPS = 32  # enough for a smooth map on small inputs; cost is IG_STEPS backward passes per input


@dataclass(frozen=True)
class Attributions:
    """`count` inputs, their attributions (same shape) and a caption naming each one's target."""

    method: str
    images: Tensor  # (n, C, H, W)
    attributions: Tensor  # (n, C, H, W)
    captions: list[str]


def _caption(data: Dataset, y: Tensor) -> str:
    if data.target_kind == "labels":
        label = int(y)
        return f"class {data.classes[label] if data.classes else label}"
    if data.target_kind == "multilabel":
        positive = ",".join(str(int(k)) for k in y.nonzero().flatten())
        return f"positive labels {positive}" if positive else "no positive label"
    return "target: mask"


METHODS: tuple[str, ...] = get_args(AttributionMethod)


def input_attributions(model: nn.Module, data: Dataset, count: int, method: str = "saliency", device: str = "cpu") -> Attributions:
    """Attributions of the first `count` inputs to METHOD.md §1's objective per input,
    `sum(target * output)`: the labelled class's logit for class labels, the target-weighted
    output sum for multi-label targets and masks.

    `saliency` is the input gradient's magnitude (Simonyan et al., 2014), one backward pass;
    `integrated-gradients` (Sundararajan et al., 2017, all-zero baseline) is more faithful and
    costs IG_STEPS backward passes per input.
    """
    from captum.attr import IntegratedGradients, Saliency

    x = data.x[:count].to(device)  # (n, C, H, W)
    y = data.y[:count].to(device)
    model.eval()
    with torch.no_grad():
        target = data.targets(model_output(model, x), y)  # output's shape

    def objective(inputs: Tensor, weights: Tensor) -> Tensor:
        return (model_output(model, inputs) * weights).flatten(1).sum(dim=1)  # (n * steps,)

    if method == "saliency":
        attributions = Saliency(objective).attribute(x.clone().requires_grad_(True), additional_forward_args=(target,))
    else:
        attributions = IntegratedGradients(objective).attribute(
            x,
            baselines=0.0,
            additional_forward_args=(target,),
            n_steps=IG_STEPS,
            internal_batch_size=max(data.batch_size, count),  # the user's memory budget per pass
        )
    return Attributions(
        method=method.replace("-", " "),
        images=x.detach().cpu(),
        attributions=attributions.detach().cpu(),
        captions=[_caption(data, t) for t in y.cpu()],
    )
