"""torch.export programs (`.pt2`): the model traced once with a dynamic batch axis (docs/export.md).

The program is also what the ONNX exporter translates, so both formats share one trace.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from explainfix_cli.export.check import exporter_failure, quiet
from explainfix_cli.export.runtime import PT2_EXTRA

MAX_BATCH = 1 << 16  # the dynamic batch axis's upper bound (torch.export needs one to reason with)


def trace(model: nn.Module, x: torch.Tensor) -> torch.export.ExportedProgram:
    """`model` as a torch.export program whose batch axis is dynamic, traced on `x` (batch >= 2:
    torch.export specialises a batch of 1). An exporter failure is a UserError naming the layer."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)

    def attempt(module: nn.Module, args: tuple[Any, ...]) -> Any:
        return torch.export.export(module, args, dynamic_shapes=({0: batch},) if module is model else None)

    with quiet():
        try:
            return attempt(model, (x,))
        except Exception as e:  # the exporter raises many types; `exporter_failure` finds the layer and words it
            raise exporter_failure(model, x, e, "torch.export", attempt) from None


def save_program(program: torch.export.ExportedProgram, path: Path, metadata: dict[str, Any]) -> None:
    """Write `program` loadable by `torch.export.load`, with explainfix's record as an extra file."""
    buffer = io.BytesIO()  # torch.export wants a name ending in .pt2; the temporary file beside `out` has none
    torch.export.save(program, buffer, extra_files={PT2_EXTRA: json.dumps(metadata, sort_keys=True)})
    path.write_bytes(buffer.getvalue())
