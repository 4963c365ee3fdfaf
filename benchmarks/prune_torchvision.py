"""Prune twelve torchvision CNNs through the real command line, and time the prune of resnet50.

Issue 3's benchmark. For every model: build it (random initialisation, seeded: there is no
network here, so no pretrained weights), save its state dict, run

    python -m explainfix_cli prune STATE.pt --arch torchvision.models:NAME --arch-kwargs ... --json

on 16 synthetic 3x64x64 images, reload the written file with `load_model`, and check that it
computes what the zeroed-but-unremoved model computes (that model is rebuilt here, apart from the
command: the original weights, `spatial_saliency`, `zero_least_salient`). Then, for resnet50 in
process: the whole prune time split by stage, and inference latency before/after.

    python benchmarks/prune_torchvision.py [--pct 90] [--models resnet18 vgg11_bn] [--no-speed] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from explainfix_cli.evaluation.bench import deployment_form
from explainfix_cli.evaluation.measure import median_latency_ms
from explainfix_cli.io.checkpoints import ArchSpec, load_model, open_model
from explainfix_cli.io.data import Dataset, load_data
from explainfix_cli.pruning import pipeline as pruning
from explainfix_cli.pruning.pipeline import zero_least_salient
from explainfix_cli.saliency import spatial_saliency

MODELS = [
    "resnet18", "resnet50", "densenet121", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf",
    "resnext50_32x4d", "shufflenet_v2_x1_0", "squeezenet1_0", "googlenet", "vgg11_bn", "convnext_tiny",
]
EXTRA_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True}}
IMAGES, CLASSES, SIZE = 16, 10, 64
RELATIVE_TOLERANCE = 1e-3  # |reloaded - zeroed| / max|zeroed| above this is a FAIL
TIMEOUT = 900  # seconds per command
ONEDNN_BLOCK = 16  # fp32 lanes of an AVX-512 register: oneDNN pads channel counts to this


def arch_of(name: str) -> ArchSpec:
    return ArchSpec(f"torchvision.models:{name}", {"num_classes": CLASSES, **EXTRA_KWARGS.get(name, {})})


def write_data(path: Path) -> None:
    """16 smooth random RGB patterns (8x8 noise upsampled bicubically) with labels in [0, 10)."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(IMAGES, 3, 8, 8, generator=g)  # (N, 3, 8, 8)
    x = nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=False)  # (N, 3, 64, 64)
    x = (x - x.mean()) / x.std()
    y = torch.randint(0, CLASSES, (IMAGES,), generator=g)  # (N,)
    np.savez(path, x=x.numpy().astype(np.float32), y=y.numpy().astype(np.int64))


def write_state(name: str, path: Path) -> None:
    torch.manual_seed(0)
    torch.save(arch_of(name).build().state_dict(), path)


@dataclass
class Row:
    name: str
    report: dict[str, Any] | None = None
    reloaded_vs_zeroed: float | None = None
    logit_scale: float | None = None
    predictions_differ: int | None = None
    error: str | None = None

    @property
    def relative(self) -> float | None:
        if self.reloaded_vs_zeroed is None or self.logit_scale is None:
            return None
        return self.reloaded_vs_zeroed / max(self.logit_scale, 1e-12)

    @property
    def status(self) -> str:
        if self.error is not None or self.relative is None or self.relative > RELATIVE_TOLERANCE:
            return "FAIL"
        return "OK"


