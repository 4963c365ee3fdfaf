"""Time `explain` on a torchvision resnet50 at 64x64 with 16 images, split by stage.

The issue's target: the run is dominated by the one forward + backward per minibatch that
weights the spectra by saliency, not by the spectra or the plotting.

    python benchmarks/explain_speed.py [--attributions N] [--images N] [--size PX]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from explainfix_cli.checkpoints import ArchSpec, open_model
from explainfix_cli.data import Dataset
from explainfix_cli.explain import explain

ARCH = ArchSpec("torchvision.models:resnet50", {"num_classes": 10})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--attributions", type=int, default=4)
    args = parser.parse_args()
    try:
        import torchvision  # noqa: F401
    except ImportError:
        print("skipped: torchvision is not installed here; run this with a Python that has it.", file=sys.stderr)
        return

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "resnet50.pt"
        torch.save(ARCH.build().state_dict(), checkpoint)
        start = time.perf_counter()
        model = open_model(checkpoint, ARCH).model  # the --arch path a user of a state dict takes
        load = time.perf_counter() - start
        data = Dataset(
            torch.randn(args.images, 3, args.size, args.size),  # (N, 3, H, W)
            torch.randint(0, 10, (args.images,)),
            batch_size=args.images,  # one minibatch: one forward + backward
        )
        result = explain(model, data, Path(folder) / "report", attributions=args.attributions)

    stages = {"load": load, **result.seconds}
    print(
        f"explain resnet50, {args.images} images at {args.size}x{args.size}, "
        f"{len(result.layers)} spatial layers, {len(result.figures)} figures, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    names = {
        "load": "load model",
        "saliency": "saliency forward+backward",
        "spectra": "spectra",
        "attributions": f"attributions ({args.attributions} inputs)",
        "figures": "figures + report",
    }
    for stage, seconds in stages.items():
        print(f"  {names[stage]:<28} {seconds:8.3f} s")
    print(f"  {'total':<28} {sum(stages.values()):8.3f} s")


if __name__ == "__main__":
    main()
