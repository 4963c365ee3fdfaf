"""Mixed precision for `finetune --amp` (docs/method.md §4): the forward pass and the loss in half
precision, the weights, the optimiser and the validation in float32.

On CUDA the half type is float16, whose small range underflows small gradients, so the loss is
scaled before the backward pass and the step unscaled (`torch.amp.GradScaler`); on the CPU it is
bfloat16, which has float32's range and needs no scaling.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


class Precision:
    """How a training step computes: float32 (`amp` False) or mixed, on `device`."""

    def __init__(self, amp: bool, device: str) -> None:
        self.amp = amp
        self.device_type = torch.device(device).type
        self.dtype = torch.float16 if self.device_type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda") if amp and self.device_type == "cuda" else None

    def autocast(self) -> AbstractContextManager[object]:
        """Around the forward pass and the loss."""
        if not self.amp:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """The backward pass and the optimiser's step, with the loss scaled where float16 needs it."""
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()
