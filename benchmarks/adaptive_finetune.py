"""What `finetune --train auto` chooses, and what it recovers, on samples that chose nothing.

For the bundled ResNet, DenseNet and U-Net samples and two user-style 3x3-only networks
(tests/user_nets.py: `plain`, `residual`): prune at --pct on half A of the validation split
(saliency), fine-tune with the defaults and the unpruned model as teacher, the best epoch picked on
half A, then judge on half B, which nothing chose. Each row also shows the forms the rule did not
choose, so the rule's choice can be checked against them (docs/method.md §4).

    python benchmarks/adaptive_finetune.py [--pct 90] [--models resnet,densenet,unet,plain,residual] [--epochs 20]

The recipe question (docs/method.md §4): `--norm-lr-scale 1,10 --seeds 0,1,2 --compare auto` runs
the default form with each normalisation rate on three fine-tuning seeds, one row per setting,
`--batch-size` overriding the samples' batch for the training split.
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
    parser.add_argument("--norm-lr-scale", default="1", help="comma-separated rates for the normalisation layers (multiples of lr); a row each")
    parser.add_argument("--seeds", default="0", help="comma-separated fine-tuning seeds; a row each")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch (default: 64 for digits, 32 for nuclei)")
    args = parser.parse_args()
    torch.manual_seed(0)
    scales, seeds = [float(v) for v in args.norm_lr_scale.split(",")], [int(v) for v in args.seeds.split(",")]
    print(f"pct {args.pct:g}, {args.epochs} epochs, teacher = the unpruned model; select on half A, judge on half B")
    print("| model | norm lr x | seed | share when fixed | rule chooses | unpruned B | pruned B | " + " | ".join(f"{m} B" for m in args.compare.split(",")) + " |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: | " + " | ".join("---:" for _ in args.compare.split(",")) + " |")
    for name in args.models.split(","):
        model, data, batch = _model(name)
        train = load_data(ROOT / "sample_models" / f"{data}_train.npz", batch_size=args.batch_size or batch)
        a, b = halves(load_data(ROOT / "sample_models" / f"{data}_val.npz", batch_size=256))
        small, _ = prune(copy.deepcopy(model), a, pct=args.pct)
        choice = choose_trainable(small, "auto")
        before, after = metric(b, outputs(model, b)), metric(b, outputs(small, b))
        for scale in scales:
            for seed in seeds:
                cells = []
                for mode in args.compare.split(","):
                    started = time.perf_counter()
                    recipe = Recipe(epochs=args.epochs, train=mode, norm_lr_scale=scale, seed=seed)
                    tuned, report = finetune(copy.deepcopy(small), train, a, recipe=recipe, teacher=model)
                    mark = "*" if mode == choice.mode else ""
                    took = f"{report.trainable}, {report.epochs} epochs, " if mode == "auto" else ""
                    cells.append(f"{metric(b, outputs(tuned, b)):.3f}{mark} ({took}{time.perf_counter() - started:.0f} s)")
                print(f"| {name} | {scale:g} | {seed} | {choice.share:.2f} | {choice.mode} | {before:.3f} | {after:.3f} | " + " | ".join(cells) + " |", flush=True)
    print("* = the form `--train auto` starts with; the auto column says what it ended with")


if __name__ == "__main__":
    main()
