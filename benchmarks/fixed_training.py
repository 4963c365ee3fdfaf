"""The paper's table for the bundled samples: learned vs spatially fixed, and pruned then fine-tuned.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fixed_training.py [--models resnet,unet] [--epochs 20]

Per model, on its held-out split (`*_val.npz`; everything trains on `*_train.npz`):
- the bundled trained sample, as it is;
- learned from scratch, and spatially fixed from scratch with `dct2`, `ghaar` and `random` filters,
  all trained the same number of epochs with the default recipe (`explainfix_cli.training.Recipe`);
- the trained sample pruned at each pct (saliency on the training data, default prune options)
  and fine-tuned with the default recipe, without and with the unpruned model as `--teacher`.
A model without a bundled sample (densenet_bc) uses its learned-from-scratch network as the trained one.
`--shifted` runs only the from-scratch rows, on a harder task made on the fly from the same digits:
each placed at a seeded random position on a noisy 32x32 canvas (`shifted`).

Then the speed of one training epoch, measured in turn (`--speed-rounds` rounds, the fastest of
each kept, since other processes share the machine): learned, fixed (dct2, unpruned), and fixed
pruned at 90 %. Markdown tables go to stdout, progress to stderr.

`--seeds 0,1,2` trains every row once per recipe seed (the spread between seeds is about a point on
the 360 held-out digits, so one seed decides nothing; `--seed-init` lets the seed draw the fresh
network and its fixed filters too); `--recipe '{"lr": 0.1}'` overrides fields of
the default `Recipe`; `--no-teacher` skips the rows fine-tuned with the unpruned model as teacher.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from explainfix_cli.evaluation.measure import kernel_counts, metric, outputs
from explainfix_cli.io.checkpoints import open_model
from explainfix_cli.io.data import Dataset, load_data
from explainfix_cli.pruning.pipeline import prune
from explainfix_cli.training.finetune import Recipe, finetune
from explainfix_cli.training.fixed import fix
from explainfix_cli.zoo import create_model

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


@dataclass(frozen=True)
class Bench:
    name: str
    factory: str
    data: str
    batch_size: int
    sample: str | None  # bundled trained model, if any
    kwargs: tuple[tuple[str, int], ...] = (("num_classes", 10), ("in_channels", 1))


BENCHES = {
    "resnet": Bench("resnet", "resnet", "digits", 64, "resnet"),
    "densenet": Bench("densenet", "densenet", "digits", 64, "densenet"),
    "densenet_bc": Bench("densenet_bc", "densenet_bc", "digits", 64, "densenet_bc"),
    "mobilenet": Bench("mobilenet", "mobilenet", "digits", 64, "mobilenet"),
    "unet": Bench("unet", "unet", "nuclei", 32, "unet", (("num_classes", 1), ("in_channels", 1))),
}


def shifted(data: Dataset, seed: int, canvas: int = 32, noise: float = 0.5) -> Dataset:
    """The same images at a seeded random position on a `canvas`-pixel square of background, plus
    Gaussian noise of std `noise`: the harder digits, made on the fly (no download)."""
    n, c, h, w = data.x.shape
    g = torch.Generator().manual_seed(seed)
    background = data.x.flatten(2).min(dim=2).values.median()  # the standardised blank pixel
    x = torch.full((n, c, canvas, canvas), float(background))  # (N, C, canvas, canvas)
    top = torch.randint(0, canvas - h + 1, (n,), generator=g)
    left = torch.randint(0, canvas - w + 1, (n,), generator=g)
    for k in range(n):
        x[k, :, top[k] : top[k] + h, left[k] : left[k] + w] = data.x[k]
    return dataclasses.replace(data, x=x + noise * torch.randn(x.shape, generator=g))


@dataclass
class Row:
    model: str
    setting: str
    spatial_kernels: int  # not all-zero
    params: int
    trainable: int
    metric: float
    seconds_per_epoch: float | None
    best_epoch: int | None


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def row(bench: Bench, setting: str, model: nn.Module, value: float, seconds: float | None = None, best: int | None = None) -> Row:
    total, zero = kernel_counts(model)
    r = Row(bench.name, setting, total - zero, sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad), value, seconds, best)  # fmt: skip
    print(markdown_row(r), flush=True)  # as it comes: a long run that is stopped keeps its rows
    return r


def fresh(bench: Bench, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(bench.factory, **dict(bench.kwargs))


def train(model: nn.Module, data: tuple[Dataset, Dataset], recipe: Recipe, teacher: nn.Module | None = None) -> tuple[nn.Module, float, float, int]:
    model, report = finetune(model, *data, recipe=recipe, teacher=teacher)
    assert report.metric_after is not None
    return model, report.metric_after, report.seconds_per_epoch, report.best_epoch


def run(
    bench: Bench, recipe: Recipe, pcts: list[float], speed_rounds: int, scratch: bool = True, speed_only: bool = False, hard: bool = False,
    teachers: bool = True,  # also the pruned rows with the unpruned model as teacher
    init_seed: int = 0,  # of the fresh network and of the fixed filters (from-scratch rows)
) -> tuple[list[Row], dict[str, float]]:
    train_data = load_data(SAMPLES / f"{bench.data}_train.npz", batch_size=bench.batch_size)
    val = load_data(SAMPLES / f"{bench.data}_val.npz", batch_size=256)
    data = (train_data, val)
    if hard:  # only the from-scratch rows: the bundled samples were trained on the plain digits
        data = (shifted(train_data, seed=0), shifted(val, seed=1))
        bench = dataclasses.replace(bench, name=f"{bench.name} (shifted digits)", sample=None)
    rows: list[Row] = []
    trained = None
    if bench.sample is not None:
        trained = open_model(SAMPLES / f"{bench.sample}.safetensors").model
        rows.append(row(bench, "trained sample (bundled)", trained, metric(val, outputs(trained, val))))
    speed_models: dict[str, nn.Module | None] = {}
    if (scratch and not speed_only) or trained is None:
        learned, value, seconds, best = train(fresh(bench, init_seed), data, recipe)
        rows.append(row(bench, "learned, from scratch", learned, value, seconds, best))
        speed_models["learned"] = learned
        for init in ("dct2", "ghaar", "random"):
            model, _ = fix(fresh(bench, init_seed), init, seed=init_seed)
            model, value, seconds, best = train(model, data, recipe)
            speed_models.setdefault("fixed", model)
            rows.append(row(bench, f"fixed {init}, from scratch", model, value, seconds, best))
        trained = trained if trained is not None else learned
        if hard:
            return rows, {}
    else:
        speed_models = {"learned": trained, "fixed": fix(copy.deepcopy(trained), "keep")[0]}
    saliency_data = load_data(SAMPLES / f"{bench.data}_train.npz", batch_size=256)
    if speed_only:
        speed_models["fixed, pruned 90 %"] = prune(copy.deepcopy(trained), saliency_data, pct=90)[0]
        return rows, epoch_speed(speed_models, data, speed_rounds)
    for pct in pcts:
        small, _ = prune(copy.deepcopy(trained), saliency_data, pct=pct)
        if pct == 90:
            speed_models["fixed, pruned 90 %"] = copy.deepcopy(small)
        for teacher in (None, trained) if teachers else (None,):
            model, value, seconds, best = train(copy.deepcopy(small), data, recipe, teacher)
            rows.append(row(bench, f"pruned {pct:g} % + finetune{' + teacher' if teacher is not None else ''}", model, value, seconds, best))
    return rows, epoch_speed(speed_models, data, speed_rounds)


def epoch_speed(models: dict[str, nn.Module | None], data: tuple[Dataset, Dataset], rounds: int) -> dict[str, float]:
    """Seconds of one training epoch per model, measured in turn, the fastest of `rounds` kept."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, model in models.items():
            if model is None:
                continue
            _, report = finetune(copy.deepcopy(model), *data, recipe=Recipe(epochs=1))
            best[name] = min(best.get(name, float("inf")), report.seconds_per_epoch)
    return best


