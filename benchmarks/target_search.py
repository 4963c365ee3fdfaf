"""Does `prune --max-drop` / `--max-params` pick the pct a brute-force scan picks? (issue 12)

For the ResNet, DenseNet and U-Net samples: prune a copy at every pct of the 1 % grid with the
real pipeline (`pruning.prune`, one saliency pass shared), then compare
- `--max-drop X`: the largest pct whose written model's metric is at most X below the original,
  with what `prune_to_target` chose, and with what plain bisection would have chosen (the metric
  is not monotone in pct, which is why `--max-drop` scans instead);
- `--max-params N` for budgets of 3/4, 1/2 and 1/4 of the original parameters: the smallest pct
  whose model fits.
Prints the time of the brute-force scan, of each search and of one single prune.

    python benchmarks/target_search.py [--max-drop 0.01] [--models resnet,densenet,unet]
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch

from explainfix_cli.io.checkpoints import open_model
from explainfix_cli.io.data import load_data
from explainfix_cli.pruning.pipeline import prune
from explainfix_cli.search.curve import PruneCurve
from explainfix_cli.search.target import GRID, Target, last_meeting, prune_to_target

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
DATA = {"unet": "nuclei_val.npz"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-drop", type=float, default=0.01)
    parser.add_argument("--models", default="resnet,densenet,unet")
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for name in args.models.split(","):
        data = load_data(SAMPLES / DATA.get(name, "digits_val.npz"))
        model = open_model(SAMPLES / f"{name}.safetensors").model

        start = time.perf_counter()
        prune(copy.deepcopy(model), data, pct=80)
        single = time.perf_counter() - start

        start = time.perf_counter()
        curve = PruneCurve(model, data)
        reports = {p: curve.prune(p)[1] for p in GRID}  # the real pipeline at every pct
        brute_seconds = time.perf_counter() - start
        drop = {p: r.metric_before - r.metric_after for p, r in reports.items()}  # type: ignore[operator]
        params = {p: r.params_after for p, r in reports.items()}
        keeps = [p for p in GRID if drop[p] <= args.max_drop + 1e-9]
        brute = max(keeps)
        bisected = last_meeting(GRID, lambda p, drop=drop: drop[p] <= args.max_drop + 1e-9, patience=1)
        not_monotone = sum(params[p + 1] > params[p] for p in GRID[:-1])

        start = time.perf_counter()
        found = prune_to_target(copy.deepcopy(model), data, Target(max_drop=args.max_drop))
        search_seconds = time.perf_counter() - start
        metric = found.report.metric
        print(f"\n{name} ({metric}, {data.num_samples} samples): one prune {single:.2f} s; real prune at all 100 pcts {brute_seconds:.1f} s")
        print(f"  --max-drop {args.max_drop}: brute force {brute}, prune_to_target {found.pct_chosen:g} "
              f"({'same' if found.pct_chosen == brute else 'DIFFERENT'}; {search_seconds:.1f} s, "
              f"{sum(p['model'] == 'zeroed' for p in found.probes)} zeroed + {sum(p['model'] == 'pruned' for p in found.probes)} pruned probes), "
              f"plain bisection {bisected}")
        print(f"    {metric} {found.report.metric_before:.4f} -> {found.report.metric_after:.4f} "
              f"(drop {found.report.metric_before - found.report.metric_after:.4f}), params {found.report.params_before:,} -> {found.report.params_after:,}; "
              f"pcts that keep it but lie above a failing pct: {[p for p in keeps if p > min(set(GRID) - set(keeps))]}")
        print(f"  parameters rise with pct at {not_monotone} of 99 steps")
        for share in (0.75, 0.5, 0.25):
            budget = int(share * reports[0].params_before)
            fits = [p for p in GRID if params[p] <= budget]
            start = time.perf_counter()
            got = prune_to_target(copy.deepcopy(model), data, Target(max_params=budget))
            print(f"  --max-params {budget:,}: brute force {min(fits) if fits else None}, prune_to_target {got.pct_chosen:g} "
                  f"({'same' if fits and got.pct_chosen == min(fits) else 'DIFFERENT'}; {time.perf_counter() - start:.1f} s, {len(got.probes)} probes)")


if __name__ == "__main__":
    main()
