"""Input attributions with captum: which pixels drive the output the saliency objective uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import torch
from torch import Tensor, nn

from explainfix_cli.choices import AttributionMethod
from explainfix_cli.io.data import Dataset
from explainfix_cli.models import model_output

IG_STEPS = 32  # enough for a smooth map on small inputs; cost is IG_STEPS backward passes per input
MAX_ATTRIBUTIONS = 32  # one readable figure (4 rows of 8); more would take minutes to draw


@dataclass(frozen=True)
class Attributions:
    """`count` inputs, their attributions (same shape), and per input a caption saying its true
    target and the model's prediction, and whether the prediction is right (None for masks)."""

    method: str
    images: Tensor  # (n, C, H, W)
    attributions: Tensor  # (n, C, H, W)
    captions: list[str]
    correct: list[bool | None]


def _names(data: Dataset, indices: Tensor) -> str:
    names = [data.classes[k] if data.classes and k < len(data.classes) else str(k) for k in indices.tolist()]
    return ", ".join(names) or "none"


def _caption(data: Dataset, y: Tensor, out: Tensor) -> tuple[str, bool | None]:
    """`y` one sample's target, `out` its output: 'true …, predicted …, right/wrong'."""
    if data.target_kind == "labels":
        truth, guess = y.reshape(1), out.argmax().reshape(1)
        right = bool(truth == guess)
        return f"true {_names(data, truth)}\npredicted {_names(data, guess)}\n{'right' if right else 'wrong'}", right
    if data.target_kind == "multilabel":  # the positive labels, predicted where the logit is above 0
        truth, guess = (y > 0.5).nonzero().flatten(), (out > 0).nonzero().flatten()
        right = torch.equal(truth, guess)
        return f"true {_names(data, truth)}\npredicted {_names(data, guess)}\n{'right' if right else 'wrong'}", right
    pred, mask = (out > 0).float(), (y > 0.5).float()  # (K, H, W)
    dice = float(2 * (pred * mask).sum() / (pred.sum() + mask.sum()).clamp_min(1e-12))
    return f"mask, {int(mask.sum())} target pixels\npredicted {int(pred.sum())}\nDice {dice:.2f}", None


METHODS: tuple[str, ...] = get_args(AttributionMethod)


def input_attributions(model: nn.Module, data: Dataset, count: int, method: str = "saliency", device: str = "cpu") -> Attributions:
    """Attributions of the first `count` inputs to docs/method.md §1's objective per input,
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
        out = model_output(model, x)  # (n, ...) the output's shape
        target = data.targets(out, y)

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
    captions = [_caption(data, t, o) for t, o in zip(y.cpu(), out.cpu(), strict=True)]
    return Attributions(
        method=method.replace("-", " "),
        images=x.detach().cpu(),
        attributions=attributions.detach().cpu(),
        captions=[c for c, _ in captions],
        correct=[right for _, right in captions],
    )
