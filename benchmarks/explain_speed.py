"""Time `explain` on a torchvision resnet50 at 64x64, split by stage.

The issue's target: the run is dominated by the one forward + backward per minibatch that
weights the spectra by saliency, not by the spectra or the plotting. Three runs show where that
holds: the full report on 16 images (one minibatch), the numbers alone (`--no-figures`) on 16
images, and the full report on `--large` images (minibatches of 16), where the figures' fixed
cost is spread over more data.

    python benchmarks/explain_speed.py [--attributions N] [--images N] [--large N] [--size PX]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from explainfix_cli.explanation import explain
from explainfix_cli.io.checkpoints import ArchSpec, open_model
from explainfix_cli.io.data import Dataset

ARCH = ArchSpec("torchvision.models:resnet50", {"num_classes": 10})
BATCH = 16
NAMES = {
    "load": "load model",
    "saliency": "saliency forward+backward",
    "spectra": "spectra",
    "attributions": "attributions",
    "figures": "figures + report files",
}


def run(checkpoint: Path, out: Path, images: int, size: int, attributions: int, with_figures: bool) -> dict[str, float]:
    start = time.perf_counter()
    model = open_model(checkpoint, ARCH).model  # the --arch path a user of a state dict takes
    load = time.perf_counter() - start
    g = torch.Generator().manual_seed(0)
    data = Dataset(
        torch.randn(images, 3, size, size, generator=g),  # (N, 3, H, W)
        torch.randint(0, 10, (images,), generator=g),
        batch_size=BATCH,  # one forward + backward per minibatch of 16
    )
    result = explain(model, data, out, attributions=attributions, with_figures=with_figures)
    print(f"  {len(result.layers)} spatial layers, {len(result.figures)} figures", end="")
    return {"load": load, **result.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--large", type=int, default=256)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--attributions", type=int, default=4)
    args = parser.parse_args()
    try:
        import torchvision  # noqa: F401
    except ImportError:
        print("skipped: torchvision is not installed here; run this with a Python that has it.", file=sys.stderr)
        return

    print(f"explain resnet50 at {args.size}x{args.size}, minibatches of {BATCH}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "resnet50.pt"
        torch.save(ARCH.build().state_dict(), checkpoint)
        # a first run off the record: imports (captum, matplotlib) and caches
        run(checkpoint, Path(folder) / "warm", args.images, args.size, args.attributions, True)
        print(" (warm-up, not counted)")
        cases = [
            (f"full report, {args.images} images", args.images, True),
            (f"--no-figures, {args.images} images", args.images, False),
            (f"full report, {args.large} images", args.large, True),
        ]
        for k, (title, images, with_figures) in enumerate(cases):
            print(f"{title}:", end="")
            stages = run(checkpoint, Path(folder) / f"report{k}", images, args.size, args.attributions, with_figures)
            total = sum(stages.values())
            print()
            for stage, seconds in stages.items():
                print(f"  {NAMES[stage]:<28} {seconds:8.3f} s  {seconds / total:6.1%}")
            print(f"  {'total':<28} {total:8.3f} s")


if __name__ == "__main__":
    main()
