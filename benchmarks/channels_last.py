"""Is channels-last memory format faster for fine-tuning here? (issue 23: "channels-last where it is faster")

Times training steps (forward, backward, Adam step) of the bundled model factories on random
inputs, in the default contiguous (NCHW) format and in channels-last (NHWC: model and inputs
converted with `torch.channels_last`), alternating the two so load drifts hit both alike. Prints
the median step time of each and their ratio; `finetune` would convert only where the ratio is
clearly below 1 on the machines it runs on.

    python benchmarks/channels_last.py [--models resnet,unet,mobilenet] [--size 128] [--batch 32] [--steps 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from explainfix_cli import zoo


def _model(name: str) -> tuple[torch.nn.Module, int, bool]:
    """(model, input channels, whether its output is a mask)."""
    if name == "unet":
        return zoo.unet(), 1, True
    return getattr(zoo, name)(num_classes=10, in_channels=3), 3, False


def _steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mask: bool, steps: int) -> float:
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = model(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out, y) if mask else torch.nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first step warms the kernels up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet,unet,mobilenet")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(f"{torch.get_num_threads()} threads, batch {args.batch}, {args.size}x{args.size}, median step of {args.steps} (first dropped), {args.rounds} rounds alternating")
    print("| model | NCHW ms | channels-last ms | ratio |\n| --- | ---: | ---: | ---: |")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model, channels, mask = _model(name)
        x = torch.randn(args.batch, channels, args.size, args.size)
        with torch.no_grad():
            y = (torch.rand_like(model(x)) > 0.5).float() if mask else torch.randint(0, 10, (args.batch,))
        found: dict[str, list[float]] = {"nchw": [], "nhwc": []}
        for _ in range(args.rounds):
            for fmt in ("nchw", "nhwc"):
                m = model if fmt == "nchw" else model.to(memory_format=torch.channels_last)
                xs = x if fmt == "nchw" else x.contiguous(memory_format=torch.channels_last)
                found[fmt].append(_steps(m, xs, y, mask, args.steps))
                model = model.to(memory_format=torch.contiguous_format)
        a, b = statistics.median(found["nchw"]) * 1e3, statistics.median(found["nhwc"]) * 1e3
        print(f"| {name} | {a:.0f} | {b:.0f} | {b / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()