def run_prune(name: str, state: Path, data: Path, out: Path, pct: float) -> dict[str, Any]:
    """The command line, as a user runs it; its JSON report."""
    arch = arch_of(name)
    command = [
        sys.executable, "-m", "explainfix_cli", "prune", str(state), "--arch", arch.factory,
        "--arch-kwargs", json.dumps(arch.kwargs), "--data", str(data), "--pct", str(pct),
        "--batch-size", str(IMAGES), "--out", str(out), "--json", "--force",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise RuntimeError(f"exit {done.returncode}: {lines[-1] if lines else '(no message)'}")
    return json.loads(done.stdout)


@torch.no_grad()
def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model.eval()(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def zeroed_reference(name: str, state: Path, data: Dataset, pct: float) -> torch.Tensor:
    """Outputs of the zeroed-but-unremoved model, built here from the original state dict."""
    model = arch_of(name).build()
    model.load_state_dict(torch.load(state, weights_only=True))
    model.eval()
    zero_least_salient(model, spatial_saliency(model, data), pct)
    return forward(model, data.x)


def check_model(name: str, folder: Path, data_file: Path, data: Dataset, pct: float) -> Row:
    row = Row(name)
    state, out = folder / f"{name}.pt", folder / f"{name}-pruned.safetensors"
    try:
        write_state(name, state)
        row.report = run_prune(name, state, data_file, out, pct)
        reloaded = forward(load_model(out), data.x)
        again = forward(load_model(out), data.x)
        if not torch.equal(reloaded, again):
            raise RuntimeError(f"two loads of {out.name} disagree by {float((reloaded - again).abs().max()):.3g}")
        zeroed = zeroed_reference(name, state, data, pct)
        row.reloaded_vs_zeroed = float((reloaded - zeroed).abs().max())
        row.logit_scale = float(zeroed.abs().max())
        row.predictions_differ = int((reloaded.argmax(dim=1) != zeroed.argmax(dim=1)).sum())
    except Exception as e:  # one model failing must not stop the others
        row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return row


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'model':<19} {'params before':>13} {'after':>11} {'MMACs before':>12} {'after':>8} "
        f"{'removed':>7} {'blocked':>7} {'max_logit_change':>16} {'|reload-zeroed|':>15} "
        f"{'logit scale':>11} {'pred!=':>6} {'seconds':>7}  status"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        rep = r.report
        if rep is None:
            print(f"{r.name:<19} FAIL  {r.error}")
            continue
        blocked = sum(rep["blocked_groups"].values())
        change = rep["max_logit_change"]
        cells = (
            f"{r.name:<19} {rep['params_before']:>13,} {rep['params_after']:>11,} "
            f"{rep['macs_before'] / 1e6:>12.1f} {rep['macs_after'] / 1e6:>8.1f} "
            f"{rep['channels_removed']:>7} {blocked:>7} {_num(change):>16} {_num(r.reloaded_vs_zeroed):>15} "
            f"{_num(r.logit_scale):>11} {_num(r.predictions_differ):>6} {rep['seconds']:>7.2f}  {r.status}"
        )
        notes = []
        if rep["channels_removed"] == 0:
            notes.append("nothing removed")
        if r.error is not None:
            notes.append(r.error)
        elif r.relative is not None and r.relative > RELATIVE_TOLERANCE:
            notes.append(f"reloaded differs from zeroed by {r.relative:.2g} of the logit scale")
        print(cells + (f"  ({'; '.join(notes)})" if notes else ""))
    print()
    print("blocked groups by reason:")
    for r in rows:
        if r.report is not None and r.report["blocked_groups"]:
            print(f"  {r.name:<19} {json.dumps(r.report['blocked_groups'])}")


def _num(v: float | int | None) -> str:
    if v is None:
        return "-"
    return str(v) if isinstance(v, int) else f"{v:.3g}"


class StageTimer:
    """Wall time of the functions `pruning.prune` calls, by wrapping them in its namespace."""

    STAGES: ClassVar[dict[str, str]] = {
        "spatial_saliency": "saliency forward+backward",
        "model_size": "params/MACs (2 forwards)",
        "outputs": "outputs on the data (forwards)",
        "zero_least_salient": "zeroing",
        "remove_dead_channels": "channel removal (graph, measure, cut)",
        "fill_zeroed": "fill",
        "fix_spatial_filters": "fix",
        "save_model": "write safetensors",
    }

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def installed(self) -> Iterator[None]:
        saved = {name: getattr(pruning, name) for name in self.STAGES}
        for name, fn in saved.items():
            setattr(pruning, name, self._timed(name, fn))
        try:
            yield
        finally:
            for name, fn in saved.items():
                setattr(pruning, name, fn)

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return wrapper


def whole_prune(state: Path, data_file: Path, out: Path, pct: float) -> tuple[dict[str, float], pruning.PruneReport]:
    """Load, prune (saliency, zeroing, removal, fix) and write, in process; seconds per part."""
    arch = arch_of("resnet50")
    start = time.perf_counter()
    model = open_model(state, arch).model
    data = load_data(data_file, batch_size=IMAGES)
    loaded = time.perf_counter()
    timer = StageTimer()
    with timer.installed():
        _, report = pruning.prune(model, data, pct=pct, arch=arch, out=out, force=True)
    end = time.perf_counter()
    return {"load": loaded - start, "prune": end - loaded, "total": end - start, **timer.seconds}, report


def blocked_conv_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Conv MACs for one input with in/out channel counts rounded up to ONEDNN_BLOCK: a pruned
    conv with 35 channels costs the CPU what one with 48 does."""
    total = 0

    def hook(m: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(m, nn.Conv2d)
        kernel = m.kernel_size[0] * m.kernel_size[1]
        if m.groups == 1:
            total += output[0, 0].numel() * _blocked(m.out_channels) * _blocked(m.in_channels) * kernel
        else:  # grouped and depthwise convs are vectorised across groups: counted as they are
            total += output[0].numel() * m.in_channels // m.groups * kernel

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return total


def _blocked(channels: int) -> int:
    return -(-channels // ONEDNN_BLOCK) * ONEDNN_BLOCK


def time_by_op_kind(model: nn.Module, x: torch.Tensor, runs: int = 5) -> dict[str, float]:
    """Seconds per forward spent in convolutions and linear layers, and in everything else
    (batch norm, activations, additions, pooling), from torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        model.eval()(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                model(x)
    spent = {"conv/linear": 0.0, "other": 0.0}
    for event in prof.key_averages():
        kind = "conv/linear" if any(k in event.key for k in ("conv", "addmm", "linear", "matmul")) else "other"
        spent[kind] += event.self_cpu_time_total / 1e6 / runs
    return spent


def speed(folder: Path, data_file: Path, data: Dataset, pct: float, profile: bool) -> None:
    state, out = folder / "resnet50-speed.pt", folder / "resnet50-speed.safetensors"
    write_state("resnet50", state)
    runs = [whole_prune(state, data_file, out, pct) for _ in range(3)]
    best, report = min(runs, key=lambda r: r[0]["total"])
    print(f"resnet50, {IMAGES} images at {SIZE}x{SIZE}, CPU, pct {pct:g}, torch.get_num_threads() = {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (other work on the machine slows every figure below)")
    all_runs = ", ".join(f"{r['total']:.2f}" for r, _ in runs)
    print(f"whole prune (load, saliency, zeroing, removal, write), best of 3: {best['total']:.2f} s "
          f"(all runs: {all_runs}; target < 2 s)")
    saliency = best["spatial_saliency"]
    print(f"  {'saliency forward+backward':<40} {saliency:6.2f} s  {saliency / best['total']:5.1%}")
    print(f"  {'the rest':<40} {best['total'] - saliency:6.2f} s  {(best['total'] - saliency) / best['total']:5.1%}")
    print("  the rest, by part:")
    print(f"    {'load state dict':<38} {best['load']:6.2f} s")
    for name, label in StageTimer.STAGES.items():
        if name != "spatial_saliency":
            print(f"    {label:<38} {best.get(name, 0.0):6.2f} s")
    accounted = best["load"] + sum(best.get(n, 0.0) for n in StageTimer.STAGES)
    print(f"    {'other (inside prune)':<38} {best['total'] - accounted:6.2f} s")

    original = open_model(state, arch_of("resnet50")).model
    pruned = load_model(out)
    macs_ratio = report.macs_after / report.macs_before
    print(f"inference on {IMAGES} images, median of 30 (the two models in turn) after warm-up; MACs ratio {macs_ratio:.3f}, "
          f"target: latency ratio at most that")
    forms = (
        ("as written (eager, NCHW)", [original, pruned], data.x),
        ("deployment form (BN folded, channels-last)", [deployment_form(m).model for m in (original, pruned)], data.x.contiguous(memory_format=torch.channels_last)),
    )
    for form, models, x in forms:  # the same code as `explainfix bench` (explainfix_cli/bench.py)
        before, after = median_latency_ms(models, x)
        print(f"  {form:<44} before {before:6.1f} ms, after {after:6.1f} ms, latency ratio {after / before:.3f} "
              f"({'meets' if after / before <= macs_ratio else 'misses'} the target)")
    kinds = [time_by_op_kind(m, data.x) for m in (original, pruned)]
    print("  by op kind, as written (profiler, per forward): " + "; ".join(
        f"{k} {kinds[0][k] * 1e3:.1f} -> {kinds[1][k] * 1e3:.1f} ms (ratio {kinds[1][k] / kinds[0][k]:.3f})" for k in kinds[0]
    ))
    blocked = [blocked_conv_macs(m, data.x[:1]) for m in (original, pruned)]
    print(f"  conv MACs ratio with every channel count rounded up to oneDNN's {ONEDNN_BLOCK}-float vector blocks "
          f"(what the CPU computes): {blocked[1] / blocked[0]:.3f}")
    print(f"params {report.params_before:,} -> {report.params_after:,}; "
          f"MACs {report.macs_before / 1e6:.1f}M -> {report.macs_after / 1e6:.1f}M; "
          f"prune's own seconds field {report.seconds:.2f} s")

    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        whole_prune(state, data_file, out, pct)
        profiler.disable()
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(40)
        print("\ncProfile of one whole prune, by cumulative time:")
        print(stream.getvalue())
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(25)
        print("cProfile of one whole prune, by own time:")
        print(stream.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pct", type=float, default=90.0)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS, metavar="NAME")
    parser.add_argument("--no-speed", action="store_true", help="skip the resnet50 timing")
    parser.add_argument("--profile", action="store_true", help="also cProfile one whole resnet50 prune")
    args = parser.parse_args()
    try:
        import torchvision
    except ImportError:
        print("skipped: torchvision does not import here; run this with a Python that has it (README, Benchmarks).", file=sys.stderr)
        return

    print(f"explainfix prune --pct {args.pct:g} on torchvision {torchvision.__version__} models, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"weights: torchvision's default random initialisation, seeded (torch.manual_seed(0)); no pretrained weights. "
          f"data: {IMAGES} smooth random RGB patterns {SIZE}x{SIZE}, labels in [0, {CLASSES}), one minibatch")
    print("max_logit_change: the command's own (written vs zeroed model, in process); "
          "|reload-zeroed|: load_model(out) vs a zeroed model rebuilt here; pred!=: argmax differences of those two; "
          f"FAIL above {RELATIVE_TOLERANCE:g} of the logit scale (max |zeroed logit|)")
    print()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data_file = folder / "data.npz"
        write_data(data_file)
        data = load_data(data_file, batch_size=IMAGES)
        rows = []
        for name in args.models:
            rows.append(check_model(name, folder, data_file, data, args.pct))
            print(f"  done {name}: {rows[-1].status}", file=sys.stderr, flush=True)
        print_table(rows)
        if not args.no_speed:
            print()
            speed(folder, data_file, data, args.pct, args.profile)


if __name__ == "__main__":
    main()
