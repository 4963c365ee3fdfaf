"""Export pruned torchvision CNNs to ONNX and torch.export, count how many export and match, and time them in onnxruntime.

Issue 24's benchmark. For every model: build it (random initialisation, seeded: no network, no
pretrained weights), prune it at --pct on 16 synthetic 3x64x64 images as
benchmarks/prune_torchvision.py does (in process, `explainfix_cli.prune`), then export the pruned
model with `explainfix_cli.export.pipeline.export` to ONNX and to pt2. An export *matches* when
the library's check passed: the written file, run by onnxruntime / torch.export.load, gives the
model's outputs within 1e-4 of the largest output at batch 1 and 3 (docs/export.md).

For --latency models: median latency at batch 1, 64x64, on --threads threads, of the eager model
(torch, as written), the float ONNX file and the int8 ONNX file (calibrated on the 16 images), in
onnxruntime, unpruned and pruned.

    python benchmarks/export_torchvision.py [--pct 90] [--models resnet18 ...] [--latency resnet18 ...] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_torchvision import MODELS, SIZE, arch_of, write_data

from explainfix_cli.errors import UserError
from explainfix_cli.evaluation.measure import median_latency_ms
from explainfix_cli.export.pipeline import ExportMismatch, export
from explainfix_cli.export.runtime import open_onnx
from explainfix_cli.io.data import load_data
from explainfix_cli.pruning.pipeline import prune

SHAPE = (3, SIZE, SIZE)


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return arch_of(name).build().eval()


def try_export(model: torch.nn.Module, fmt: str, out: Path, **kwargs) -> str:  # type: ignore[no-untyped-def]
    """'ok (max diff / tolerance)' or why not."""
    try:
        r = export(model, fmt, out, input_shape=SHAPE, force=True, **kwargs)  # type: ignore[arg-type]
    except (UserError, ExportMismatch) as e:
        return f"FAIL {str(e)[:160]}"
    except Exception as e:  # a benchmark reports every failure and goes on
        traceback.print_exc()
        return f"ERROR {type(e).__name__}: {str(e)[:120]}"
    return "ok" if r.tolerance is None else f"ok {r.max_abs_diff:.1e}/{r.tolerance:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pct", type=float, default=90.0)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--latency", nargs="*", default=["resnet18", "mobilenet_v3_small"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="export_tv."))
    write_data(work / "data.npz")
    data = load_data(work / "data.npz", batch_size=16)
    counts = {"onnx": 0, "pt2": 0}
    print(f"| model | params before | params after (pct {args.pct:g}) | ONNX | pt2 | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    pruned_models: dict[str, torch.nn.Module] = {}
    for name in args.models:
        started = time.perf_counter()
        model = build(name)
        before = sum(p.numel() for p in model.parameters())
        pruned, _ = prune(model, data, pct=args.pct)
        pruned_models[name] = pruned.eval()
        results = {fmt: try_export(pruned, fmt, work / f"{name}.{fmt}") for fmt in ("onnx", "pt2")}
        for fmt, res in results.items():
            counts[fmt] += res.startswith("ok")
        after = sum(p.numel() for p in pruned.parameters())
        print(f"| {name} | {before:,} | {after:,} | {results['onnx']} | {results['pt2']} | {time.perf_counter() - started:.0f} |", flush=True)
    print(f"\nexported and matched: ONNX {counts['onnx']}/{len(args.models)}, pt2 {counts['pt2']}/{len(args.models)}\n")
    latency_table(args, work, data, pruned_models)


def latency_table(args: argparse.Namespace, work: Path, data, pruned_models: dict[str, torch.nn.Module]) -> None:  # type: ignore[no-untyped-def]
    print(f"median ms at batch 1, {SIZE}x{SIZE}, {args.threads} threads, {args.repeats} repeats")
    print("| model | form | eager torch | onnxruntime float | onnxruntime int8 | int8 / float file bytes |")
    print("| --- | --- | --- | --- | --- | --- |")
    x = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(1))
    for name in args.latency:
        for form, model in (("unpruned", build(name)), ("pruned", pruned_models.get(name))):
            if model is None:
                continue
            f32, i8 = work / f"{name}-{form}-lat.onnx", work / f"{name}-{form}-int8.onnx"
            status = [try_export(model, "onnx", f32), try_export(model, "onnx", i8, quantize="int8", calib=data)]
            runnable = [model] + [open_onnx(p) for p, s in zip((f32, i8), status, strict=True) if s.startswith("ok")]
            ms = median_latency_ms(runnable, x, args.repeats, 3)
            cells = [f"{v:.2f}" for v in ms] + ["-"] * (3 - len(ms))
            ratio = f"{i8.stat().st_size / f32.stat().st_size:.2f}" if all(s.startswith("ok") for s in status) else "-"
            print(f"| {name} | {form} | {' | '.join(cells)} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
