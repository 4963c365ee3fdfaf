"""Regenerate everything in sample_models/: the data, the trained sample models, metrics.json.

    python sample_models/make_samples.py                  # everything
    python sample_models/make_samples.py densenet_bc      # only the named models
    python sample_models/make_samples.py --metadata-only  # rewrite the metadata only

The last form keeps every tensor and array byte for byte, without training: it rewrites the
explainfix metadata of the existing `NAME.safetensors` files (the input preprocessing, from
metrics.json) and gives the multi-label data files their class names.

Two runs write byte-identical files: fixed seeds, deterministic algorithms, one thread (CPU
reductions split work by thread count), and zip entries with a fixed timestamp. Progress goes to
stderr; the markdown table of held-out metrics (for the README) to stdout.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from torch import nn

OUT = Path(__file__).resolve().parent
# The script belongs to a checkout: use that checkout's package whether or not it is installed.
sys.path.insert(0, str(OUT.parent))

from explainfix_cli.io.checkpoints import FORMAT, ArchSpec, save_model  # noqa: E402
from explainfix_cli.io.preprocessing import Preprocessing  # noqa: E402
from explainfix_cli.zoo import create_model  # noqa: E402

SEED = 0
Split = tuple[torch.Tensor, torch.Tensor]  # (x, y)
DIGITS_SIZE = 16
NUCLEI_SIZE = 32
# Multi-label targets derived from the digit, so the multi-label sample uses real images.
ATTRIBUTES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "even": lambda d: d % 2 == 0,
    "at_least_5": lambda d: d >= 5,
    "prime": lambda d: np.isin(d, [2, 3, 5, 7]),
    "multiple_of_3": lambda d: d % 3 == 0,
}


@dataclass(frozen=True)
class Sample:
    """One bundled model: which zoo factory, on which data, trained how."""

    name: str  # file stem in sample_models/
    factory: str  # a name in explainfix_cli.zoo
    data: str  # stem of the <data>_train.npz / <data>_val.npz pair
    epochs: int
    lr: float = 3e-3
    batch_size: int = 64
    kwargs: dict[str, Any] = field(default_factory=dict)


SAMPLES = (
    Sample("resnet", "resnet", "digits", 10, kwargs={"num_classes": 10, "in_channels": 1}),
    Sample("densenet", "densenet", "digits", 12, kwargs={"num_classes": 10, "in_channels": 1}),
    Sample("densenet_bc", "densenet_bc", "digits", 12, kwargs={"num_classes": 10, "in_channels": 1}),
    Sample("mobilenet", "mobilenet", "digits", 15, kwargs={"num_classes": 10, "in_channels": 1}),
    Sample(
        "vgg",
        "vgg",
        "digits",
        10,
        kwargs={"num_classes": 10, "in_channels": 1, "input_size": DIGITS_SIZE},
    ),
    Sample("shufflenet", "shufflenet", "digits", 15, kwargs={"num_classes": 10, "in_channels": 1}),
    Sample("convnext", "convnext", "digits", 15, kwargs={"num_classes": 10, "in_channels": 1}),
    Sample("unet", "unet", "nuclei", 12, batch_size=32, kwargs={"num_classes": 1, "in_channels": 1}),
    Sample(
        "resnet_multilabel",
        "resnet",
        "digits_multilabel",
        10,
        kwargs={"num_classes": len(ATTRIBUTES), "in_channels": 1},
    ),
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """`np.savez_compressed` with a fixed timestamp in every zip entry, so reruns are identical."""
    with zipfile.ZipFile(path, "w") as archive:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            entry = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(entry, buffer.getvalue())


def make_digits() -> dict[str, Any]:
    """sklearn's 1,797 real 8x8 digits at 16x16, standardised, split 80/20 by class."""
    digits = load_digits()
    images = torch.from_numpy(digits.images).float()[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    size = (DIGITS_SIZE, DIGITS_SIZE)
    # Bilinear weights are convex, so the upsampled pixels stay in [0, 1].
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)  # (N, 1, 16, 16)
    pixels = images.numpy()
    labels = digits.target.astype(np.int64)  # (N,)
    train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=SEED)
    train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
    mean, std = float(pixels[train_idx].mean()), float(pixels[train_idx].std())
    x = ((pixels - mean) / std).astype(np.float32)  # (N, 1, 16, 16)
    save_npz(OUT / "digits_train.npz", x=x[train_idx], y=labels[train_idx])
    save_npz(OUT / "digits_val.npz", x=x[val_idx], y=labels[val_idx])
    write_image_folder(pixels[val_idx], labels[val_idx], OUT / "digits_images", per_class=10)

    multi = np.stack([f(labels) for f in ATTRIBUTES.values()], axis=1).astype(np.float32)  # (N, K)
    names = np.array(list(ATTRIBUTES))  # (K,) the multi-label classes' names, read by load_data
    save_npz(OUT / "digits_multilabel_train.npz", x=x[train_idx], y=multi[train_idx], classes=names)
    save_npz(OUT / "digits_multilabel_val.npz", x=x[val_idx], y=multi[val_idx], classes=names)
    return {
        "source": "sklearn.datasets.load_digits, bilinear 8x8 -> 16x16, [0, 1], standardised",
        "train": len(train_idx),
        "val": len(val_idx),
        "mean": mean,
        "std": std,
        "image_folder": "digits_images/<digit>/<index in digits_val.npz>.png, [0, 1] * 255",
        "multilabel_attributes": list(ATTRIBUTES),
    }


