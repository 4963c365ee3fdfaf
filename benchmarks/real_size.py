"""Real-size data: peak memory (the whole process tree, workers included) and wall time of the
commands on generated RGB image folders, next to a plain PyTorch script streaming the same folder.

    PYTHONPATH=$PWD python benchmarks/real_size.py --sizes 256,1024,8192 --image-size 128
    PYTHONPATH=$PWD python benchmarks/real_size.py --torchvision mobilenet_v3_small   # with torchvision installed

Folders are generated once with PIL under --cache (reused across runs). The model is the bundled
ResNet factory (explainfix_cli.zoo:resnet, in_channels=3, 10 classes). Each command runs as its
own process; memory is the peak of the summed PSS of it and its descendants (shared pages counted
once), polled every 0.2 s; beside it the exact high-water mark of its largest process (wait4's
ru_maxrss), which a short peak between two polls cannot escape.
`finetune` validates on a 64-image folder before and after its epoch. The plain script's "fwd+bwd" pass makes one forward and backward per minibatch (what a saliency
pass costs); "train epoch" one SGD epoch with shuffling.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLAIN = r'''
import sys, time, torch, numpy as np
from pathlib import Path
from PIL import Image
from explainfix_cli.io.checkpoints import open_model
root, mode, workers, bs = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
classes = sorted(d.name for d in root.iterdir() if d.is_dir())
items = [(f, k) for k, c in enumerate(classes) for f in sorted((root / c).iterdir())]
class Folder(torch.utils.data.Dataset):
    def __len__(self): return len(items)
    def __getitem__(self, i):
        f, k = items[i]
        with Image.open(f) as img:
            x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
        return x, k
model = open_model(sys.argv[5]).model
loader = torch.utils.data.DataLoader(Folder(), batch_size=bs, shuffle=mode == "train", num_workers=workers)
if mode == "train":
    model.train(); opt = torch.optim.Adam(model.parameters(), 1e-3)
for x, y in loader:
    loss = torch.nn.functional.cross_entropy(model(x), y)
    if mode == "train":
        opt.zero_grad(); loss.backward(); opt.step()
    else:
        loss.backward()
'''


def make_folder(root: Path, n: int, size: int) -> Path:
    """`n` RGB images of `size`x`size` in 10 class folders (smooth noise: PNG-decodable, not trivial)."""
    import numpy as np
    from PIL import Image

    done = root / ".done"
    if done.exists():
        return root
    g = np.random.default_rng(n)
    for k in range(n):
        cls = root / f"c{k % 10}"
        cls.mkdir(parents=True, exist_ok=True)
        small = g.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR).save(cls / f"{k:06d}.png")
    done.write_text("ok")
    return root


def tree_memory(pid: int) -> int:
    """Memory (bytes) of `pid` and its descendants, from /proc: the sum of their proportional set
    sizes (PSS), so that pages they share (the libraries a forked DataLoader worker maps from its
    parent) count once, not once per process as summed RSS would count them."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            parents[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError):
            continue
    keep, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in keep:
                keep.add(child)
                frontier.append(child)
    total = 0
    for p in keep:
        try:
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text()
            total += next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:")) * 1024
        except (OSError, StopIteration, ValueError):
            continue
    return total


