"""The memory layout a fine-tune trains in (`finetune --memory-format`, docs/method.md §4).

Channels-last (NHWC) keeps a pixel's channels together, the layout oneDNN's convolutions run in
natively; in PyTorch's default (NCHW) each convolution converts on the way in and out. Measured
here (`benchmarks/channels_last.py`, 2 CPU threads, batch 32, 128x128): a training step of the
ResNet, U-Net and MobileNet factories takes 0.62, 0.62 and 0.52 of its NCHW time. So `auto` trains
channels-last on the CPU; on CUDA, where nothing was measured, it keeps NCHW. The model is
converted back before it is returned (a written file is contiguous, as read).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from explainfix_cli.choices import MemoryFormat


def channels_last(memory_format: MemoryFormat, device: str) -> bool:
    """Whether a fine-tune on `device` trains channels-last."""
    return memory_format == "channels-last" or (memory_format == "auto" and torch.device(device).type == "cpu")


@contextmanager
def trained_in(models: Sequence[nn.Module | None], last: bool) -> Iterator[None]:
    """The models' 4-D parameters and buffers channels-last while inside (in place: the same
    Parameter objects, so an optimiser over them stays valid), contiguous again after."""
    if not last:
        yield
        return
    live = [m for m in models if m is not None]
    for m in live:
        m.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for m in live:
            m.to(memory_format=torch.contiguous_format)


def as_input(x: torch.Tensor, last: bool) -> torch.Tensor:
    """A minibatch of images laid out channels-last when training so (other inputs as they are)."""
    return x.contiguous(memory_format=torch.channels_last) if last and x.dim() == 4 else x