def write_image_folder(pixels: np.ndarray, labels: np.ndarray, root: Path, per_class: int) -> None:
    """The first `per_class` images of each class as 8-bit grayscale PNGs, named by index."""
    if root.exists():
        shutil.rmtree(root)
    for digit in range(10):
        folder = root / str(digit)
        folder.mkdir(parents=True)
        for index in np.flatnonzero(labels == digit)[:per_class]:
            gray = np.rint(pixels[index, 0] * 255).astype(np.uint8)  # (16, 16)
            Image.fromarray(gray).save(folder / f"{index}.png")  # uint8 2-D arrays become mode "L"


def make_nuclei(train: int = 600, val: int = 150) -> dict[str, Any]:
    """Nuclei-like images: bright blurred ellipses on a gradient, with noise, and their masks.

    Stands in for BBBC038 (the paper's nuclei data, not downloadable here): a few bright,
    roughly elliptical objects of varying size, orientation and brightness, touching at times,
    on an uneven background, with soft edges so that the mask boundary is not trivial.
    """
    rng = np.random.default_rng(SEED)
    n, size = train + val, NUCLEI_SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)  # (H, W) each
    blobs = np.zeros((n, 1, size, size), np.float32)  # (N, 1, H, W)
    masks = np.zeros((n, 1, size, size), np.float32)  # (N, 1, H, W)
    for k in range(n):
        for _ in range(rng.integers(1, 7)):
            cy, cx = rng.uniform(3, size - 3, 2)
            a, b = rng.uniform(2.0, 5.5, 2)
            theta = rng.uniform(0, np.pi)
            dy, dx = yy - cy, xx - cx
            u = (dx * np.cos(theta) + dy * np.sin(theta)) / a
            v = (-dx * np.sin(theta) + dy * np.cos(theta)) / b
            r2 = u**2 + v**2  # (H, W), 1 on the ellipse's border
            inside = r2 <= 1
            # Brighter towards the centre, as a nucleus is thicker there.
            brightness = rng.uniform(0.4, 1.0) * (0.75 + 0.25 * (1 - r2))
            blobs[k, 0] = np.where(inside, np.maximum(blobs[k, 0], brightness), blobs[k, 0])
            masks[k, 0][inside] = 1.0
    kernel = torch.tensor([1.0, 2.0, 1.0]) / 4
    kernel = torch.outer(kernel, kernel)[None, None]  # (1, 1, 3, 3)
    blurred = F.conv2d(F.pad(torch.from_numpy(blobs), (1, 1, 1, 1), mode="replicate"), kernel)
    gradient = rng.uniform(-0.3, 0.3, (n, 3, 1, 1)).astype(np.float32)  # (N, 3, 1, 1)
    background = gradient[:, :1] + (gradient[:, 1:2] * xx + gradient[:, 2:] * yy) / size
    noise = rng.normal(0, 1, (n, 1, size, size)) * rng.uniform(0.03, 0.12, (n, 1, 1, 1))
    images = (blurred.numpy() + background + noise).astype(np.float32)  # (N, 1, H, W)
    mean, std = float(images[:train].mean()), float(images[:train].std())
    x = ((images - mean) / std).astype(np.float32)
    save_npz(OUT / "nuclei_train.npz", x=x[:train], y=masks[:train])
    save_npz(OUT / "nuclei_val.npz", x=x[train:], y=masks[train:])
    return {
        "source": "synthetic nuclei-like blobs (stand-in for BBBC038), standardised",
        "train": train,
        "val": val,
        "mean": mean,
        "std": std,
        "foreground_fraction": float(masks.mean()),
    }


def load_pair(stem: str) -> tuple[Split, Split]:
    """The (x, y) train and val tensors of `<stem>_train.npz` / `<stem>_val.npz`."""
    splits: list[Split] = []
    for split in ("train", "val"):
        with np.load(OUT / f"{stem}_{split}.npz") as data:
            splits.append((torch.from_numpy(data["x"]), torch.from_numpy(data["y"])))
    return splits[0], splits[1]


