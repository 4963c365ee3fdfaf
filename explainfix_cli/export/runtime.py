"""An exported file run as a model: an `.onnx` through onnxruntime, a `.pt2` through torch.export (docs/export.md).

`evaluate` and `bench` take these in place of an `nn.Module`, so a CI gate measures the file that
ships, with the runtime that serves it. The file's own record (the `explainfix` metadata written at
export: input size, preprocessing, parameters, MACs, history) travels with it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from explainfix_cli.errors import UserError

METADATA_KEY = "explainfix"  # ONNX metadata_props key; for a .pt2 the extra file explainfix.json
PT2_EXTRA = "explainfix.json"
INSTALL_HINT = "install the export extra: pip install explainfix[export]"


def require_onnx() -> None:
    """onnx, onnxruntime and onnxscript importable, else one sentence saying how to get them."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"ONNX export and ONNX models need {', '.join(missing)}, which are not installed; {INSTALL_HINT}.")


class ExportedModel(nn.Module):
    """An exported file as a module: `forward(x)` runs the file. Its mode was fixed at export, so
    `train()`/`eval()` change nothing; `recorded_size` gives (params, macs, weight bytes) for bench,
    which cannot count them by hooks on layers an exported graph no longer has."""

    runs_as_exported = True

    def __init__(self, path: Path, metadata: dict[str, Any]) -> None:
        super().__init__()
        self.path = Path(path)
        self.metadata = metadata

    def train(self, mode: bool = True) -> ExportedModel:  # the exported program's mode is fixed
        return self

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.parameters(), *self.buffers()))

    @property
    def recorded_size(self) -> tuple[int, int, int] | None:
        """(params, macs per sample, weight bytes) as recorded at export; None for a foreign file."""
        params, macs = self.metadata.get("params"), self.metadata.get("macs")
        return None if params is None or macs is None else (int(params), int(macs), self.weight_bytes())


class OnnxModel(ExportedModel):
    """An `.onnx` file run by onnxruntime on the CPU, with as many intra-op threads as torch has
    (bench's `threads` applies to it too; the session is rebuilt when that count changes)."""

    def __init__(self, path: Path, metadata: dict[str, Any]) -> None:
        super().__init__(path, metadata)
        self._session: Any = None
        self._threads = 0
        self._session_for(torch.get_num_threads())

    def _session_for(self, threads: int) -> Any:
        import onnxruntime as ort

        if self._session is None or threads != self._threads:
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            options.log_severity_level = 3  # warnings about unused initialisers are not for users
            # no busy-waiting between runs: it would take the CPU from whatever runs next (bench's --vs model)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            try:
                self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own types for damaged or foreign files
                raise UserError(f"{self.path} is an ONNX model that onnxruntime cannot read ({str(e).strip().splitlines()[0][:200]}).") from None
            self._threads = threads
        return self._session

    def weight_bytes(self) -> int:
        import onnx

        graph = onnx.load(str(self.path), load_external_data=False).graph
        return sum(len(t.raw_data) for t in graph.initializer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        session = self._session_for(torch.get_num_threads())
        feed = {session.get_inputs()[0].name: x.detach().cpu().contiguous().numpy()}
        try:
            out = session.run(None, feed)[0]
        except Exception as e:  # a wrong input shape: model_output turns a RuntimeError into its sentence
            raise RuntimeError(str(e).strip().splitlines()[0]) from None
        return torch.from_numpy(out).to(x.device)


class ProgramModel(ExportedModel):
    """A `.pt2` torch.export program, run by torch."""

    def __init__(self, path: Path, program: Any, metadata: dict[str, Any]) -> None:
        super().__init__(path, metadata)
        self.program = program.module()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)


def open_onnx(path: Path) -> OnnxModel:
    """An `.onnx` file as a model, with the metadata explainfix wrote into it (if any)."""
    try:
        require_onnx()
    except UserError as e:
        raise UserError(f"{path} is an ONNX model; {e}") from None
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and others for a damaged file
        raise UserError(f"{path} is an ONNX model that cannot be read ({type(e).__name__}); export it again.") from None
    recorded = {p.key: p.value for p in proto.metadata_props}.get(METADATA_KEY)
    return OnnxModel(path, json.loads(recorded) if recorded else {})


def open_program(path: Path) -> ProgramModel:
    """A `.pt2` torch.export program as a model, with the metadata explainfix saved beside it (if any)."""
    extra = {PT2_EXTRA: ""}
    try:
        with open(path, "rb") as f:  # a buffer: torch.export.load goes by the name, and a file's name may say anything
            program = torch.export.load(io.BytesIO(f.read()), extra_files=extra)
    except Exception as e:  # torch.export raises many types for foreign or damaged files
        raise UserError(f"{path} is not a readable torch.export program ({type(e).__name__}).") from None
    return ProgramModel(path, program, json.loads(extra[PT2_EXTRA]) if extra[PT2_EXTRA] else {})
