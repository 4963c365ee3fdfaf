"""`explainfix info`: what a model file holds and what it costs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from explainfix_cli.evaluation.measure import count_macs, kernel_counts
from explainfix_cli.io.checkpoints import LoadedModel
from explainfix_cli.models import spatial_convs


@dataclass
class LayerInfo:
    name: str
    type: str
    weight_shape: list[int]
    params: int
    spatial: bool
    zero_kernels: int | None
    fixed: bool


@dataclass
class ModelInfo:
    path: str
    arch: dict[str, Any] | None
    params: int
    trainable_params: int
    spatial_layers: int
    spatial_kernels: int
    zero_kernels: int
    fixed_tensors: list[str]
    input_size: list[int] | None
    macs: int | None
    layers: list[LayerInfo] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    preprocessing: dict[str, Any] | None = None  # input normalisation the file records

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def describe(loaded: LoadedModel, input_size: tuple[int, ...] | None = None) -> ModelInfo:
    """Layers, parameters, spatial kernels, fixed tensors, MACs (for `input_size`) and history."""
    model = loaded.model
    spatial = {name for name, _ in spatial_convs(model)}
    if input_size is None:  # a pruned file remembers the input size it was pruned on, a sample the one it was trained on
        input_size = loaded.input_size
    layers = []
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if w is None or not hasattr(w, "shape") or any(True for _ in m.children()):
            continue
        is_spatial = name in spatial
        layers.append(LayerInfo(
            name=name,
            type=type(m).__name__,
            weight_shape=list(w.shape),
            params=sum(p.numel() for p in m.parameters(recurse=False)),
            spatial=is_spatial,
            zero_kernels=int((w.detach().flatten(2) == 0).all(dim=2).sum()) if is_spatial else None,
            fixed=not w.requires_grad,
        ))
    total, zero = kernel_counts(model)
    return ModelInfo(
        path=str(loaded.path),
        arch=loaded.arch.to_json() if loaded.arch else None,
        params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        spatial_layers=len(spatial),
        spatial_kernels=total,
        zero_kernels=zero,
        fixed_tensors=[n for n, p in model.named_parameters() if not p.requires_grad],
        input_size=list(input_size) if input_size else None,
        macs=count_macs(model, input_size) if input_size else None,
        layers=layers,
        history=loaded.history,
        preprocessing=None if loaded.preprocessing is None else loaded.preprocessing.to_json(),
    )
