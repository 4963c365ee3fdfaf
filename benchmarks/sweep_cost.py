"""What a sweep costs against single prunes, on the ResNet sample (issue 12: a sweep at 6 pcts
must cost less than 3 single prunes).

Both are timed in one process as a library user (or the command line, after its imports) runs
them: load the model and data, then `prune` at one pct and write the file, or `sweep` at six
pcts and write sweep.json, sweep.csv and the figure (latency measured, 30 repeats, the default). The runs
alternate, so a change in the machine's load touches both alike; medians of `--runs`. Then the
same as a user at the shell pays it: `explainfix prune` against `explainfix sweep`, each a new
process that imports torch first.

    python benchmarks/sweep_cost.py [--runs 5] [--pcts 0,50,80,90,95,99] [--sample resnet]

`--sample` takes another bundled model (its data: the U-Net's nuclei, the others' digits), to see
how the ratio moves when a forward pass costs more against the sweep's fixed latency and figure.

Besides the ratio of the medians it prints the spread of the ratio of each sweep to the prune run
just before it, which a machine whose speed drifts during the run moves less.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from explainfix_cli.io.checkpoints import open_model
from explainfix_cli.io.data import load_data
from explainfix_cli.pruning.pipeline import prune
from explainfix_cli.search.sweep import sweep

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
MODEL, DATA = SAMPLES / "resnet.safetensors", SAMPLES / "digits_val.npz"  # set by --sample


def one_prune(out: Path, pct: float) -> float:
    start = time.perf_counter()
    model = open_model(MODEL).model
    prune(model, load_data(DATA), pct=pct, out=out, force=True)
    return time.perf_counter() - start


def one_sweep(out: Path, pcts: list[float]) -> tuple[float, dict[str, float]]:
    start = time.perf_counter()
    model = open_model(MODEL).model
    result = sweep(model, load_data(DATA), pcts, out_dir=out, force=True)
    return time.perf_counter() - start, result.seconds


def command(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "explainfix_cli", *args, "--force", "--json"], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--pcts", default="0,50,80,90,95,99")
    parser.add_argument("--sample", default="resnet", help="a bundled model: resnet (the issue's), densenet, densenet_bc, mobilenet, unet, vgg, ...")
    args = parser.parse_args()
    global MODEL, DATA
    MODEL = SAMPLES / f"{args.sample}.safetensors"
    DATA = SAMPLES / ("nuclei_val.npz" if args.sample == "unet" else "digits_val.npz")
    pcts = [float(p) for p in args.pcts.split(",")]
    print(f"{MODEL.name} on {DATA.name}; torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        one_prune(folder / "warm.safetensors", 80)  # first calls pay imports (matplotlib in the sweep)
        one_sweep(folder / "warm", pcts)
        prunes, sweeps, stages = [], [], []
        for _ in range(args.runs):
            prunes.append(one_prune(folder / "p.safetensors", 80))
            seconds, split = one_sweep(folder / "s", pcts)
            sweeps.append(seconds)
            stages.append(split)
        data = ["--data", str(DATA)]
        cli_prunes, cli_sweeps = [], []
        for _ in range(args.runs):
            cli_prunes.append(command("prune", str(MODEL), *data, "--pct", "80", "--out", str(folder / "c.safetensors")))
            cli_sweeps.append(command("sweep", str(MODEL), *data, "--pcts", args.pcts, "--out", str(folder / "c")))
    p, s = statistics.median(prunes), statistics.median(sweeps)
    split = {k: statistics.median(st[k] for st in stages) for k in stages[0]}
    print(f"single prune at 80 %        median {p:.3f} s  (runs: {', '.join(f'{t:.2f}' for t in prunes)})")
    print(f"sweep at {len(pcts)} pcts              median {s:.3f} s  (runs: {', '.join(f'{t:.2f}' for t in sweeps)})")
    print("  sweep by stage (medians): " + ", ".join(f"{k} {v:.3f} s" for k, v in split.items()))
    print(f"in process: sweep / single prune = {s / p:.2f}  (target: below 3) -> {'met' if s < 3 * p else 'NOT met'}")
    # what of it is the curve (item 1's cost: one saliency pass plus the per-point evaluations, with
    # the loading a prune pays too) and what the outputs only a sweep makes (latency, the figure)
    extra = split["latency"] + split["files"]
    print(f"  of which the curve (load, saliency, points) {(s - extra) / p:.2f} prunes, latency and files {extra / p:.2f} prunes")
    # each sweep against the prune run just before it: a machine whose speed drifts during the
    # benchmark (shared cores) moves both of a pair alike, so the pair ratios spread less
    ratios = sorted(sw / pr for pr, sw in zip(prunes, sweeps, strict=True))
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    print(f"  pair by pair: median {quartiles[1]:.2f}, quartiles {quartiles[0]:.2f}-{quartiles[2]:.2f}, range {ratios[0]:.2f}-{ratios[-1]:.2f}")
    cp, cs = statistics.median(cli_prunes), statistics.median(cli_sweeps)
    print(f"command line: explainfix prune {cp:.3f} s, explainfix sweep {cs:.3f} s (medians), sweep / prune = {cs / cp:.2f}")


if __name__ == "__main__":
    main()
