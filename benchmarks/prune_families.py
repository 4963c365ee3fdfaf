"""Every family shrinks: what each removal mode takes at one pct, and the recommended walk's recovery.

Part 1 (size): for the MobileNet and ConvNeXt samples and, when torchvision is installed, its
`mobilenet_v3_small` and `efficientnet_b0` (random init, 64x64 inputs, as
benchmarks/prune_torchvision.py runs them), the share of parameters each mode removes at --pct
(default 90) and the mode `explainfix prune` recommends (explainfix_cli.pruning.alternatives).

Part 2 (accuracy): the MobileNet sample walked as the note says: prune with the recommended
options on half A of the validation split (saliency), `finetune` with the unpruned model as teacher
(best epoch on half A) with the default `--train auto`, judged on half B, which chose nothing.

    python benchmarks/prune_families.py [--pct 90] [--epochs 20] [--skip-walk] [--walk granularity=channel,removal=calibrated]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from user_nets import halves

from explainfix_cli.evaluation.measure import metric, outputs
from explainfix_cli.io.checkpoints import open_model
from explainfix_cli.io.data import Dataset, load_data
from explainfix_cli.pruning.alternatives import prune_with_alternatives, removed_share
from explainfix_cli.pruning.pipeline import PruneSettings, prune
from explainfix_cli.training.finetune import Recipe, finetune

ROOT = Path(__file__).resolve().parents[1]


def _random_images(n: int, size: int, classes: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)  # (N, 3, H, W)
    y = torch.randint(0, classes, (n,), generator=g)
    return Dataset(x, y, 32, None, classes)


def _models() -> list[tuple[str, torch.nn.Module, Dataset]]:
    digits = halves(load_data(ROOT / "sample_models" / "digits_val.npz", batch_size=64))[0]
    found = [(name, open_model(ROOT / "sample_models" / f"{name}.safetensors").model, digits) for name in ("mobilenet", "convnext")]
    try:
        import torchvision
    except ImportError:
        print("torchvision is not installed: its models are skipped")
        return found
    for name in ("mobilenet_v3_small", "efficientnet_b0"):
        torch.manual_seed(0)
        found.append((name, getattr(torchvision.models, name)(num_classes=10), _random_images(256, 64, 10)))
    return found


def sizes(pct: float) -> None:
    print(f"## share of parameters removed at pct {pct:g}")
    print("| model | params | exact | calibrated | aggressive | channel | recommended | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for name, model, data in _models():
        started = time.perf_counter()
        _, report, advice = prune_with_alternatives(model, data, PruneSettings(pct=pct, fix=False))
        share = {f"{a.granularity}/{a.removal}": a.params_removed_share for a in advice.alternatives}
        cells = [f"{share[k]:.1%}" if k in share else "" for k in ("kernel/calibrated", "kernel/aggressive", "channel/exact")]
        chosen = advice.recommended.options if advice.recommended else "none"
        print(f"| {name} | {report.params_before:,} | {removed_share(report):.1%} | " + " | ".join(cells) + f" | {chosen} | {time.perf_counter() - started:.0f} |", flush=True)


def walk(pct: float, epochs: int, options_list: list[dict[str, str]]) -> None:
    print(f"\n## the MobileNet sample at pct {pct:g}, {epochs} epochs, teacher = the unpruned model; select on half A, judge on half B")
    model = open_model(ROOT / "sample_models" / "mobilenet.safetensors").model
    train = load_data(ROOT / "sample_models" / "digits_train.npz", batch_size=64)
    a, b = halves(load_data(ROOT / "sample_models" / "digits_val.npz", batch_size=256))
    print(f"unpruned on B: {metric(b, outputs(model, b)):.3f}")
    print("| prune options | params removed | pruned B | finetune (auto) B | what auto trained |")
    print("| --- | ---: | ---: | ---: | --- |")
    for options in options_list:
        small, report = prune(copy.deepcopy(model), a, pct=pct, **options)
        started = time.perf_counter()
        tuned, tuning = finetune(copy.deepcopy(small), train, a, recipe=Recipe(epochs=epochs), teacher=model)
        label = " ".join(f"--{k} {v}" for k, v in options.items())
        took = f"{tuning.trainable}, {tuning.epochs} epochs, {time.perf_counter() - started:.0f} s"
        print(f"| {label} | {removed_share(report):.1%} | {metric(b, outputs(small, b)):.3f} | {metric(b, outputs(tuned, b)):.3f} | {took} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pct", type=float, default=90.0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--skip-walk", action="store_true")
    parser.add_argument("--walk", default="granularity=channel,removal=calibrated", help="the prune options walked, comma-separated key=value")
    args = parser.parse_args()
    torch.manual_seed(0)
    sizes(args.pct)
    if not args.skip_walk:
        walk(args.pct, args.epochs, [dict([o.split("=")]) for o in args.walk.split(",")])


if __name__ == "__main__":
    main()
