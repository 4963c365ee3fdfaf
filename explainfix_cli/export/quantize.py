"""int8 post-training static quantisation of an ONNX file with onnxruntime's quantiser (docs/export.md).

QDQ format (QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses into integer kernels, and
that other runtimes read too), int8 weights, uint8 activations with min/max ranges calibrated on
the user's data. Weights get one scale per tensor by default: measured on the bundled samples
(docs/export.md), one scale per output channel kept the same held-out accuracy and made the file
larger (a depthwise 3x3 channel's 9 int8 weights carry 5 bytes of scale and zero point), so
`per_channel` is there for models whose channels differ widely in range; measure it with `evaluate`. The graph is first prepared with onnxruntime's
`quant_pre_process` (shape inference and constant folding) where it can be.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from explainfix_cli.errors import UserError
from explainfix_cli.io.data import Dataset


def quantize_int8(float_path: Path, out_path: Path, calib: Dataset, *, per_channel: bool = False) -> None:
    """Write the int8 version of the ONNX file `float_path` to `out_path`, calibrated on `calib`'s inputs."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self, batches: Iterator[Any]) -> None:
            self.batches = batches

        def get_next(self) -> dict[str, Any] | None:
            x = next(self.batches, None)
            return None if x is None else {"input": x}

    if calib.num_samples == 0:
        raise UserError("the calibration data holds no samples; give int8 quantisation some of the model's inputs.")
    batches = (x.contiguous().numpy() for x, _ in calib)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        prepared = _prepared(float_path, Path(tmp) / "prepared.onnx")
        logging.getLogger("root").setLevel(logging.ERROR)  # the quantiser logs its advice on the root logger
        quantize_static(
            str(prepared), str(out_path), Reader(batches), quant_format=QuantFormat.QDQ, per_channel=per_channel,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            extra_options={"CalibTensorRangeSymmetric": False},
        )
    compact_names(out_path)


def _prepared(float_path: Path, out: Path) -> Path:
    """`quant_pre_process`'s version of the file, or the file itself where that step fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(float_path), str(out), skip_symbolic_shape=False)
    except Exception:  # symbolic shape inference fails on some graphs; the quantiser still works without it
        return float_path
    return out


def compact_names(path: Path) -> None:
    """Rename the graph's inner tensors and nodes to short names (t0, n0, ...): the quantiser's
    names (`..._QuantizeLinear_Output`, `..._zero_point`) take a small model's int8 file a third
    above its weights. The graph's inputs and outputs keep their names."""
    import onnx

    proto = onnx.load(str(path))
    graph = proto.graph
    kept = {v.name for v in (*graph.input, *graph.output)}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in kept:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for t in graph.initializer:
        t.name = short(t.name)
    for i, node in enumerate(graph.node):
        node.name = f"n{i}"
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
        del node.metadata_props[:]
    for v in graph.value_info:
        v.name = short(v.name)
    onnx.save(proto, str(path))
