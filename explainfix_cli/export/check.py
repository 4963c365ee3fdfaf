"""Checking an exported file against the model before it is written, and naming the layer an exporter refuses (docs/export.md).

The float check: the file, run by the runtime that will serve it, gives outputs within
`RELATIVE_TOLERANCE * max|output|` of the model's, at batch 1 and at another batch size (the batch
axis is dynamic, so both must work). An int8 file cannot meet that; its check is the metric on
held-out data instead (`quantize`).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from explainfix_cli.errors import UserError
from explainfix_cli.models import model_output

RELATIVE_TOLERANCE = 1e-4  # of the largest output magnitude
CHECK_BATCHES = (1, 3)  # batch 1 and another size; the trace used batch 2


@dataclass(frozen=True)
class Comparison:
    max_abs_diff: float
    tolerance: float  # RELATIVE_TOLERANCE * max|model output| over the check batches
    max_abs_output: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def check_inputs(input_shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    """Random inputs (N, C, H, W) at each of CHECK_BATCHES, from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *input_shape, generator=g) for n in CHECK_BATCHES]


@torch.no_grad()
def compare(model: nn.Module, exported: nn.Module, inputs: list[torch.Tensor]) -> Comparison:
    """The largest difference between `exported`'s outputs and `model`'s on `inputs`."""
    diffs, peaks = [], []
    for x in inputs:
        want, got = model_output(model, x), model_output(exported, x)
        if got.shape != want.shape:
            raise UserError(f"the exported file gives outputs of shape {tuple(got.shape)} for a batch of {len(x)}, the model {tuple(want.shape)}.")
        diffs.append(float((got - want).abs().max()))
        peaks.append(float(want.abs().max()))
    peak = max(peaks)
    return Comparison(max(diffs), RELATIVE_TOLERANCE * peak, peak)


def exporter_failure(model: nn.Module, x: torch.Tensor, error: Exception, exporter: str, attempt: Callable[[nn.Module, tuple[Any, ...]], Any]) -> UserError:
    """One sentence for an exporter's failure on `model`: the deepest layer that fails alone on the
    inputs it gets inside the model (found by exporting layer by layer, only on this failure path),
    and the exporter's reason (the first line of its message)."""
    name, layer = _culprit(model, x, attempt)
    reason = _first_line(error)
    where = f"layer {name} ({type(layer).__name__})" if name else f"the model ({type(model).__name__})"
    return UserError(f"{exporter} cannot export {where}: {reason}; replace or rewrite that layer, or export the model with torch.export yourself.")


def _first_line(error: Exception) -> str:
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    # some exporters open their message with the graph they traced (`def forward(...)`): skip code
    said = [ln for ln in lines if not ln.startswith(("def ", "#", "File ", "return ")) and "=" not in ln.split(" ")[0]]
    return ((said or lines or [type(error).__name__])[0])[:300].rstrip(".")


def _culprit(model: nn.Module, x: torch.Tensor, attempt: Callable[[nn.Module, tuple[Any, ...]], Any]) -> tuple[str, nn.Module]:
    """(name, module) of the deepest module that fails to export on its own recorded inputs."""
    seen: dict[str, tuple[Any, ...]] = {}
    named = dict(model.named_modules())
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.setdefault(n, args)) for n, m in named.items() if n]
    try:
        with torch.no_grad():
            model(x)
    except Exception:  # the model does not even run: the top level is all we can name
        return "", model
    finally:
        for h in hooks:
            h.remove()
    name, module = "", model
    while True:
        failing = next(((n, c) for n, c in _children(name, module) if n in seen and _fails(attempt, c, seen[n])), None)
        if failing is None:
            return name, module
        name, module = failing


def _children(prefix: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"{prefix}.{n}" if prefix else n, c) for n, c in module.named_children()]


def _fails(attempt: Callable[[nn.Module, tuple[Any, ...]], Any], module: nn.Module, args: tuple[Any, ...]) -> bool:
    try:
        attempt(module, args)
    except Exception:  # any failure marks the layer
        return True
    return False


QUIET_LOGGERS = ("torch.onnx", "onnxscript", "torch.export", "torch._export", "torch._dynamo", "torch.fx", "torch.fx.experimental.symbolic_shapes", "torch._subclasses")


@contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' own warnings and log lines (registry notes, guards, deprecations):
    stderr carries our one sentence, stdout our results."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    # torch.export prints the graph it failed on to stderr, and the ONNX exporter its progress to stdout
    with warnings.catch_warnings(), redirect_stderr(io.StringIO()), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        logging.disable(logging.CRITICAL)  # torch.export logs the graph it failed on, from loggers of its own making
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)
