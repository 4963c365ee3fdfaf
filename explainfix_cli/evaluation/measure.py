"""What a model costs and how well it does: parameters, MACs, spatial kernels, latency, outputs and metrics."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from explainfix_cli.distributed import gather_minibatches, rank_and_world
from explainfix_cli.io.data import Dataset
from explainfix_cli.models import model_output, spatial_convs


@dataclass(frozen=True)
class Size:
    """Parameters, multiply-accumulates per sample, and spatial kernels (all / all-zero)."""

    params: int
    macs: int
    spatial_kernels: int
    zero_kernels: int


def count_macs(model: nn.Module, sample_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of convolutions and linear layers for one input of `sample_shape`."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.modules.conv._ConvNd):
            # a conv: every output element reads weight[0] (I/groups * kernel); a transposed conv:
            # every input element is spread through weight[0] (O/groups * kernel)
            elements = inputs[0][0].numel() if module.transposed else output[0].numel()
            total += elements * module.weight[0].numel()
        elif isinstance(module, nn.Linear):
            total += output[0].numel() * module.in_features

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        with torch.no_grad():
            model_output(model, torch.zeros(1, *sample_shape, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return total


def kernel_counts(model: nn.Module) -> tuple[int, int]:
    """(all spatial kernels, all-zero spatial kernels)."""
    kernels = [m.weight.detach().flatten(2) for _, m in spatial_convs(model)]  # (O, I/groups, kh*kw)
    return sum(k.shape[0] * k.shape[1] for k in kernels), sum(int((k == 0).all(dim=2).sum()) for k in kernels)


def model_size(model: nn.Module, sample_shape: tuple[int, ...]) -> Size:
    total, zero = kernel_counts(model)
    params = sum(p.numel() for p in model.parameters())
    return Size(params=params, macs=count_macs(model, sample_shape), spatial_kernels=total, zero_kernels=zero)


def median_latency_ms(models: Sequence[nn.Module], x: torch.Tensor, repeats: int = 30, warmup: int = 3) -> list[float]:
    """Median milliseconds of one forward on `x` per model, in eval mode without autograd, after
    `warmup` untimed runs. The models run in turn, so a change in the machine's load touches each
    of them alike (`sweep` times its points this way, `bench` its models in both forms)."""
    times: list[list[float]] = [[] for _ in models]
    for model in models:
        model.eval()
    sync = torch.cuda.synchronize if x.is_cuda else lambda: None  # a CUDA forward returns before it has run
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for model, spent in zip(models, times, strict=True):
                sync()
                tic = time.perf_counter()
                model(x)
                sync()
                if i >= warmup:
                    spent.append((time.perf_counter() - tic) * 1e3)
    return [statistics.median(t) for t in times]


def outputs(model: nn.Module, data: Dataset, device: str = "cpu") -> torch.Tensor:
    """The model's outputs on every sample of `data`, concatenated on the CPU."""
    return outputs_together([model], data, device)[0]


@torch.no_grad()
def outputs_together(
    models: Sequence[nn.Module], data: Dataset, device: str = "cpu", limits: Sequence[int | None] | None = None
) -> list[torch.Tensor]:
    """Each model's outputs on every sample of `data` (concatenated on the CPU), from one pass
    over it: every minibatch is read once and run through the models in turn, so several stages
    of a prune cost one reading of the data, not one each. `limits[i]`, when not None, stops model
    i after the first minibatches that hold that many samples (its outputs are then on those only).
    Under torchrun each process runs its own minibatches (`Dataset.shard`) and every process gets
    all the outputs (`distributed.gather_minibatches`): call it on every process alike."""
    for model in models:
        model.eval()
    limits = list(limits) if limits is not None else [None] * len(models)
    rank, world = rank_and_world()
    own: dict[int, list[torch.Tensor | None]] = {}
    for b, (x, _) in zip(range(rank, len(data), world), data.shard(rank, world), strict=True):
        start = b * data.batch_size  # samples in the minibatches before this one
        busy = [limit is None or start < limit for limit in limits]
        if not any(busy):  # every model has what it needs: read no further
            break
        x = x.to(device)
        own[b] = [model_output(model, x).cpu() if on else None for model, on in zip(models, busy, strict=True)]
    every = gather_minibatches(own).values()
    return [torch.cat([out[i] for out in every if out[i] is not None]) for i in range(len(models))]


def metric(data: Dataset, out: torch.Tensor) -> float:
    """accuracy (class labels), mean ROC AUC over classes (multi-label) or Dice at logit 0 (masks)."""
    y = data.y[: len(out)]
    if data.target_kind == "labels":
        return float((out.argmax(dim=1) == y).float().mean())
    if data.target_kind == "mask":
        pred, truth = (out > 0).float(), (y > 0.5).float()
        return float(2 * (pred * truth).sum() / (pred.sum() + truth.sum()).clamp_min(1e-12))
    valid = [a for a in auc_per_label(y, out) if a is not None]
    return float(sum(valid) / len(valid)) if valid else float("nan")


def auc_per_label(y: torch.Tensor, out: torch.Tensor) -> list[float | None]:
    """ROC AUC of each label's logit against its 0/1 target (N, K); None for a label with one class only."""
    return [roc_auc(out[:, k], y[:, k] > 0.5) for k in range(y.shape[1])]


def roc_auc(score: torch.Tensor, positive: torch.Tensor) -> float | None:
    """Mann-Whitney form of the ROC AUC, ties counted half; None when a class has one kind only."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    pos, neg = score[positive].double(), score[~positive].double()
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (n_pos * n_neg))


def paired_auc_drop(full: torch.Tensor, other: torch.Tensor, positive: torch.Tensor) -> tuple[float, float] | None:
    """(AUC of `full` minus AUC of `other`, its standard error) for two (N,) scores of the same
    samples, by DeLong's placements: each positive's share of negatives it outranks (ties half)
    and each negative's share of positives that outrank it, differenced between the two scores;
    the variance is var(positives' differences)/m + var(negatives' differences)/n. None when a
    class has one kind only, or fewer than two samples of a kind."""
    m, n = int(positive.sum()), int((~positive).sum())
    if m < 2 or n < 2:
        return None

    def placements(score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos, neg = score[positive].double(), score[~positive].double()
        psi = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()  # (m, n)
        return psi.mean(dim=1), psi.mean(dim=0)  # (m,), (n,)

    (full_pos, full_neg), (other_pos, other_neg) = placements(full), placements(other)
    d_pos, d_neg = full_pos - other_pos, full_neg - other_neg
    variance = d_pos.var() / m + d_neg.var() / n
    return float(d_pos.mean()), float(variance.clamp_min(0).sqrt())


def metric_upper_bound(data: Dataset, out: torch.Tensor) -> float:
    """The best `metric` the whole of `data` can still reach, given the outputs `out` on its first
    samples: the rest all right (accuracy), or every remaining mask pixel found and nothing else
    (Dice). An AUC has no such bound short of the end (1.0). Lets a search stop a hopeless
    evaluation after a minibatch or two."""
    n, total = len(out), data.num_samples
    y = data.y[:total]
    if data.target_kind == "labels":
        return (int((out.argmax(dim=1) == y[:n]).sum()) + total - n) / total
    if data.target_kind == "mask":
        pred, truth = out > 0, y[:n] > 0.5
        rest = int((y[n:] > 0.5).sum())  # every remaining true pixel found: +2 above, +2 below
        above = 2 * (int((pred & truth).sum()) + rest)
        return above / max(int(pred.sum()) + int(truth.sum()) + 2 * rest, 1) if above else 0.0
    return 1.0
