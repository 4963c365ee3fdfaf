"""What `finetune --train auto` chooses, and what it recovers, on samples that chose nothing.

For the bundled ResNet, DenseNet and U-Net samples and two user-style 3x3-only networks
(tests/user_nets.py: `plain`, `residual`): prune at --pct on half A of the validation split
(saliency), fine-tune with the defaults and the unpruned model as teacher, the best epoch picked on
half A, then judge on half B, which nothing chose. Each row also shows the forms the rule did not
choose, so the rule's choice can be checked against them (docs/method.md §4).

    python benchmarks/adaptive_finetune.py [--pct 90] [--models resnet,densenet,unet,plain,residual] [--epochs 20]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from user_nets import NETS, halves, trained

from explainfix_cli.evaluation.measure import metric, outputs
from explainfix_cli.io.checkpoints import open_model
from explainfix_cli.io.data import load_data
from explainfix_cli.pruning.pipeline import prune
from explainfix_cli.training.finetune import Recipe, finetune
from explainfix_cli.training.trainable import choose_trainable

ROOT = Path(__file__).resolve().parents[1]


def _model(name: str) -> tuple[torch.nn.Module, str, int]:
    if name in NETS:
        return trained(name), "digits", 64
    return open_model(ROOT / "sample_models" / f"{name}.safetensors").model, "nuclei" if name == "unet" else "digits", 32 if name == "unet" else 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pct", type=float, default=90.0)
    parser.add_argument("--models", default="resnet,densenet,unet,plain,residual")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--compare", default="auto,unfixed,masked,all", help="forms to run: auto (the default, which hands the second half of its epochs to the next form when it is more than 0.01 below the teacher on half A halfway) and the forms it chooses from")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"pct {args.pct:g}, {args.epochs} epochs, teacher = the unpruned model; select on half A, judge on half B")
    print("| model | share when fixed | rule chooses | unpruned B | pruned B | " + " | ".join(f"{m} B" for m in args.compare.split(",")) + " |")
    print("| --- | ---: | --- | ---: | ---: | " + " | ".join("---:" for _ in args.compare.split(",")) + " |")
    for name in args.models.split(","):
        model, data, batch = _model(name)
        train = load_data(ROOT / "sample_models" / f"{data}_train.npz", batch_size=batch)
        a, b = halves(load_data(ROOT / "sample_models" / f"{data}_val.npz", batch_size=256))
        small, _ = prune(copy.deepcopy(model), a, pct=args.pct)
        choice = choose_trainable(small, "auto")
        cells = []
        for mode in args.compare.split(","):
            started = time.perf_counter()
            tuned, report = finetune(copy.deepcopy(small), train, a, recipe=Recipe(epochs=args.epochs, train=mode), teacher=model)
            mark = "*" if mode == choice.mode else ""
            took = f"{report.trainable}, {report.epochs} epochs, " if mode == "auto" else ""
            cells.append(f"{metric(b, outputs(tuned, b)):.3f}{mark} ({took}{time.perf_counter() - started:.0f} s)")
        print(f"| {name} | {choice.share:.2f} | {choice.mode} | {metric(b, outputs(model, b)):.3f} | {metric(b, outputs(small, b)):.3f} | " + " | ".join(cells) + " |", flush=True)
    print("* = the form `--train auto` starts with; the auto column says what it ended with")


if __name__ == "__main__":
    main()
