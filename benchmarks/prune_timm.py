"""Prune the long tail of timm architectures (issue 14): every model finishes, and exactly.

For every model: build it with timm (random initialisation, seeded, 10 classes), save its state
dict, load it the way the command line does (`--arch timm:create_model --arch-kwargs
'{"model_name": NAME, "num_classes": 10}'`), prune at `--pct 50` on 8 smooth random images
(64x64, or the model's default size where it cannot run at 64), write the file, reload it, and
compare its outputs with an independently zeroed model (the original weights, `spatial_saliency`,
`zero_least_salient`; nothing removed) on 8 other images the prune did not see. Each model runs
in its own subprocess with a timeout, so a crash or a hang is a row of the table, not the end.

Needs timm (never a dependency of explainfix): `pip install timm` into the environment.

    python benchmarks/prune_timm.py [--models resnet18 mixnet_s] [--pct 50] [--timeout 300] [--jobs 1]

Columns: status (OK: reloaded equals zeroed to 1e-4 of the logit scale; DIFF: it does not; FAIL:
the prune raised, with the exit code the command line would give; TIMEOUT), params before/after,
channels removed, blocked groups, |reloaded - zeroed| on unseen data and the logit scale, the
prune's seconds and, for comparison, the seconds of one forward+backward pass over the 8 images.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# the issue's failing families first, then as many that passed before it
FAILING = [
    "res2net50_14w_8s", "mixnet_s", "dpn68", "resnest14d", "sebotnet33ts_256", "skresnet18",
    "nf_resnet26", "nfnet_l0", "tresnet_m", "efficientvit_b0", "bat_resnext26ts", "botnet26t_256",
    "edgenext_xx_small", "mobilevit_xxs", "rexnet_100", "halonet26t",
]
PASSING = [
    "resnet18", "resnet50d", "seresnext26d_32x4d", "regnetx_002", "regnety_002", "efficientnet_b0",
    "mobilenetv3_small_050", "ghostnet_100", "hrnet_w18_small", "dla34", "densenet121", "xception41",
    "inception_v4", "repvgg_a0", "convnext_atto", "fastvit_t8", "cs3darknet_s", "eca_resnet33ts",
]
IMAGES, CLASSES, SIZE = 8, 10, 64
RELATIVE_TOLERANCE = 1e-4


def images(n: int, size: int, seed: int) -> Any:
    """`n` smooth random RGB patterns (8x8 noise upsampled bicubically), standardised."""
    import torch

    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 8, 8, generator=g)  # (n, 3, 8, 8)
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)  # (n, 3, size, size)
    return (x - x.mean()) / x.std()


def worker(name: str, pct: float) -> dict[str, Any]:
    """One model, in this process: the row of the table as a dict."""
    import torch

    from explainfix_cli.errors import UserError
    from explainfix_cli.io.checkpoints import ArchSpec, load_model, open_model
    from explainfix_cli.io.data import Dataset
    from explainfix_cli.pruning.pipeline import prune, zero_least_salient
    from explainfix_cli.saliency import spatial_saliency

    arch = ArchSpec("timm:create_model", {"model_name": name, "num_classes": CLASSES})
    torch.manual_seed(0)
    model = arch.build().eval()
    size = SIZE
    try:
        with torch.no_grad():
            model(images(1, SIZE, 0))
    except Exception:
        size = int(model.pretrained_cfg["input_size"][-1])
    seen = Dataset(images(IMAGES, size, 0), torch.randint(0, CLASSES, (IMAGES,), generator=torch.Generator().manual_seed(0)), batch_size=IMAGES)
    unseen = images(IMAGES, size, 1)
    row: dict[str, Any] = {"model": name, "size": size}
    with tempfile.TemporaryDirectory() as tmp:
        state, out = Path(tmp) / "state.pt", Path(tmp) / "pruned.safetensors"
        torch.save(model.state_dict(), state)

        reference = open_model(state, arch).model.eval()
        start = time.perf_counter()
        zero_least_salient(reference, spatial_saliency(reference, seen), pct)  # one forward+backward
        row["forward_backward_seconds"] = round(time.perf_counter() - start, 2)
        with torch.no_grad():
            zeroed, zeroed_seen = reference(unseen), reference(seen.x)

        loaded = open_model(state, arch).model
        start = time.perf_counter()
        try:
            _, report = prune(loaded, seen, pct=pct, arch=arch, out=out, force=True)
        except UserError as e:
            if os.environ.get("PRUNE_TIMM_DEBUG"):
                raise
            return {**row, "status": "FAIL", "exit": 2, "error": str(e)}
        except Exception as e:
            if os.environ.get("PRUNE_TIMM_DEBUG"):
                raise
            return {**row, "status": "FAIL", "exit": 1, "error": f"{type(e).__name__}: {e}"}
        row["seconds"] = round(time.perf_counter() - start, 2)
        with torch.no_grad():
            again = load_model(out).eval()
            reloaded, reloaded_seen = again(unseen), again(seen.x)
    diff, scale = float((reloaded - zeroed).abs().max()), float(zeroed.abs().max())
    rep = report.to_json()
    return {
        **row,
        "status": "OK" if diff <= RELATIVE_TOLERANCE * max(scale, 1e-12) else "DIFF",
        "params_before": rep["params_before"],
        "params_after": rep["params_after"],
        "removed": rep["channels_removed"],
        "blocked": rep["blocked_groups"],
        "diff": diff,
        "diff_seen": float((reloaded_seen - zeroed_seen).abs().max()),
        "scale": scale,
    }


def run_one(name: str, pct: float, timeout: float) -> dict[str, Any]:
    """`worker` in a subprocess with a timeout (single-threaded unless the caller set otherwise)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, __file__, "--worker", name, "--pct", str(pct)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"model": name, "status": "TIMEOUT", "error": f"no answer after {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return {"model": name, "status": "CRASH", "error": tail[-1] if tail else f"exit {done.returncode}"}
    row = json.loads(lines[-1])
    row["wall_seconds"] = round(time.perf_counter() - start, 1)
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'model':<20} {'size':>4} {'status':<7} {'params before':>13} {'after':>11} {'removed':>7} "
        f"{'blocked':>7} {'|reload-zeroed|':>15} {'(seen data)':>11} {'logit scale':>11} {'prune s':>7} {'fwd+bwd s':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if "params_before" not in r:
            exit_code = f" (exit {r['exit']})" if "exit" in r else ""
            print(f"{r['model']:<20} {r.get('size', ''):>4} {r['status']:<7}{exit_code} {r.get('error', '')[:160]}")
            continue
        print(
            f"{r['model']:<20} {r['size']:>4} {r['status']:<7} {r['params_before']:>13,} {r['params_after']:>11,} "
            f"{r['removed']:>7} {sum(r['blocked'].values()):>7} {r['diff']:>15.3g} {r['diff_seen']:>11.3g} {r['scale']:>11.3g} "
            f"{r['seconds']:>7.2f} {r['forward_backward_seconds']:>9.2f}"
        )
    print()
    print("blocked groups by reason:")
    for r in rows:
        if r.get("blocked"):
            print(f"  {r['model']:<20} {json.dumps(r['blocked'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=FAILING + PASSING)
    parser.add_argument("--pct", type=float, default=50.0)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model")
    parser.add_argument("--jobs", type=int, default=1, help="models run at once")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.pct)))
        return
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = []
        for row in pool.map(lambda name: run_one(name, args.pct, args.timeout), args.models):
            print(f"{row['model']}: {row['status']}", file=sys.stderr, flush=True)
            rows.append(row)
    print_table(rows)


if __name__ == "__main__":
    main()