HEADER = """| model | setting | spatial kernels | params | trainable | held-out metric | s/epoch | best epoch |
| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"""


def markdown_row(r: Row) -> str:
    sec = "" if r.seconds_per_epoch is None else f"{r.seconds_per_epoch:.2f}"
    best = "" if r.best_epoch is None else str(r.best_epoch)
    return f"| {r.model} | {r.setting} | {r.spatial_kernels:,} | {r.params:,} | {r.trainable:,} | {r.metric:.4f} | {sec} | {best} |"


def versus(seconds: float, learned: float) -> str:
    change = 1 - seconds / learned
    return f"{change:.0%} faster" if change >= 0 else f"{-change:.0%} slower"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet,densenet,densenet_bc,mobilenet,unet")
    parser.add_argument("--epochs", type=int, default=Recipe().epochs)
    parser.add_argument("--pcts", default="50,90,95,99", help="comma-separated; empty for no pruning rows")
    parser.add_argument("--speed-rounds", type=int, default=3)
    parser.add_argument("--no-scratch", action="store_true", help="skip the from-scratch rows (learned and fixed)")
    parser.add_argument("--speed-only", action="store_true", help="only the epoch speeds (trained sample, fixed, pruned 90 %%)")
    parser.add_argument("--shifted", action="store_true", help="only the from-scratch rows, on the digits shifted on a noisy 32x32 canvas")
    parser.add_argument("--json", type=Path, help="also write the rows and speeds here")
    parser.add_argument("--seeds", default="0", help="comma-separated recipe seeds: every trained row once per seed")
    parser.add_argument("--recipe", default="{}", help='JSON overrides of the default recipe, e.g. \'{"lr": 0.1}\'')
    parser.add_argument("--no-teacher", action="store_true", help="skip the pruned rows with the unpruned model as teacher")
    parser.add_argument("--seed-init", action="store_true", help="each seed also draws the fresh network and its fixed filters (from-scratch rows)")
    args = parser.parse_args()
    recipe = Recipe(epochs=args.epochs, **json.loads(args.recipe))
    started = time.perf_counter()
    rows: list[Row] = []
    speeds: dict[str, dict[str, float]] = {}
    print(f"Recipe: {json.dumps(recipe.to_json())}; torch threads {torch.get_num_threads()}\n")
    print(HEADER, flush=True)
    pcts = [float(p) for p in args.pcts.split(",") if p]
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.models.split(","):
            bench = BENCHES[name] if "," not in args.seeds else dataclasses.replace(BENCHES[name], name=f"{name} (seed {seed})")
            r, speeds[name] = run(
                bench, dataclasses.replace(recipe, seed=seed), pcts, args.speed_rounds, not args.no_scratch, args.speed_only, args.shifted,
                not args.no_teacher, seed if args.seed_init else 0,
            )  # fmt: skip
            rows += r
    print("\n| model | s/epoch learned | s/epoch fixed | s/epoch fixed, pruned 90 % | pruned 90 % vs learned | fixed vs learned |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, s in speeds.items():
        if "learned" not in s or "fixed" not in s:
            continue
        p90 = s.get("fixed, pruned 90 %")
        p90_cells = f"{p90:.3f} | {versus(p90, s['learned'])}" if p90 else " | "
        print(f"| {name} | {s['learned']:.3f} | {s['fixed']:.3f} | {p90_cells} | {versus(s['fixed'], s['learned'])} |")
    if args.json:
        args.json.write_text(json.dumps({"recipe": recipe.to_json(), "rows": [r.__dict__ for r in rows], "speed": speeds}, indent=1))
    log(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
