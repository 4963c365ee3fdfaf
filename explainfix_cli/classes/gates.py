"""docs/method.md §6: class-specific gate training (Liang et al., *Class-Specific Gates*), for `finetune`.

`ClassGates` is a (channels, classes) gate on the classifier's input; `class_gated_step` is the one
training step, standard or gated, that `finetune --class-gates` runs and library users may call in
their own loop; `uses_gates` is the paper's alternation of the two paths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from explainfix_cli.classes.analysis import find_classifier
from explainfix_cli.errors import UserError
from explainfix_cli.models import model_output
from explainfix_cli.training.precision import Precision


class ClassGates(nn.Module):
    """CSG's gate: a (channels, classes) matrix in [0, 1] on the classifier's input features.

    On a gated (CSG-path) step a sample of class k passes only `f * G[:, k]` to the classifier,
    so each channel is pushed to serve the classes whose gates stay open; an L1 penalty closes
    gates. Global average pooling is linear, so gating the pooled features is gating the last
    spatial layer's feature maps. The gate is used in training only: at inference there is none,
    so "folding it away" is detaching it, and the model keeps its architecture.
    """

    def __init__(self, classifier: str, channels: int, classes: int) -> None:
        super().__init__()
        self.classifier = classifier  # module name of the linear layer whose input is gated
        self.gate = nn.Parameter(torch.full((channels, classes), 0.5))  # (C, K), the paper's start

    @classmethod
    def for_model(cls, model: nn.Module, example: torch.Tensor) -> ClassGates:
        """A gate that fits `model`'s classifier (its final linear layer)."""
        found = find_classifier(model, example)
        if found is None:
            raise UserError("class gates need a model whose output comes from a linear layer reading (N, features).")
        name, linear = found
        return cls(name, linear.in_features, linear.out_features)

    def penalty(self) -> torch.Tensor:
        """The L1 norm of the gate, per class (so that its weight does not grow with K)."""
        return self.gate.abs().sum() / self.gate.shape[1]

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """Plain gradient descent on the gate, then the paper's clip: every channel's gates divided
        by its largest (its favourite class stays fully open) and clamped to [0, 1]. Not Adam: its
        per-element normalisation turns the L1 push into the same step for every gate, which the
        clip then undoes, so the gates would never close."""
        if self.gate.grad is not None:
            self.gate -= lr * self.gate.grad
            self.gate.grad = None
        largest = self.gate.amax(dim=1, keepdim=True).clamp_min(1e-12)  # (C, 1)
        self.gate.copy_((self.gate / largest).clamp(0, 1))

    def density(self) -> float:
        """Mean gate value: 1 with every gate open, 1/K with one class per channel."""
        return float(self.gate.detach().mean())

    @contextmanager
    def applied(self, model: nn.Module, labels: torch.Tensor) -> Iterator[None]:
        """While inside, `model`'s classifier sees `f * G[:, y]` for each sample's label y."""

        def gate(_m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            return (inputs[0] * self.gate[:, labels].T, *inputs[1:])  # (N, C) * (N, C)

        handle = model.get_submodule(self.classifier).register_forward_pre_hook(gate)
        try:
            yield
        finally:
            handle.remove()


def uses_gates(epoch: int, period: int = 3, warmup: int = 0) -> bool:
    """The paper's alternation: after `warmup` epochs, in every `period` epochs the first trains the
    standard (ungated) path and the others the gated path."""
    return epoch >= warmup and epoch % period != 0


GATE_SPARSITY = 4.0  # weight of the gate's L1 norm per class on gated steps (README, measured on the ResNet sample)
GATE_LR = 0.5  # the gate's own plain gradient step


def class_gated_step(
    model: nn.Module,
    gates: ClassGates | None,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    gated: bool,
    sparsity: float = GATE_SPARSITY,
    gate_lr: float = GATE_LR,
    loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    precision: Precision | None = None,
) -> float:
    """One training step on a minibatch `x`, `y` (class labels when gated): the standard path
    (`loss` of the model's output, by default its cross-entropy against `y`) or the gated path (the same loss with
    each sample's features gated by its class's gates, plus `sparsity` times the gate's L1 norm per
    class, then the gate's own step). `finetune` runs every step through here (`gates` None
    without `--class-gates`: a plain step). `optimizer` holds the model's trainable parameters (not
    the gate). A model in eval mode is put in train mode; one already training keeps the modes of
    its layers (finetune's frozen batch norms). `precision`: float32 by default, or mixed
    (`training.precision`, `finetune --amp`). Returns the loss, with the penalty on gated steps."""
    if gated and gates is None:
        raise ValueError("a gated step needs the gates.")
    if not model.training:
        model.train()
    optimizer.zero_grad(set_to_none=True)
    precision = precision or Precision(False, "cpu")
    with precision.autocast():
        with gates.applied(model, y) if gated and gates is not None else nullcontext():
            out = model_output(model, x)  # (N, K)
        value = nn.functional.cross_entropy(out, y) if loss is None else loss(out)
    if gated and gates is not None:
        value = value + sparsity * gates.penalty()
    precision.step(value, optimizer)
    if gated and gates is not None:
        gates.step(gate_lr)
    return float(value.detach())