def loss_for(y: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy for class labels, BCE-with-logits for 0/1 targets (multi-label, masks)."""
    return F.cross_entropy if y.dim() == 1 else F.binary_cross_entropy_with_logits


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[str, float]:
    """The held-out metric on the whole set in one batch: accuracy, macro AUC or Dice."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
    if y.dim() == 1:
        return "accuracy", int((logits.argmax(1) == y).sum()) / len(y)
    if y.dim() == 2:
        return "auc", float(roc_auc_score(y.numpy(), logits.numpy(), average="macro"))
    predicted = logits > 0
    overlap = int((predicted & (y > 0.5)).sum())
    return "dice", 2 * overlap / (int(predicted.sum()) + int((y > 0.5).sum()))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sample: Sample) -> None:
    """Adam with a cosine schedule over minibatches drawn in a seeded order."""
    generator = torch.Generator().manual_seed(SEED)
    optimiser = torch.optim.Adam(model.parameters(), lr=sample.lr)
    steps = sample.epochs * math.ceil(len(x) / sample.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps)
    loss_fn = loss_for(y)
    model.train()
    for _ in range(sample.epochs):
        order = torch.randperm(len(x), generator=generator)
        for batch in order.split(sample.batch_size):
            loss = loss_fn(model(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()


def preprocessing_of(sample: Sample, data: dict[str, Any]) -> Preprocessing:
    """How the sample's inputs are made from [0, 1] pixels: the standardisation of its data."""
    stats = data["nuclei" if sample.data == "nuclei" else "digits"]
    size = NUCLEI_SIZE if sample.data == "nuclei" else DIGITS_SIZE
    return Preprocessing((stats["mean"],), (stats["std"],), channels=1, size=(size, size))


def make_model(sample: Sample, data: dict[str, Any]) -> dict[str, Any]:
    """Train one sample and write its files; returns its metrics.json entry."""
    started = time.perf_counter()
    (x_train, y_train), (x_val, y_val) = load_pair(sample.data)
    # Seeding per model keeps each model's weights independent of the order they are made in.
    torch.manual_seed(SEED)
    model = create_model(sample.factory, **sample.kwargs)
    train(model, x_train, y_train, sample)
    metric, value = evaluate(model, x_val, y_val)

    state = model.state_dict()
    files = [f"{sample.name}.pt", f"{sample.name}.safetensors"]
    torch.save(state, OUT / files[0])
    arch = ArchSpec(factory=f"explainfix_cli.zoo:{sample.factory}", kwargs=sample.kwargs)
    save_model(model, OUT / files[1], arch=arch, preprocessing=preprocessing_of(sample, data), force=True)
    if sample.name == "resnet":
        files.append("resnet_wrapped.pt")
        torch.save({"state_dict": state, "epoch": sample.epochs}, OUT / files[-1])
    if sample.name == "vgg":
        files.append("vgg_module.pt")
        torch.save(model, OUT / files[-1])

    log(f"{sample.name}: {metric} {value:.4f} in {time.perf_counter() - started:.1f} s")
    return {
        "factory": arch.factory,
        "kwargs": sample.kwargs,
        "params": sum(p.numel() for p in model.parameters()),
        "data": f"{sample.data}_val.npz",
        "metric": metric,
        "value": value,
        "epochs": sample.epochs,
        "files": files,
    }


def markdown_table(models: dict[str, dict[str, Any]]) -> str:
    rows = [
        "| model | factory | kwargs | params | held-out data | metric | value |",
        "| --- | --- | --- | ---: | --- | --- | ---: |",
    ]
    for name, m in models.items():
        kwargs = json.dumps(m["kwargs"])
        rows.append(
            f"| {name} | `{m['factory']}` | `{kwargs}` | {m['params']:,} | {m['data']} "
            f"| {m['metric']} | {m['value']:.4f} |"
        )
    return "\n".join(rows)


def rewrite_metadata(sample: Sample, data: dict[str, Any]) -> None:
    """Record the preprocessing in an existing `NAME.safetensors`, leaving its tensors as they are."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = OUT / f"{sample.name}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[FORMAT])
    meta["preprocessing"] = preprocessing_of(sample, data).to_json()
    save_file(load_file(str(path)), str(path), metadata={FORMAT: json.dumps(meta, sort_keys=True)})
    log(f"{path.name}: metadata rewritten")


def main() -> None:
    """Everything, or with sample names as arguments only those models (the data and the other
    models' entries in metrics.json stay as they are), or with --metadata-only the metadata."""
    if sys.argv[1:] == ["--metadata-only"]:
        data = json.loads((OUT / "metrics.json").read_text())["data"]
        for sample in SAMPLES:
            rewrite_metadata(sample, data)
        for split in ("train", "val"):
            path = OUT / f"digits_multilabel_{split}.npz"
            with np.load(path) as arrays:
                save_npz(path, x=arrays["x"], y=arrays["y"], classes=np.array(list(ATTRIBUTES)))
        return
    started = time.perf_counter()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    only = set(sys.argv[1:])
    unknown = only - {sample.name for sample in SAMPLES}
    if unknown:
        sys.exit(f"unknown sample(s) {sorted(unknown)}; choose from {[sample.name for sample in SAMPLES]}")
    if only:
        previous = json.loads((OUT / "metrics.json").read_text())
        data, made = previous["data"], previous["models"]
    else:
        data, made = {"digits": make_digits(), "nuclei": make_nuclei()}, {}
        log("data written")
    models = {sample.name: make_model(sample, data) if not only or sample.name in only else made[sample.name] for sample in SAMPLES}
    metrics = {"seed": SEED, "torch": torch.__version__, "data": data, "models": models}
    (OUT / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(markdown_table(models))
    log(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
