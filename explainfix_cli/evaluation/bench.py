"""`explainfix bench`: what a model costs to run, as written and in deployment form, with CI gates.

Parameters, MACs per sample, file size, peak memory of one forward, and median latency at batch
1 and batch N after warm-up. *Deployment form* is what an inference runtime runs: batch norms
folded into the convolutions before them (torch.fx) and activations in channels-last layout, so
oneDNN does not reorder every convolution's input and output. The prune benchmark measured it as
the CPU's floor for a pruned model (README, Benchmarks). Models compared with `--vs` run in turn,
so a change in the machine's load affects both alike.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch
from torch import nn

from explainfix_cli.choices import LatencyForm
from explainfix_cli.errors import check_range
from explainfix_cli.evaluation.gates import Gate, at_most
from explainfix_cli.evaluation.measure import count_macs, median_latency_ms
from explainfix_cli.models import model_output

FORMS: tuple[LatencyForm, ...] = get_args(LatencyForm)


@dataclass
class Deployment:
    """A model in deployment form and what was done to get there."""

    model: nn.Module
    folded_batch_norms: int
    note: str | None = None  # why batch norms could not be folded, when they could not


def deployment_form(model: nn.Module) -> Deployment:
    """A copy with batch norms folded into the convolutions before them (torch.fx) and weights in
    channels-last layout. A model torch.fx cannot trace keeps its batch norms (the note says so)."""
    from torch.fx.experimental.optimization import fuse

    if getattr(model, "runs_as_exported", False):  # an exported file (export/runtime.py) runs as it was exported
        return Deployment(model, 0, "an exported file runs as it was exported (export folds batch norms with deployment_form)")
    copied = copy.deepcopy(model).eval()
    norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in copied.modules())
    note = None
    try:
        fused: nn.Module = fuse(copied)
    except Exception as e:  # symbolic tracing fails on data-dependent control flow
        fused, note = copied, f"batch norms not folded: torch.fx cannot trace the model ({type(e).__name__})"
    left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    return Deployment(fused.to(memory_format=torch.channels_last), norms - left, note)  # type: ignore[call-overload]


@torch.no_grad()
def peak_forward_bytes(model: nn.Module, x: torch.Tensor) -> int | None:
    """The most bytes of tensors alive at once during one forward (the input excluded), from the
    profiler's allocation events; None where this torch's profiler does not expose them."""
    from torch.profiler import ProfilerActivity, profile

    model(x)  # lazy initialisation and caches outside the measurement
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler's own start/stop lines on stderr are not for users
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(x)
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        return None
    live = peak = 0
    for event in sorted((e for e in results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


MAX_DEFAULT_THREADS = 4  # a small CNN at batch 1 gains little beyond 4 intra-op threads; more only meet more contention


def machine_load() -> tuple[int, float | None]:
    """(cores, 1-minute load average; None where the platform has none)."""
    return os.cpu_count() or 1, os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def default_threads(cores: int, load: float | None) -> int:
    """The intra-op threads bench uses unless told: the cores other work leaves free, 1 to 4.

    On a busy machine a thread that has to wait for a core stalls every operator of a forward:
    three runs of the ResNet sample at batch 1 on 2 cores under load 15 took 0.47-0.67 ms with 1
    thread and 0.70-56.5 ms with 2 (issue 22's measurement). One thread per free core keeps the figure stable.
    """
    free = cores if load is None else int(cores - load)
    return max(1, min(cores, MAX_DEFAULT_THREADS, free))


def load_note(threads: int, cores: int, load: float | None) -> str | None:
    """A warning when other work on the machine leaves fewer free cores than `threads`."""
    if load is None or cores - load >= threads:
        return None
    return (
        f"the machine's 1-minute load is {load:.1f} on {cores} cores, so other work competes with the "
        f"{threads} thread{'s' if threads > 1 else ''} measured: the latencies may be unreliable; bench on an idle machine."
    )


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run with `threads` intra-op threads (the current count if None); yields the count used."""
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(saved)


@dataclass
class Bench:
    """One model's costs. Latencies in milliseconds, keyed `{form}_batch_1` and `{form}_batch_n`."""

    model: str
    params: int
    macs: int  # per sample, at input_size
    file_bytes: int | None
    weight_bytes: int  # parameters and buffers
    peak_activation_bytes: int | None  # one forward at batch n, as written
    peak_memory_bytes: int | None  # weights + peak activations
    folded_batch_norms: int
    deployment_note: str | None
    deployment_max_change: float  # largest output difference, deployment form against as written, at batch n
    latency_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class BenchReport:
    """`bench --json`: the model, the one it is compared with, their ratios, settings and gates."""

    model: Bench
    vs: Bench | None
    ratios: dict[str, float | None] | None  # model / vs for every number both have
    input_size: list[int]
    batch_size: int
    repeats: int
    warmup: int
    threads: int
    load_average: float | None  # the machine's 1-minute load while measuring: other work slows every latency
    gates: list[Gate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what a person should know, e.g. that the machine was busy

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["passed"] = self.passed
        return payload


def _costs(name: str, model: nn.Module, path: str | Path | None, x: torch.Tensor, deployed: Deployment) -> Bench:
    recorded = getattr(model, "recorded_size", None)  # an exported file: its graph has no layers to hook (export/runtime.py)
    if recorded is not None:
        model_output(model, x)  # a clear error when the input size does not fit
        params, macs, weights = recorded
        activations = None  # the runtime's allocations are not torch's, which the profiler sees
    else:
        macs = count_macs(model, tuple(x.shape[1:]))  # first: a clear error when the input size does not fit
        params = sum(p.numel() for p in model.parameters())
        weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        activations = peak_forward_bytes(model, x)
    with torch.no_grad():
        change = model_output(deployed.model, x.contiguous(memory_format=torch.channels_last)) - model_output(model, x)
    return Bench(
        model=name,
        params=params,
        macs=macs,
        file_bytes=os.path.getsize(path) if path is not None and Path(path).is_file() else None,
        weight_bytes=weights,
        peak_activation_bytes=activations,
        peak_memory_bytes=None if activations is None else weights + activations,
        folded_batch_norms=deployed.folded_batch_norms,
        deployment_note=deployed.note,
        deployment_max_change=float(change.abs().max()),
    )


def _ratios(a: Bench, b: Bench) -> dict[str, float | None]:
    pairs = {k: (getattr(a, k), getattr(b, k)) for k in ("params", "macs", "file_bytes", "peak_memory_bytes")}
    pairs.update({f"latency_{k}": (a.latency_ms[k], b.latency_ms.get(k)) for k in a.latency_ms})
    return {k: None if x is None or not y else x / y for k, (x, y) in pairs.items()}


def check_gate_limits(max_latency_ms: float | None, max_params: int | None, max_macs: int | None) -> None:
    """Limits a gate can meet: a latency above 0 ms, at least 1 parameter and 1 MAC."""
    check_range("max_latency_ms", max_latency_ms, 0, above_low=True)
    check_range("max_params", max_params, 1)
    check_range("max_macs", max_macs, 1)


def bench(
    model: nn.Module,
    input_size: tuple[int, ...],
    *,
    name: str = "model",
    path: str | Path | None = None,
    vs: nn.Module | None = None,
    vs_name: str = "other",
    vs_path: str | Path | None = None,
    batch_size: int = 16,
    repeats: int = 30,
    warmup: int = 3,
    threads: int | None = None,
    seed: int = 0,
    max_latency_ms: float | None = None,
    max_params: int | None = None,
    max_macs: int | None = None,
) -> BenchReport:
    """Measure `model` (and `vs`) on random inputs of `input_size` (C, H, W), then apply the gates:
    `max_latency_ms` on the median latency at batch 1 as written, `max_params`, `max_macs` per sample.
    `threads` None: `default_threads` for the machine's load; a load that leaves fewer free cores
    than the threads used gets a note (`load_note`)."""
    check_gate_limits(max_latency_ms, max_params, max_macs)
    cores, load = machine_load()
    threads = default_threads(cores, load) if threads is None else threads
    models = [model.eval()] if vs is None else [model.eval(), vs.eval()]
    g = torch.Generator().manual_seed(seed)
    inputs = {n: torch.randn(n, *input_size, generator=g) for n in (1, batch_size)}  # (n, C, H, W)
    with torch_threads(threads) as used:
        deployed = [deployment_form(m) for m in models]
        results = [_costs(n, m, p, inputs[batch_size], d) for n, m, p, d in zip([name, vs_name], models, [path, vs_path], deployed, strict=False)]
        for form in FORMS:
            runnable = models if form == "eager" else [d.model for d in deployed]
            for n, key in ((1, "batch_1"), (batch_size, "batch_n")):
                x = inputs[n] if form == "eager" else inputs[n].contiguous(memory_format=torch.channels_last)
                for r, ms in zip(results, median_latency_ms(runnable, x, repeats, warmup), strict=True):
                    r.latency_ms[f"{form}_{key}"] = ms
    ours = results[0]
    after = machine_load()[1]  # the load while measuring
    gates = []
    if max_latency_ms is not None:
        gates.append(at_most("max_latency_ms", f"the median latency of {name} at batch 1 (ms)", ours.latency_ms["eager_batch_1"], max_latency_ms))
    if max_params is not None:
        gates.append(at_most("max_params", f"the parameter count of {name}", ours.params, max_params))
    if max_macs is not None:
        gates.append(at_most("max_macs", f"the MACs per sample of {name}", ours.macs, max_macs))
    return BenchReport(
        model=ours, vs=results[1] if vs is not None else None, ratios=_ratios(ours, results[1]) if vs is not None else None,
        input_size=list(input_size), batch_size=batch_size, repeats=repeats, warmup=warmup, threads=used,
        load_average=after, gates=gates, notes=[n for n in [load_note(used, cores, after)] if n],
    )

