"""explainfix: prune CNNs by spatial-filter saliency, fix their spatial filters, explain their spectra.

The public API is imported lazily so that `explainfix --help` answers without importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_model": "io.checkpoints",
    "open_model": "io.checkpoints",
    "save_model": "io.checkpoints",
    "ArchSpec": "io.checkpoints",
    "load_data": "io.data",
    "Dataset": "io.data",
    "spatial_saliency": "saliency",
    "gradient_weights": "saliency",
    "spatial_convs": "models",
    "zero_least_salient": "pruning.pipeline",
    "prune": "pruning.pipeline",
    "PruneReport": "pruning.pipeline",
    "PruneSettings": "pruning.pipeline",
    "remove_dead_channels": "pruning.dead_channels",
    "fix_spatial_filters": "training.fixed",
    "fix": "training.fixed",
    "steered_init": "training.fixed",
    "finetune": "training.finetune",
    "Recipe": "training.finetune",
    "FinetuneReport": "training.finetune",
    "describe": "evaluation.info",
    "analyse_classes": "classes.analysis",
    "extract": "classes.extract",
    "ClassGates": "classes.gates",
    "class_gated_step": "classes.gates",
    "evaluate": "evaluation.scores",
    "EvaluationReport": "evaluation.scores",
    "loss_for": "training.losses",
    "explain": "explanation",
    "UserError": "errors",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
