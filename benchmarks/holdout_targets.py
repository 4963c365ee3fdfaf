"""Does a `--max-drop` limit chosen on some samples hold on others? (issue 22; docs/method.md §2, "Targets")

The bundled validation digits (sample_models/digits_val.npz, 360) are split in two halves with a
fixed seed: half A is given to the command, half B is touched by nothing and judges. For every
class of the ResNet and DenseNet samples, `extract --max-drop X`:
- before: chosen on all of A (`--check-fraction 0`, the code before the check split);
- after: A split by `search.holdout.check_split` (a quarter of A kept for checking, the default),
  the cut accepted only when its AUC drop is at most X on A's calibration part and on that check.
Each row gives the one-vs-rest AUC drop on each part and on B, and whether B's drop is within
X + 0.01, and the standard error of the after-cut's drop on the calibration part and on B. Then `prune --max-drop X` on the ResNet sample, before and after: the pct chosen and
the accuracy drop on B.

    PYTHONPATH=. .venv/bin/python benchmarks/holdout_targets.py [--max-drop 0.01] [--models resnet densenet] [--check-fraction 0.25]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from explainfix_cli.classes.extract import extract
from explainfix_cli.io.checkpoints import open_model
from explainfix_cli.io.data import Dataset, load_data
from explainfix_cli.search.holdout import check_indices, check_split
from explainfix_cli.search.target import Target, prune_to_target

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
HALVES_SEED = 2022  # the A / B split; the check split inside A is drawn with --seed 0, as the CLI does


def _halves(data: Dataset, seed: int = HALVES_SEED) -> tuple[Dataset, Dataset]:
    b = set(check_indices(data, 0.5, seed))
    return data.subset([i for i in range(data.num_samples) if i not in b]), data.subset(sorted(b))


def _drop(scores: dict | None) -> float:
    assert scores is not None and scores["full"].auc is not None and scores["extracted"].auc is not None
    return scores["full"].auc - scores["extracted"].auc


def _error(full: torch.nn.Module, sub: torch.nn.Module, on: Dataset, k: int) -> float:
    """The DeLong standard error of the after-cut's AUC drop on `on` (0 when every positive outranks every negative under both)."""
    from explainfix_cli.classes.extract import OneVsRest, _scores, _truth
    from explainfix_cli.evaluation.measure import paired_auc_drop

    paired = paired_auc_drop(_scores(OneVsRest(full, k, True), on, "cpu"), _scores(sub, on, "cpu"), _truth(on, k, True))
    return float("nan") if paired is None else paired[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-drop", type=float, default=0.01)
    parser.add_argument("--halves-seed", type=int, default=HALVES_SEED, help="the A / B split (2022 chose extract's DROP_MARGIN_SE; judge it on another)")
    parser.add_argument("--models", nargs="*", default=["resnet", "densenet"], help="none: only the prune rows")
    parser.add_argument("--check-fraction", type=float, default=None, help="of A, kept for checking (default: the CLI's)")
    args = parser.parse_args()
    x = args.max_drop
    a, b = _halves(load_data(SAMPLES / "digits_val.npz", batch_size=256), args.halves_seed)
    split = check_split(a, None, args.check_fraction, seed=0)
    assert split.check is not None
    print(f"A {a.num_samples} samples (after: {split.calibration.num_samples} calibrate, {split.check.num_samples} check), B {b.num_samples}; --max-drop {x}, B within {x + 0.01:g}")
    print(f"{'model':9} {'class':>5} | {'before: A':>9} {'B':>7} {'ok':>3} {'fewer':>6} | {'after: cal.':>11} {'check':>7} {'B':>7} {'ok':>3} {'fewer':>6} | {'s.e. cal.':>9} {'B':>6} | {'s':>5}")
    misses = {"before": 0, "after": 0}
    for name in args.models:
        model = open_model(SAMPLES / f"{name}.safetensors").model
        for k in range(10):
            start = time.perf_counter()
            _, plain = extract(model, a, k, max_drop=x, val=b)
            sub, checked = extract(model, split.calibration, k, max_drop=x, val=b, check=split.check)
            errors = [_error(model, sub, part, k) for part in (split.calibration, b)]
            cells = []
            for when, r, parts in (("before", plain, [_drop(plain.data)]), ("after", checked, [_drop(checked.data), _drop(checked.check)])):
                on_b = _drop(r.val)
                ok = on_b <= x + 0.01 + 1e-9
                misses[when] += not ok
                cells.append(" ".join(f"{d:>+7.4f}" for d in [*parts, on_b]) + f" {'yes' if ok else 'NO':>3} {1 - r.params_after / r.params_before:>6.1%}")
            print(f"{name:9} {k:>5} |   {cells[0]} |     {cells[1]} | {errors[0]:.4f} {errors[1]:.4f} | {time.perf_counter() - start:>5.1f}", flush=True)
    total = 10 * len(args.models)
    print(f"B's AUC drop over {x + 0.01:g}: before {misses['before']} of {total}, after {misses['after']} of {total}")

    model = open_model(SAMPLES / "resnet.safetensors").model
    for when, data, check in (("before", a, None), ("after", split.calibration, split.check)):
        found = prune_to_target(copy.deepcopy(model), data, Target(max_drop=x), val=b, check=check)  # val: reported only
        r = found.report
        assert r.metric_before is not None and r.metric_after is not None and r.val_metric_before is not None and r.val_metric_after is not None
        on_b = r.val_metric_before - r.val_metric_after
        on_check = "" if found.check_drop is None else f", check {found.check_drop:+.4f}"
        print(
            f"prune resnet --max-drop {x} {when}: pct {found.pct_chosen:g}, accuracy drop on {'A' if check is None else 'cal.'} "
            f"{r.metric_before - r.metric_after:+.4f}{on_check}, on B {on_b:+.4f} ({'yes' if on_b <= x + 0.01 + 1e-9 else 'NO'})"
        )


if __name__ == "__main__":
    main()
