"""ONNX files: a torch.export program translated by torch's ONNX exporter (docs/export.md).

Opset 18, input `input` and output `output`, the batch axis dynamic (it stays symbolic from the
program). explainfix's record goes into the model's metadata_props under `explainfix`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from explainfix_cli.export.check import exporter_failure, quiet
from explainfix_cli.export.runtime import METADATA_KEY

OPSET = 18


def write_onnx(model: nn.Module, program: torch.export.ExportedProgram, x: torch.Tensor, path: Path, metadata: dict[str, Any]) -> None:
    """Translate `program` (the trace of `model` on `x`) to ONNX at `path`. A failure is a
    UserError naming the layer the exporter could not translate."""

    def attempt(module: nn.Module, args: tuple[Any, ...]) -> Any:
        source = program if module is model else torch.export.export(module, args)
        return torch.onnx.export(source, args, None, dynamo=True, opset_version=OPSET, optimize=True,
                                 input_names=["input"], output_names=["output"], verbose=False)

    with quiet():
        try:
            onnx_program = attempt(model, (x,))
        except Exception as e:  # the exporter raises many types; `exporter_failure` finds the layer and words it
            raise exporter_failure(model, x, e, "torch.onnx", attempt) from None
    onnx_program.model.metadata_props[METADATA_KEY] = json.dumps(metadata, sort_keys=True)
    onnx_program.save(str(path))


def set_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """Replace explainfix's record in the ONNX file at `path` (after quantisation rewrote it)."""
    import onnx

    proto = onnx.load(str(path))
    kept = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(metadata, sort_keys=True))
    onnx.save(proto, str(path))
