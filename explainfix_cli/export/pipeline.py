"""`explainfix export`: a deployable file (ONNX or a torch.export program), checked against the model before it is written (docs/export.md).

One trace (`pt2.trace`, batch axis dynamic) serves both formats. The file is written to a
temporary path beside `out`, run there by the runtime that will serve it (onnxruntime for ONNX,
torch.export.load for pt2), compared with the model (`check.compare`), and only then renamed onto
`out`: a failed check leaves nothing. With `quantize="int8"` the float ONNX file passes the same
check first, then is quantised on `calib` (`quantize.quantize_int8`); an int8 file is judged by the
metric on `val`, which is reported before and after.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from explainfix_cli.choices import ExportFormat, Quantization
from explainfix_cli.errors import UserError
from explainfix_cli.evaluation.bench import deployment_form as fold
from explainfix_cli.evaluation.measure import count_macs, metric, outputs
from explainfix_cli.export.check import CHECK_BATCHES, RELATIVE_TOLERANCE, Comparison, check_inputs, compare
from explainfix_cli.export.onnx import OPSET, set_metadata, write_onnx
from explainfix_cli.export.pt2 import save_program, trace
from explainfix_cli.export.quantize import quantize_int8
from explainfix_cli.export.runtime import ExportedModel, open_onnx, open_program, require_onnx
from explainfix_cli.io.data import Dataset
from explainfix_cli.io.outputs import atomic_file, check_target
from explainfix_cli.io.preprocessing import Preprocessing
from explainfix_cli.models import model_output
from explainfix_cli.numbers import finite

RECORD_VERSION = "1"


class ExportMismatch(RuntimeError):
    """The exported file's outputs differ from the model's beyond the tolerance (exit 1: the request was right)."""


@dataclass
class ExportReport:
    """`export --json`: what was written and how well it matches the model."""

    format: str  # onnx | pt2
    out: str
    opset: int | None  # ONNX only
    input_size: list[int]  # (C, H, W); the batch axis is dynamic
    deployment_form: bool
    folded_batch_norms: int
    quantized: str | None  # int8 or None
    tolerance: float | None  # RELATIVE_TOLERANCE * max|output|; None for int8 (judged by the metric)
    relative_tolerance: float
    max_abs_diff: float  # the written file against the model, over the check batches
    max_abs_output: float
    check_batches: list[int]
    file_bytes: int
    float_file_bytes: int | None = None  # the float ONNX file an int8 one was made from
    metric: str | None = None  # accuracy | auc | dice, on `val`
    metric_before: float | None = None  # the model
    metric_after: float | None = None  # the written file
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        for key in ("metric_before", "metric_after", "max_abs_diff"):
            payload[key] = finite(payload[key])
        return payload


def _check_request(fmt: str, quantize: str | None, calib: Dataset | None) -> None:
    if fmt not in ("onnx", "pt2"):
        raise UserError(f"`fmt` must be onnx or pt2, not {fmt!r}.")
    if quantize not in (None, "int8"):
        raise UserError(f"`quantize` must be int8, not {quantize!r}.")
    if quantize and fmt != "onnx":
        raise UserError("int8 quantisation writes ONNX (onnxruntime's quantiser); export with format onnx.")
    if quantize and calib is None:
        raise UserError("int8 quantisation calibrates on the model's inputs; give calibration data.")
    if fmt == "onnx":
        require_onnx()


def _record(model: nn.Module, input_shape: tuple[int, ...], fmt: str, quantize: str | None, history: list[dict[str, Any]] | None, preprocessing: Preprocessing | None) -> dict[str, Any]:
    """The metadata written into the file: what `open_model` gives back as the file's record."""
    step = {"step": "export", "format": fmt, "quantized": quantize, "input_size": list(input_shape)}
    return {
        "format_version": RECORD_VERSION,
        "params": sum(p.numel() for p in model.parameters()),
        "macs": count_macs(model, input_shape),
        "history": [*(history or []), step],
        **({"preprocessing": preprocessing.to_json()} if preprocessing is not None else {}),
    }


def _score(model: nn.Module, val: Dataset | None) -> float | None:
    return None if val is None else metric(val, outputs(model, val))