def measure(cmd: list[str], timeout: float) -> tuple[float, float, float, int]:
    """(peak GiB of the process tree, sampled; peak GiB of its largest process, exact; wall
    seconds; exit code). The exact figure is the kernel's high-water mark of resident memory
    (`ru_maxrss` from wait4), which no sampling interval misses."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    peak, rc, largest = 0, None, 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            rc, largest = os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024
            proc.returncode = rc
            break
        peak = max(peak, tree_memory(proc.pid))
        if time.perf_counter() - t0 > timeout:
            proc.kill()
        time.sleep(0.2)  # reading smaps_rollup walks the page tables: often enough for a pass, rarely enough not to slow it
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    if rc != 0 and err:
        print(f"  ! {' '.join(cmd[2:5])}: {err.strip().splitlines()[-1][:200]}", file=sys.stderr)
    return peak / 2**30, largest / 2**30, wall, rc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="256,1024,2048,8192")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: explainfix's default)")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "explainfix-real-size")
    p.add_argument("--timeout", type=float, default=600, help="seconds per command")
    p.add_argument("--only", default="", help="comma-separated subset of rows to run")
    p.add_argument("--torchvision", default="", metavar="NAME", help="run the rows on torchvision.models.NAME (10 classes, random init) instead of the bundled ResNet; needs torchvision")
    args = p.parse_args()

    from explainfix_cli.io.checkpoints import save_model
    from explainfix_cli.io.data import default_workers
    from explainfix_cli.zoo import resnet

    workers = default_workers() if args.workers is None else args.workers
    os.environ["EXPLAINFIX_WORKERS"] = str(workers)
    args.cache.mkdir(parents=True, exist_ok=True)
    model = args.cache / "resnet3.safetensors"
    if args.torchvision:
        model = args.cache / f"{args.torchvision}.safetensors"
        if not model.exists():
            try:
                import torchvision
            except ImportError:
                sys.exit(f"--torchvision {args.torchvision}: torchvision is not installed here (docs/benchmarks.md: pip install torch==2.14.1 torchvision==0.29.1).")
            import torch

            from explainfix_cli.io.checkpoints import ArchSpec as Spec

            torch.manual_seed(0)
            net = getattr(torchvision.models, args.torchvision)(num_classes=10)
            save_model(net, model, arch=Spec(f"torchvision.models:{args.torchvision}", {"num_classes": 10}))
    elif not model.exists():
        import torch

        from explainfix_cli.io.checkpoints import ArchSpec as Spec

        torch.manual_seed(0)
        save_model(resnet(num_classes=10, in_channels=3), model, arch=Spec("explainfix_cli.zoo:resnet", {"num_classes": 10, "in_channels": 3}))
    py, cli = sys.executable, [sys.executable, "-m", "explainfix_cli"]
    bs = ["--batch-size", str(args.batch_size)]
    print(f"{args.torchvision or 'bundled ResNet factory'}, workers {workers}, batch {args.batch_size}, {args.image_size}x{args.image_size} RGB, {os.cpu_count()} cores")
    print("| N | command | peak GiB (tree, PSS) | max RSS GiB (largest process) | wall s | vs plain |\n| ---: | --- | ---: | ---: | ---: | ---: |")
    val = make_folder(args.cache / f"rgb{args.image_size}-64", 64, args.image_size)  # finetune validates on it (twice)
    for n in [int(s) for s in args.sizes.split(",")]:
        folder = make_folder(args.cache / f"rgb{args.image_size}-{n}", n, args.image_size)
        out = Path(tempfile.mkdtemp(prefix="rs-", dir=args.cache))
        rows = {
            "plain fwd+bwd": [py, "-c", PLAIN, str(folder), "eval", str(workers), str(args.batch_size), str(model)],
            "plain train epoch": [py, "-c", PLAIN, str(folder), "train", str(workers), str(args.batch_size), str(model)],
            "prune --batches 4": [*cli, "prune", str(model), "--data", str(folder), "--batches", "4", *bs, "--out", str(out / "p4.safetensors")],
            "prune": [*cli, "prune", str(model), "--data", str(folder), *bs, "--out", str(out / "p.safetensors")],
            "explain --no-figures": [*cli, "explain", str(model), "--data", str(folder), "--no-figures", *bs, "--out", str(out / "ex")],
            "evaluate": [*cli, "evaluate", str(model), "--data", str(folder), *bs, "--json"],
            "finetune 1 epoch": [*cli, "finetune", str(model), "--data", str(folder), "--val", str(val), "--epochs", "1", *bs, "--out", str(out / "f.safetensors")],
        }
        plain: dict[str, float] = {}
        for name, cmd in rows.items():
            if args.only and name not in args.only.split(","):
                continue
            gib, largest, wall, rc = measure(cmd, args.timeout)
            base = plain.get("plain train epoch" if name.startswith("finetune") else "plain fwd+bwd")
            if name.startswith("plain"):
                plain[name] = wall
            ratio = f"{wall / base:.2f}x" if base and not name.startswith("plain") else ""
            print(f"| {n:,} | {name}{'' if rc == 0 else f' (exit {rc})'} | {gib:.2f} | {largest:.2f} | {wall:.1f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
