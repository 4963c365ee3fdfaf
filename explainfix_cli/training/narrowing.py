"""Training a fixed, pruned model on only what its non-zero kernels use (docs/method.md §4).

A zeroed kernel whose channel could not leave (§3) is still multiplied while the model trains.
Two context managers, used by `training.finetune`, leave such work out for the duration, and
change nothing of the model's outputs or of the gradients of what they depend on (the terms left
out are products with exact zeros, so only the order of a float sum changes):

- `reading_used_inputs`: a fixed convolution (groups 1) whose kernels from some input channels
  are all zero reads only the other inputs. DenseNet's concatenated channels, which later layers
  still read, are the case.
- `skipping_unread_channels`: a fixed depthwise convolution whose kernel of a channel is all zero
  does not read that channel, so the layers that feed only it (a convolution, then channel-wise
  layers: a batch norm, activations) skip it too. MobileNet's inverted residuals are the case:
  the depthwise channel cannot leave, because what it writes (a constant) is multiplied by a
  squeeze-and-excitation gate, but the 1x1 expansion that feeds it need not compute it.

Each layer changed gets a forward of its own while inside, restored afterwards. What the
channels left out would have done matters to nothing downstream; the one trace of them is that
a skipped batch norm's running statistics of those channels stay as they were.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from explainfix_cli.models import spatial_convs

# channel-wise layers without parameters (and without randomness: a dropout's mask would change)
ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Identity)  # fmt: skip


@contextmanager
def reading_used_inputs(model: nn.Module) -> Iterator[int]:
    """While inside, every fixed spatial convolution (weight not trainable, `groups` 1) whose
    kernels from some input channels are all zero reads only the other input channels: fewer
    multiply-accumulates forward and in the backward pass to the input. Its input gradient for
    the left-out channels is zero, as it is without this. Yields how many convolutions read fewer inputs.
    """
    narrowed = []
    for _, conv in spatial_convs(model):
        weight = conv.weight
        if weight.requires_grad or conv.groups != 1 or type(conv) is not nn.Conv2d or "forward" in vars(conv):
            continue
        used = (weight != 0).flatten(2).any(dim=2).any(dim=0)  # (in_channels,)
        if bool(used.all()) or not bool(used.any()):
            continue
        inputs = used.nonzero().flatten()  # (used,)
        conv.forward = functools.partial(_read_inputs, conv, inputs, weight[:, inputs].contiguous())  # type: ignore[method-assign]
        narrowed.append(conv)
    try:
        yield len(narrowed)
    finally:
        for conv in narrowed:
            del conv.forward


def _read_inputs(conv: nn.Conv2d, inputs: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return conv._conv_forward(x.index_select(1, inputs), weight, conv.bias)  # reads (N, C_used, H, W)


@contextmanager
def skipping_unread_channels(model: nn.Module) -> Iterator[int]:
    """While inside, for every fixed depthwise convolution with all-zero kernels whose input comes
    from a convolution (groups 1) through channel-wise layers only (at most one batch norm, and
    `ELEMENTWISE` activations), each used once and read by nothing else: the convolution computes
    only the channels with a non-zero kernel (at least one), the batch norm normalises only those,
    and the depthwise convolution reads them and writes its constant (its bias, or zero) elsewhere.

    The chains are found on the model's `torch.fx` graph; a model fx cannot trace is left as it is.
    Yields how many chains skip channels.
    """
    with ExitStack() as restore:
        chains = _feeding_chains(model)
        for producer, norm, depthwise in chains:
            used = (depthwise.weight != 0).flatten(1).any(dim=1).nonzero().flatten()  # (K,)
            if len(used) == 0:  # keep one channel: a convolution must write something
                used = torch.zeros(1, dtype=torch.long)
            for module, forward in (
                (producer, functools.partial(_producer_forward, producer, used)),
                (norm, functools.partial(_norm_forward, norm, used)),
                (depthwise, functools.partial(_depthwise_forward, depthwise, used)),
            ):
                if module is not None:
                    module.forward = forward  # type: ignore[method-assign]
                    restore.callback(delattr, module, "forward")
        yield len(chains)


def _feeding_chains(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d | None, nn.Conv2d]]:
    """(producer, batch norm or None, depthwise conv) for each chain `skipping_unread_channels` may narrow."""
    if not any(_skippable_depthwise(m) for m in model.modules()):  # most models: no trace needed
        return []
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # control flow on values, unsupported ops: no chains, the model trains as it is
        return []
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or not _skippable_depthwise(modules[node.target]) or calls[node.target] != 1:
            continue
        norm: nn.BatchNorm2d | None = None
        source = node.args[0] if node.args else None
        while isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1:
            module = modules[source.target]
            if isinstance(module, ELEMENTWISE):
                source = source.args[0]
                continue
            if calls[source.target] != 1 or "forward" in vars(module):
                break
            if type(module) is nn.BatchNorm2d and norm is None:
                norm, source = module, source.args[0]
                continue
            if type(module) is nn.Conv2d and module.groups == 1:
                chains.append((module, norm, modules[node.target]))
            break
    return chains


def _skippable_depthwise(m: nn.Module) -> bool:
    """A fixed depthwise nn.Conv2d (zero padding) with at least one all-zero kernel."""
    return (
        type(m) is nn.Conv2d and m.groups == m.in_channels == m.out_channels > 1 and m.padding_mode == "zeros"
        and not m.weight.requires_grad and bool((m.weight == 0).flatten(1).all(dim=1).any())
    )  # fmt: skip


def _producer_forward(conv: nn.Conv2d, used: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return conv._conv_forward(x, conv.weight[used], None if conv.bias is None else conv.bias[used])  # (N, K, H, W)


def _norm_forward(bn: nn.BatchNorm2d, used: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`_BatchNorm.forward` on the channels `used`: the same statistics, and the same update of
    their running statistics (written back; the other channels' stay as they were)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    running = bn.running_mean is not None and bn.running_var is not None
    passed = running and (not bn.training or bn.track_running_stats)  # as torch passes them
    mean = bn.running_mean[used] if passed else None  # copies: F.batch_norm updates them in place
    var = bn.running_var[used] if passed else None
    weight = None if bn.weight is None else bn.weight[used]
    bias = None if bn.bias is None else bn.bias[used]
    out = F.batch_norm(x, mean, var, weight, bias, bn.training or not running, factor, bn.eps)
    if bn.training and passed:
        with torch.no_grad():
            bn.running_mean[used] = mean
            bn.running_var[used] = var
    return out


def _depthwise_forward(conv: nn.Conv2d, used: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The depthwise conv on the channels `used` (x holds only those), its bias everywhere else."""
    y = F.conv2d(x, conv.weight[used], None, conv.stride, conv.padding, conv.dilation, len(used))  # (N, K, H', W')
    out = y.new_zeros(y.shape[0], conv.out_channels, *y.shape[2:]).index_copy(1, used, y)  # (N, C, H', W')
    return out if conv.bias is None else out + conv.bias.view(1, -1, 1, 1)
