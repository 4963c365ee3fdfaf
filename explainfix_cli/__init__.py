"""explainfix: prune CNNs by spatial-filter saliency, fix their spatial filters, explain their spectra.

The public API is imported lazily so that `explainfix --help` answers without importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_model": "checkpoints",
    "open_model": "checkpoints",
    "save_model": "checkpoints",
    "ArchSpec": "checkpoints",
    "load_data": "data",
    "Dataset": "data",
    "spatial_saliency": "saliency",
    "gradient_weights": "saliency",
    "spatial_convs": "models",
    "zero_least_salient": "pruning",
    "prune": "pruning",
    "PruneReport": "pruning",
    "remove_dead_channels": "channels",
    "fix_spatial_filters": "fixed",
    "fix": "fixed",
    "steered_init": "fixed",
    "finetune": "training",
    "Recipe": "training",
    "FinetuneReport": "training",
    "describe": "info",
    "analyse_classes": "classes",
    "extract": "classes",
    "ClassGates": "classes",
    "class_gated_step": "classes",
    "evaluate": "evaluation",
    "EvaluationReport": "evaluation",
    "loss_for": "losses",
    "explain": "explanation",
    "UserError": "errors",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
