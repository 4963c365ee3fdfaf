"""Coded ResNeXt's figure without coded training: for every class of the ResNet and DenseNet
samples, a one-vs-rest sub-model with at least 60 % fewer parameters whose held-out AUC stays
within 0.02 of the full model's (docs/method.md §6).

Channels are chosen, and `--max-drop` guides the greedy cut, on digits_train.npz (the data the
samples were trained on); the AUC and accuracy are measured on digits_val.npz, held out.

    .venv/bin/python benchmarks/extract_classes.py [--max-drop 0.005] [--drop-margin 4] [--models resnet densenet]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from explainfix_cli.classes.extract import DROP_MARGIN_SE, extract
from explainfix_cli.io.checkpoints import open_model
from explainfix_cli.io.data import load_data

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-drop", type=float, default=0.005, help="largest AUC drop on the selection data")
    parser.add_argument("--drop-margin", type=float, default=DROP_MARGIN_SE, help="standard errors added to a cut's drop (extract --drop-margin)")
    parser.add_argument("--models", nargs="+", default=["resnet", "densenet"])
    args = parser.parse_args()
    select = load_data(SAMPLES / "digits_train.npz", batch_size=256)
    val = load_data(SAMPLES / "digits_val.npz", batch_size=256)
    print(f"channels chosen on digits_train.npz ({len(select.x)} samples), --max-drop {args.max_drop} there; held out: digits_val.npz ({len(val.x)})")
    header = f"{'model':9} {'class':>5} {'keep':>6} {'params':>15} {'fewer':>6} {'MACs':>19} {'AUC full':>9} {'AUC sub':>8} {'drop':>7} {'acc full':>9} {'acc sub':>8} {'ok':>3} {'s':>5}"
    print(header)
    failures = 0
    for name in args.models:
        loaded = open_model(SAMPLES / f"{name}.safetensors")
        classes = int(select.y.max()) + 1
        for k in range(classes):
            start = time.perf_counter()
            _, r = extract(loaded.model, select, k, max_drop=args.max_drop, drop_margin=args.drop_margin, val=val, arch=loaded.arch)
            assert r.val is not None
            full, sub = r.val["full"], r.val["extracted"]
            assert full.auc is not None and sub.auc is not None
            fewer = 1 - r.params_after / r.params_before
            ok = fewer >= 0.6 and full.auc - sub.auc <= 0.02
            failures += not ok
            print(
                f"{name:9} {k:>5} {r.keep:>6.3f} {r.params_before:>7,}→{r.params_after:>6,} {fewer:>6.1%} "
                f"{r.macs_before:>9,}→{r.macs_after:>9,} {full.auc:>9.4f} {sub.auc:>8.4f} {full.auc - sub.auc:>7.4f} "
                f"{full.accuracy:>9.4f} {sub.accuracy:>8.4f} {'yes' if ok else 'NO':>3} {time.perf_counter() - start:>5.1f}",
                flush=True,
            )
    print(f"{failures} of {len(args.models) * classes} extractions miss the goal (>= 60 % fewer parameters, held-out AUC within 0.02)")


if __name__ == "__main__":
    main()