def export(
    model: nn.Module,
    fmt: ExportFormat,
    out: str | Path,
    *,
    input_shape: tuple[int, ...],
    deployment_form: bool = True,
    quantize: Quantization | None = None,
    calib: Dataset | None = None,
    val: Dataset | None = None,
    seed: int = 0,
    force: bool = False,
    per_channel: bool = False,
    history: list[dict[str, Any]] | None = None,
    preprocessing: Preprocessing | None = None,
) -> ExportReport:
    """Export `model` for inputs (N, *input_shape) to `out` as `fmt`, checked before it is written.

    `deployment_form` folds batch norms into the convolutions first (as `bench` does). The float
    check compares the file's outputs with `model`'s at batch 1 and 3 within RELATIVE_TOLERANCE of
    the largest output magnitude; a mismatch raises ExportMismatch and writes nothing. `quantize`
    ("int8", ONNX only) calibrates on `calib` (`per_channel`: one weight scale per output channel
instead of per tensor); `val` reports the metric before and after.
    `history` and `preprocessing` (the model file's) are recorded in the written file.
    """
    started = time.perf_counter()
    _check_request(fmt, quantize, calib)
    out = Path(out)
    check_target(out, force)
    model = model.eval()
    folded = fold(model) if deployment_form else None
    runnable = model if folded is None else folded.model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(seed))  # (2, C, H, W): the trace's example
    model_output(model, x)  # a clear sentence when the input size does not fit the model
    record = _record(runnable, tuple(input_shape), fmt, quantize, history, preprocessing)
    program = trace(runnable, x)
    inputs = check_inputs(tuple(input_shape), seed + 1)
    report = ExportReport(
        format=fmt, out=str(out), opset=OPSET if fmt == "onnx" else None, input_size=list(input_shape),
        deployment_form=deployment_form, folded_batch_norms=folded.folded_batch_norms if folded else 0, quantized=quantize,
        tolerance=None, relative_tolerance=RELATIVE_TOLERANCE, max_abs_diff=0.0, max_abs_output=0.0,
        check_batches=list(CHECK_BATCHES), file_bytes=0,
        notes=[folded.note] if folded is not None and folded.note else [],
    )
    with atomic_file(out, force) as tmp:
        if quantize:
            _write_int8(model, runnable, program, x, tmp, record, calib, inputs, report, per_channel)  # type: ignore[arg-type]
            exported: ExportedModel = open_onnx(tmp)
        else:
            exported = _write_float(model, runnable, program, x, tmp, record, fmt, inputs, report)
        if val is not None:
            report.metric, report.metric_before, report.metric_after = val.metric_name, _score(model, val), _score(exported, val)
        report.file_bytes = tmp.stat().st_size
    report.seconds = time.perf_counter() - started
    return report


def _write_float(model: nn.Module, runnable: nn.Module, program: Any, x: torch.Tensor, tmp: Path, record: dict[str, Any], fmt: str, inputs: list[torch.Tensor], report: ExportReport) -> ExportedModel:
    """Write the float file to `tmp`, run it and check it against `model` (ExportMismatch if it differs)."""
    if fmt == "pt2":
        save_program(program, tmp, record)
        exported: ExportedModel = open_program(tmp)
    else:
        write_onnx(runnable, program, x, tmp, record)
        exported = open_onnx(tmp)
    _require_match(compare(model, exported, inputs), report, fmt)
    return exported


def _require_match(comparison: Comparison, report: ExportReport, what: str) -> None:
    report.max_abs_diff, report.max_abs_output, report.tolerance = comparison.max_abs_diff, comparison.max_abs_output, comparison.tolerance
    if not comparison.passed:
        raise ExportMismatch(
            f"the exported {what} file's outputs differ from the model's by up to {comparison.max_abs_diff:.3g}, beyond the "
            f"tolerance {comparison.tolerance:.3g} ({RELATIVE_TOLERANCE:g} of the largest output, {comparison.max_abs_output:.3g}); nothing was written."
        )


def _write_int8(model: nn.Module, runnable: nn.Module, program: Any, x: torch.Tensor, tmp: Path, record: dict[str, Any], calib: Dataset, inputs: list[torch.Tensor], report: ExportReport, per_channel: bool) -> None:
    """The float ONNX file (checked as usual, kept aside), quantised to int8 into `tmp`."""
    with tempfile.TemporaryDirectory(dir=tmp.parent) as work:
        float_path = Path(work) / "float.onnx"
        write_onnx(runnable, program, x, float_path, record)
        _require_match(compare(model, open_onnx(float_path), inputs), report, "float ONNX")
        report.float_file_bytes = float_path.stat().st_size
        quantize_int8(float_path, tmp, calib, per_channel=per_channel)
    set_metadata(tmp, record)
    with torch.no_grad():
        report.max_abs_diff = max(float((model_output(open_onnx(tmp), v) - model_output(model, v)).abs().max()) for v in inputs)
    report.tolerance = None  # int8 is judged by the metric on held-out data
