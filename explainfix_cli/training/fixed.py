"""docs/method.md §4: spatially fixed filters (never learned: requires_grad=False) and steered initialisation.

A spatially fixed network learns only its channel mixers (1x1 convolutions), normalisation and
linear layers. Trained from scratch, its fixed filters must be *steered* (DCT-II basis vectors or
generalised Haar filters); plain random fixed filters train badly — the paper's key insight,
which `random` (plain Kaiming, fixed) lets users see for themselves.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from explainfix_cli.choices import Init
from explainfix_cli.dct import dct2_basis
from explainfix_cli.models import model_output, require_spatial_convs, spatial_convs

INITS: tuple[Init, ...] = ("keep", "dct2", "ghaar", "random")


def fix_spatial_filters(model: nn.Module) -> list[str]:
    """Freeze every spatial conv's weight and bias; return the names of the fixed tensors."""
    fixed = []
    for name, conv in spatial_convs(model):
        for pname, p in conv.named_parameters(recurse=False):
            p.requires_grad_(False)
            fixed.append(f"{name}.{pname}")
    return fixed


def dct2_assignment(out_channels: int, in_kernels: int, basis_size: int, generator: torch.Generator) -> torch.Tensor:
    """(O, I/groups) index of the DCT-II basis vector each kernel gets (docs/method.md §4, DCT2 init).

    Per output channel, its input kernels cycle through a random permutation of the basis, so an
    output channel with at least `basis_size` input kernels uses every basis vector. When output
    channels have fewer kernels than that (depthwise convolutions), consecutive output channels
    continue one permutation (a fresh one every `basis_size` kernels), so the layer still uses
    every basis vector.
    """
    if in_kernels >= basis_size:
        perms = torch.stack([torch.randperm(basis_size, generator=generator) for _ in range(out_channels)])  # (O, K)
        return perms[:, torch.arange(in_kernels) % basis_size]  # (O, I/groups)
    total = out_channels * in_kernels
    cycles = math.ceil(total / basis_size)
    stream = torch.cat([torch.randperm(basis_size, generator=generator) for _ in range(cycles)])  # (cycles*K,)
    return stream[:total].reshape(out_channels, in_kernels)  # (O, I/groups)


def dct2_kernels(weight_shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """DCT2-initialised weight of `weight_shape` (O, I/groups, kh, kw): one basis vector per kernel."""
    o, i, kh, kw = weight_shape
    basis = dct2_basis(kh, kw, torch.float32)  # (kh*kw, kh*kw), rows are basis vectors
    index = dct2_assignment(o, i, kh * kw, generator)  # (O, I/groups)
    return basis[index].reshape(o, i, kh, kw)  # (O, I/groups, kh, kw)


def ghaar_kernel(h: torch.Tensor, v: torch.Tensor, d: torch.Tensor, f: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Generalised Haar filters (docs/method.md §4): `h·outer(c, 1) + v·outer(1, c) + d·outer(c, c)`.

    `c = cos(f·x)` with `x = linspace(0, π, k)` along each axis; `h, v, d, f` are tensors of one
    shape S (one steering per kernel), the result has shape S + (kh, kw). Not normalised.
    """
    rows = torch.cos(f[..., None] * torch.linspace(0, math.pi, kh))  # S + (kh,)
    cols = torch.cos(f[..., None] * torch.linspace(0, math.pi, kw))  # S + (kw,)
    rows, cols = rows[..., :, None], cols[..., None, :]  # S + (kh, 1), S + (1, kw)
    return h[..., None, None] * rows + v[..., None, None] * cols + d[..., None, None] * rows * cols  # S + (kh, kw)


def ghaar_kernels(weight_shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """GHaar-initialised weight: per kernel `h, v, d ~ U(-1, 1)`, `f ~ U(0, 2(k - 1))`, drawn in that order."""
    o, i, kh, kw = weight_shape
    h, v, d = (torch.rand(o, i, generator=generator) * 2 - 1 for _ in range(3))  # (O, I/groups) each
    f = torch.rand(o, i, generator=generator) * 2 * (max(kh, kw) - 1)  # (O, I/groups)
    return ghaar_kernel(h, v, d, f, kh, kw)  # (O, I/groups, kh, kw)


def kaiming_kernels(weight_shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Plain Kaiming-normal filters, std sqrt(2 / fan_in): the paper's unsteered negative control."""
    w = torch.empty(weight_shape)  # (O, I/groups, kh, kw)
    return nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu", generator=generator)


STEERED = {"dct2": dct2_kernels, "ghaar": ghaar_kernels, "random": kaiming_kernels}


def steered_init(model: nn.Module, init: Init, generator: torch.Generator) -> int:
    """Re-initialise every spatial conv's weight in place by `init` (docs/method.md §4); returns the kernels set.

    `keep` leaves the weights alone. Biases are kept. Layers are drawn in module order from
    `generator`, so the same seed gives the same filters.
    """
    if init not in INITS:
        raise ValueError(f"unknown initialisation {init!r}; choose one of {', '.join(INITS)}.")
    if init == "keep":
        return 0
    count = 0
    for _, conv in require_spatial_convs(model):
        w = conv.weight
        with torch.no_grad():
            w.copy_(STEERED[init](w.shape, generator).to(w.dtype))
        count += w.shape[0] * w.shape[1]
    return count


@dataclass
class FixReport:
    """What `fix` did: the initialisation, the kernels it set, and what is left to learn."""

    init: str
    spatial_layers: int
    spatial_kernels: int
    reinitialised_kernels: int
    fixed_tensors: int
    params: int
    trainable_params: int
    seed: int
    input_size: list[int] | None = None
    out: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def history_step(self) -> dict[str, Any]:
        return {"step": "fix", **{k: v for k, v in self.to_json().items() if k != "out"}}


def fix(
    model: nn.Module, init: Init = "keep", *, seed: int = 0, sample_shape: tuple[int, ...] | None = None
) -> tuple[nn.Module, FixReport]:
    """docs/method.md §4: optionally re-initialise the spatial filters with steered ones, then fix them.

    The model is changed in place; random draws come from a generator seeded with `seed`. With
    `sample_shape` (C, H, W) the model is first run on one such input (a misfit is reported) and
    the size is recorded, so `info` can count MACs later.
    """
    convs = require_spatial_convs(model)
    if sample_shape is not None:
        with torch.no_grad():
            model_output(model.eval(), torch.zeros(1, *sample_shape))
    reinitialised = steered_init(model, init, torch.Generator().manual_seed(seed))
    fixed = fix_spatial_filters(model)
    report = FixReport(
        init=init,
        spatial_layers=len(convs),
        spatial_kernels=sum(m.weight.shape[0] * m.weight.shape[1] for _, m in convs),
        reinitialised_kernels=reinitialised,
        fixed_tensors=len(fixed),
        params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        seed=seed,
        input_size=list(sample_shape) if sample_shape else None,
    )
    return model, report
