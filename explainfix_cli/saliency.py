"""docs/method.md §1: the saliency of every spatial kernel, from one forward + backward per minibatch.

    L = sum(y * output);  G = dL/dW;  s[o, i] += sum_(kh, kw) |W[o, i] * G[o, i]|

Gradients are taken only for spatial conv weights: every other parameter is frozen for the pass,
so autograd builds nothing it does not need. Under `torchrun` each process takes every
world_size-th minibatch (and reads only those: `Dataset.shard`) and the score matrices are
all-reduced, so the sum is the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, get_args

import torch
from torch import nn

from explainfix_cli import progress
from explainfix_cli.choices import Criterion
from explainfix_cli.distributed import gather_minibatches, rank_and_world
from explainfix_cli.errors import UserError
from explainfix_cli.io.data import Dataset
from explainfix_cli.models import model_output, require_spatial_convs


@contextmanager
def _only_spatial_weights_trainable(model: nn.Module, weights: list[nn.Parameter]) -> Iterator[None]:
    saved = {p: p.requires_grad for p in model.parameters()}
    ids = {id(w) for w in weights}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in ids)
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)


def spatial_gradients(
    model: nn.Module, data: Dataset, device: str = "cpu"
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Per minibatch, dL/dW of every spatial conv weight, L = sum(target * output) (docs/method.md §1).

    Yields `{name: G}` with G of shape (O, I/groups, kh, kw), and the minibatch's outputs
    (detached); the model is put in eval mode.
    """
    convs = require_spatial_convs(model)
    weights = [m.weight for _, m in convs]
    rank, world = rank_and_world()
    model.eval()
    with torch.enable_grad(), _only_spatial_weights_trainable(model, weights):
        for x_shard, y_shard in data.shard(rank, world):  # this process's minibatches only
            x, y = x_shard.to(device), y_shard.to(device)
            out = model_output(model, x)
            objective = (data.targets(out, y) * out).sum()
            grads = torch.autograd.grad(objective, weights, allow_unused=True)
            yield {
                name: torch.zeros_like(w) if g is None else g
                for (name, _), w, g in zip(convs, weights, grads, strict=True)
            }, out.detach()


def _accumulate(
    model: nn.Module,
    data: Dataset,
    device: str,
    per_kernel: Callable[[nn.Conv2d, torch.Tensor], torch.Tensor],
    outputs: list[torch.Tensor] | None = None,
    label: str = "saliency",
) -> dict[str, torch.Tensor]:
    """Sum `per_kernel(conv, G)` -> (O, I/groups) or (k, O, I/groups) over minibatches (and processes, under torchrun).

    The model's outputs on every minibatch are appended to `outputs` (on the CPU; under torchrun
    gathered from every process, so each gets them all).
    """
    import torch.distributed as dist

    convs = require_spatial_convs(model)
    rank, world = rank_and_world()
    # per_kernel of a zero gradient gives the shape of the sums: (O, I/groups), or (k, O, I/groups)
    sums = {name: torch.zeros_like(per_kernel(m, torch.zeros_like(m.weight)), dtype=torch.float64) for name, m in convs}
    own: dict[int, torch.Tensor] = {}
    mine = range(rank, len(data), world)  # the minibatches `spatial_gradients` reads here
    with progress.stage(label, total=len(mine)):
        for b, (grads, out) in zip(mine, spatial_gradients(model, data, device), strict=True):
            for name, m in convs:
                sums[name] += per_kernel(m, grads[name])
            if outputs is not None:
                own[b] = out.cpu()
            progress.advance()
    if world > 1:
        for s in sums.values():
            dist.all_reduce(s)
    if outputs is not None:
        outputs.extend(gather_minibatches(own).values())
    return {k: v.cpu() for k, v in sums.items()}


def spatial_saliency(
    model: nn.Module,
    data: Dataset | None,
    criterion: Criterion = "gradient",
    device: str = "cpu",
    outputs: list[torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Kernel saliency per spatial conv, an (O, I/groups) matrix keyed by module name.

    `gradient` is docs/method.md §1; `magnitude` (sum |W[o, i]|) is the labelled data-free fallback.
    `outputs`, if given, receives the model's outputs per minibatch from the same forward passes
    (gradient saliency; under torchrun every process's), so the caller need not run them again.
    """
    convs = require_spatial_convs(model)
    if criterion == "magnitude":
        return {name: m.weight.detach().abs().sum(dim=(2, 3)).double().cpu() for name, m in convs}
    if data is None:
        raise UserError("gradient saliency needs data; without data, use the magnitude criterion (the data-free fallback).")
    return _accumulate(model, data, device, lambda m, g: (m.weight.detach() * g).abs().sum(dim=(2, 3)), outputs)


def gradient_weights(model: nn.Module, data: Dataset, device: str = "cpu") -> dict[str, torch.Tensor]:
    """docs/method.md §5 kernel weights: w_k = sum over minibatches and kernel positions of |G[k]|."""
    return _accumulate(model, data, device, lambda _, g: g.abs().sum(dim=(2, 3)), label="gradients")


def saliency_and_gradient_weights(
    model: nn.Module, data: Dataset, device: str = "cpu", outputs: list[torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """docs/method.md §1 saliency and §5 kernel weights together, from the same forward + backward passes
    (the same numbers as `spatial_saliency` and `gradient_weights`)."""

    def both(m: nn.Conv2d, g: torch.Tensor) -> torch.Tensor:
        return torch.stack([(m.weight.detach() * g).abs().sum(dim=(2, 3)), g.abs().sum(dim=(2, 3))])  # (2, O, I/groups)

    sums = _accumulate(model, data, device, both, outputs, label="saliency")
    return {k: v[0] for k, v in sums.items()}, {k: v[1] for k, v in sums.items()}


@dataclass
class SaliencySummary:
    """What `explainfix saliency` reports of the score matrices it wrote: per layer, shape, sum and maximum."""

    out: str
    criterion: Criterion
    layers: dict[str, dict[str, Any]]

    @classmethod
    def of(cls, scores: dict[str, torch.Tensor], out: str, criterion: Criterion) -> SaliencySummary:
        layers = {name: {"shape": list(s.shape), "total": float(s.sum()), "max": float(s.max())} for name, s in scores.items()}
        return cls(out, criterion, layers)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def save_saliency(scores: dict[str, torch.Tensor], path: str, force: bool, criterion: Criterion) -> SaliencySummary:
    """Write score matrices to safetensors (reusable by `prune --saliency`); returns their summary."""
    from safetensors.torch import save_file

    from explainfix_cli.io.outputs import atomic_file

    with atomic_file(path, force) as tmp:  # type: ignore[arg-type]
        save_file({k: v.contiguous() for k, v in scores.items()}, str(tmp), metadata={"criterion": criterion})
    return SaliencySummary.of(scores, path, criterion)


def load_saliency(path: str, model: nn.Module) -> tuple[dict[str, torch.Tensor], Criterion]:
    """Read scores written by `save_saliency`, check they belong to `model`; also the criterion
    that made them (the file says)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            scores = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
            criterion = (f.metadata() or {}).get("criterion")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"the saliency file {path} is not a readable safetensors file ({e}).") from None
    if criterion not in get_args(Criterion):
        raise UserError(f"the saliency file {path} does not say which criterion made it; write it again with `explainfix saliency`.")
    for name, m in require_spatial_convs(model):
        if name not in scores or tuple(scores[name].shape) != tuple(m.weight.shape[:2]):
            raise UserError(f"the saliency file {path} does not belong to this model (layer {name} missing or of another shape).")
    return scores, criterion
