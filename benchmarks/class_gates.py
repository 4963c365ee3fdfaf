"""Class-specific gate training (Liang et al., docs/method.md §6) against plain fine-tuning, from the
same start: the ResNet sample fine-tuned for the same epochs on digits_train.npz with the same
optimizer and minibatch order, once with the gates (CSG's alternation: one standard epoch, then
two gated ones) and once without. Printed: held-out accuracy, the specificity score of
`classes` (on digits_val.npz), the gate's density, and what `extract --max-drop` cuts for every
class (channels chosen on digits_train.npz, AUC on digits_val.npz).

    .venv/bin/python benchmarks/class_gates.py [--epochs 9] [--sparsity 4] [--max-drop 0.005]

The loop here stands in for `finetune --class-gates` (a separate branch) until it is hooked in.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from explainfix_cli.classes.analysis import analyse_classes
from explainfix_cli.classes.extract import extract
from explainfix_cli.classes.gates import ClassGates, class_gated_step, uses_gates
from explainfix_cli.evaluation.measure import metric, outputs
from explainfix_cli.io.checkpoints import open_model
from explainfix_cli.io.data import Dataset, load_data

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def train(model: torch.nn.Module, data: Dataset, epochs: int, gated: bool, sparsity: float, gate_lr: float, seed: int) -> ClassGates:
    gates = ClassGates.for_model(model, data.x[:1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        perm = torch.randperm(len(data.x), generator=order)
        for start in range(0, len(perm), 64):
            idx = perm[start : start + 64]
            class_gated_step(model, gates, data.x[idx], data.y[idx], optimizer, gated and uses_gates(epoch), sparsity, gate_lr)
    model.eval()
    return gates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--sparsity", type=float, default=4.0)
    parser.add_argument("--gate-lr", type=float, default=0.5)
    parser.add_argument("--max-drop", type=float, default=0.005)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train_data = load_data(SAMPLES / "digits_train.npz", batch_size=256)
    val = load_data(SAMPLES / "digits_val.npz", batch_size=256)
    start = open_model(SAMPLES / "resnet.safetensors")
    rows = [("start", start.model, None)]
    for gated in (False, True):
        model = copy.deepcopy(start.model)
        t = time.perf_counter()
        gates = train(model, train_data, args.epochs, gated, args.sparsity, args.gate_lr, args.seed)
        print(f"trained {'with' if gated else 'without'} gates in {time.perf_counter() - t:.1f} s", flush=True)
        rows.append(("CSG" if gated else "plain", model, gates if gated else None))
    print(f"{'model':6} {'val acc':>8} {'specificity':>11} {'gate density':>12} {'fewer params':>12} {'val AUC mean':>12} {'min':>7}")
    for label, model, gates in rows:
        accuracy = metric(val, outputs(model, val))
        specificity = analyse_classes(model, val)[0].specificity
        fewer, aucs = [], []
        for k in range(10):
            _, r = extract(model, train_data, k, max_drop=args.max_drop, val=val)
            assert r.val is not None and r.val["extracted"].auc is not None
            fewer.append(1 - r.params_after / r.params_before)
            aucs.append(r.val["extracted"].auc)
        density = "" if gates is None else f"{gates.density():.3f}"
        print(
            f"{label:6} {accuracy:>8.4f} {specificity:>11.4f} {density:>12} {statistics.mean(fewer):>12.1%} "
            f"{statistics.mean(aucs):>12.4f} {min(aucs):>7.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
