"""Data sources that stream (docs/cli.md "Data in"): image lists, images with masks, memory-mapped
tensor files, DataLoader workers, augmentation, and bad entries named in one sentence."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import committed_sample
from PIL import Image

from explainfix_cli.errors import UserError
from explainfix_cli.evaluation.scores import evaluate_model
from explainfix_cli.io import data as data_module
from explainfix_cli.io.checkpoints import open_model
from explainfix_cli.io.data import Dataset, Rows, load_data
from explainfix_cli.io.preprocessing import Preprocessing

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"



def _folder(root: Path, n: int = 6, size: int = 8) -> Path:
    """Two classes of RGB images whose pixels tell the image apart (red = 10 * index)."""
    for k in range(n):
        cls = root / ("a" if k % 2 == 0 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        pixels = np.zeros((size, size, 3), np.uint8)
        pixels[..., 0] = 10 * k % 250
        pixels[:, : size // 2, 1] = 200  # the left half green: a flip shows
        Image.fromarray(pixels).save(cls / f"{k}.png")
    return root


# ---- lists --------------------------------------------------------------------------------------
def test_csv_list_scores_what_the_folder_scores(tmp_path: Path) -> None:
    root = committed_sample("digits_images")
    loaded = open_model(committed_sample("resnet.safetensors"))
    folder = load_data(root, preprocessing=loaded.preprocessing, batch_size=32)
    listing = tmp_path / "list.csv"
    files = sorted(root.glob("*/*.png"))[::-1]  # another order: the score does not depend on it
    with listing.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows([[os.path.relpath(p, tmp_path), p.parent.name] for p in files])
    listed = load_data(listing, preprocessing=loaded.preprocessing, batch_size=32)
    assert listed.num_samples == folder.num_samples == 100 and torch.equal(listed.y.sort().values, folder.y.sort().values)
    a, b = asdict(evaluate_model(loaded.model, folder)), asdict(evaluate_model(loaded.model, listed))
    assert a["value"] == b["value"] and a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert a["per_class_accuracy"] == b["per_class_accuracy"]


def test_jsonl_list_with_integer_labels(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs")
    listing = tmp_path / "list.jsonl"
    listing.write_text("".join(json.dumps({"image": f"imgs/{c}/{k}.png", "label": k % 3}) + "\n" for k in range(6) for c in "ab" if (root / c / f"{k}.png").exists()))
    data = load_data(listing, batch_size=4)
    assert data.target_kind == "labels" and data.y.tolist() == [0, 1, 2, 0, 1, 2] and data.classes is None
    x, _ = next(iter(data))
    assert x.shape == (4, 3, 8, 8) and torch.allclose(x[:, 0, 0, 0], torch.tensor([0.0, 10, 20, 30]) / 255)


def _chexpert(tmp_path: Path) -> Path:
    _folder(tmp_path / "imgs", n=3)
    listing = tmp_path / "train.csv"
    listing.write_text(
        "Path,Sex,Age,Edema,Effusion\n"
        "imgs/a/0.png,Female,61,1.0,-1.0\n"
        "imgs/b/1.png,Male,45,,0.0\n"
        "imgs/a/2.png,Male,70,-1.0,1\n"
    )
    return listing


def test_multilabel_list_uncertain_and_missing(tmp_path: Path) -> None:
    listing = _chexpert(tmp_path)
    zeros = load_data(listing)
    assert zeros.target_kind == "multilabel" and zeros.classes == ["Edema", "Effusion"]  # Sex and Age are no labels
    assert zeros.y.tolist() == [[1, 0], [0, 0], [0, 1]]  # U-Zeros; empty -> 0
    assert load_data(listing, uncertain="ones").y.tolist() == [[1, 1], [0, 0], [1, 1]]
    with pytest.raises(UserError, match="zeros or ones"):
        load_data(listing, uncertain="maybe")


# ---- images with masks --------------------------------------------------------------------------
def _nuclei_folder(root: Path, pre: Preprocessing, n: int = 40) -> tuple[Path, np.ndarray]:
    """The first `n` val samples as 8-bit PNGs (pixels un-normalised the model's way) and masks."""
    arrays = np.load(committed_sample("nuclei_val.npz"))
    x, y = arrays["x"][:n], arrays["y"][:n]
    pixels = np.clip(np.round((x * pre.std[0] + pre.mean[0]) * 255), 0, 255).astype(np.uint8)  # (n, 1, H, W)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k in range(n):
        Image.fromarray(pixels[k, 0]).save(root / "images" / f"{k:03d}.png")
        Image.fromarray((y[k, 0] * 255).astype(np.uint8)).save(root / "masks" / f"{k:03d}.png")
    return root, pixels


def test_images_and_masks_evaluate_the_unet(tmp_path: Path) -> None:
    loaded = open_model(committed_sample("unet.safetensors"))
    pre = loaded.preprocessing
    assert pre is not None
    root, pixels = _nuclei_folder(tmp_path / "nuclei", pre)
    folder = load_data(root, preprocessing=pre, batch_size=16)
    assert folder.target_kind == "mask" and folder.x.shape == (40, 1, 32, 32) and folder.y.shape == (40, 1, 32, 32)
    x = (torch.from_numpy(pixels.astype(np.float32) / 255.0) - pre.mean[0]) / pre.std[0]
    y = torch.from_numpy(np.load(committed_sample("nuclei_val.npz"))["y"][:40])
    a = asdict(evaluate_model(loaded.model, folder))
    b = asdict(evaluate_model(loaded.model, Dataset(x, y, batch_size=16)))
    assert a["value"] == b["value"] and a["value"] > 0.5  # the U-Net finds the nuclei on the PNGs too
    assert folder.preprocessing == Preprocessing(pre.mean, pre.std, 1, (32, 32))


def test_mask_transform_follows_its_image(tmp_path: Path) -> None:
    root = tmp_path / "seg"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    g = np.random.default_rng(0)
    for k in range(4):
        mask = g.random((16, 16)) > 0.5
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(root / "images" / f"{k}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{k}.png")  # 0/1 values
    data = load_data(root, grayscale=True, batch_size=4, augment="standard")
    plain_x, plain_y = next(iter(data))
    assert torch.equal(plain_x > 0.5, plain_y > 0.5)
    _, x, y = next(data.shuffled(torch.arange(4), seed=3))
    assert not torch.equal(x, plain_x)  # cropped or flipped
    # nearest-neighbour mask and bilinear image agree wherever the image is still pure black or white
    pure = (x < 0.02) | (x > 0.98)
    assert torch.equal((x > 0.5)[pure], (y > 0.5)[pure])


# ---- bad entries --------------------------------------------------------------------------------
def test_bad_entries_are_named(tmp_path: Path) -> None:
    _folder(tmp_path / "imgs", n=2)
    missing = tmp_path / "missing.csv"
    missing.write_text("path,label\nimgs/a/0.png,0\nimgs/a/9.png,1\n")
    with pytest.raises(UserError, match=r"row 2 of .*missing\.csv: image 'imgs/a/9\.png' does not exist"):
        load_data(missing)
    (tmp_path / "imgs" / "a" / "bad.png").write_bytes(b"not a png")
    unreadable = tmp_path / "unreadable.csv"
    unreadable.write_text("path,label\nimgs/a/0.png,0\nimgs/a/bad.png,1\n")
    with pytest.raises(UserError, match=r"bad\.png is not a readable image"):
        list(load_data(unreadable))
    out_of_range = tmp_path / "range.csv"
    out_of_range.write_text("path,label\nimgs/a/0.png,0\nimgs/b/1.png,5\n")
    data = load_data(out_of_range)
    with pytest.raises(UserError, match=r"class label 5 \(row 2 of .*range\.csv \(imgs/b/1\.png\)\) but the model has only 3 outputs"):
        data.targets(torch.zeros(2, 3), data.y)
    negative = tmp_path / "negative.csv"
    negative.write_text("path,label\nimgs/a/0.png,-1\n")
    with pytest.raises(UserError, match=r"row 1 of .*class label -1"):
        load_data(negative)


def test_bad_masks_are_named(tmp_path: Path) -> None:
    root = tmp_path / "seg"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.new("L", (8, 8)).save(root / "images" / "a.png")
    Image.new("L", (8, 8)).save(root / "images" / "b.png")
    Image.new("L", (8, 8)).save(root / "masks" / "a.png")
    with pytest.raises(UserError, match=r"image b\.png has no mask"):
        load_data(root)
    Image.new("L", (6, 8)).save(root / "masks" / "b.png")
    with pytest.raises(UserError, match=r"mask .*b\.png is 6x8 but its image b\.png is 8x8"):
        list(load_data(root, image_size=4))  # resizing does not hide it


# ---- streaming ----------------------------------------------------------------------------------
def test_workers_stream_what_one_process_reads(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", n=10)
    one = load_data(root, batch_size=3, workers=0)
    two = load_data(root, batch_size=3, workers=2)
    for (xa, ya), (xb, yb) in zip(one, two, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    one.augment = two.augment = "light"
    for (ba, xa, _), (bb, xb, _) in zip(one.shuffled(order, seed=5), two.shuffled(order, seed=5), strict=True):
        assert torch.equal(ba, bb) and torch.equal(xa, xb)  # each sample draws its own augmentation
    (root / "b" / "zz.png").write_bytes(b"broken")
    with pytest.raises(UserError, match=r"^\S*zz\.png is not a readable image \(.*\)\.$"):  # one sentence from a worker
        list(load_data(root, batch_size=3, workers=2))


def test_memory_follows_the_batches_not_the_samples(tmp_path: Path) -> None:
    decoded = []
    for n in (8, 40):
        data = load_data(_folder(tmp_path / f"n{n}", n=n), batch_size=4, batches=2, workers=0)
        assert isinstance(data.x, Rows) and data.x.shape == (n, 3, 8, 8)  # known without reading
        assert data.source.decoded == 0
        seen = []
        for _ in data:
            seen.append(data.source.decoded)
        decoded.append(seen)
    assert decoded == [[4, 8], [4, 8]]  # one minibatch at a time, and only the two asked for


def test_a_worker_builds_its_minibatches_in_shared_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a minibatch stacked in the worker's private memory is copied again to reach the main process,
    # and the freed copies held one worker at 400 MB on a 128x128 folder (16 MB for PyTorch's collate)
    from explainfix_cli.io.sources.arrays import ArraySource

    folder = load_data(_folder(tmp_path / "imgs", n=6), batch_size=3).source
    x = np.random.default_rng(0).standard_normal((6, 1, 4, 4)).astype(np.float64)  # converted to float32 on the way
    arrays = ArraySource(x, np.arange(6))
    for source in (folder, arrays):
        alone = source.fetch(range(0, 3), None, "none")
        assert not alone[0].is_shared()
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # as in a worker
        inside = source.fetch(range(0, 3), None, "none")
        monkeypatch.undo()
        assert inside[0].is_shared() and inside[0].dtype == torch.float32
        assert torch.equal(inside[0], alone[0]) and torch.equal(inside[1], alone[1])


_HEAP = """
import ctypes
from explainfix_cli.io.heap import give_back_free_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])
size = 8 << 20
a = libc.malloc(size); ctypes.memset(a, 1, size); libc.free(a)  # a mapped block freed: glibc raises its threshold to it
before = rss()
b = libc.malloc(size); ctypes.memset(b, 1, size)  # so this one comes from the heap
pin = libc.malloc(1024)  # above it
libc.free(b)
held = rss() - before
assert give_back_free_memory()
print(held, rss() - before)
"""


@pytest.mark.skipif(os.uname().sysname != "Linux", reason="glibc's heap")
def test_memory_freed_between_minibatches_goes_back_to_the_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # io.heap: glibc holds a freed 8 MB block in its heap (evaluate held 881 MB after 8,192
    # images, 416 MB after 256); streaming gives the free pages back before each minibatch
    import subprocess
    import sys

    held, after = map(int, subprocess.run([sys.executable, "-c", _HEAP], capture_output=True, text=True, check=True).stdout.split())
    assert held >= 7 * 1024 and after < 1024  # KB: held by the heap, then returned
    calls = []
    monkeypatch.setattr(data_module, "give_back_free_memory", lambda: calls.append(1))
    assert len(list(load_data(_folder(tmp_path / "imgs", n=6), batch_size=2, workers=0))) == 3
    assert len(calls) == 3  # once per minibatch


def test_tensor_files_are_memory_mapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.numpy import save_file

    monkeypatch.setattr(data_module, "MAP_BYTES", 0)
    x = np.random.default_rng(0).standard_normal((10, 1, 4, 4)).astype(np.float32)
    y = (x > 0).astype(np.float32)  # masks: mapped too
    np.savez(tmp_path / "d.npz", x=x, y=y)
    save_file({"x": x, "y": np.arange(10)}, str(tmp_path / "d.safetensors"))
    for name, target in (("d.npz", y), ("d.safetensors", np.arange(10))):
        data = load_data(tmp_path / name, batch_size=4)
        assert isinstance(data.source.x, np.memmap) and isinstance(data.x, Rows)
        got = list(data)
        assert torch.equal(torch.cat([g[0] for g in got]), torch.from_numpy(x))
        assert torch.equal(torch.cat([g[1] for g in got]).to(torch.float64), torch.from_numpy(target).to(torch.float64))
    x[7, 0, 1, 1] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(10))
    monkeypatch.setattr("explainfix_cli.io.sources.arrays.CHECK_WHOLE_BYTES", 0)  # too large to check at once
    data = load_data(tmp_path / "nan.npz", batch_size=4, batches=1)
    assert len(list(data)) == 1  # the first minibatch is fine, and only it is read
    with pytest.raises(UserError, match=r"NaN or infinite values \(sample 7\)"):
        list(load_data(tmp_path / "nan.npz", batch_size=4))


def test_grey_images_for_a_one_channel_model(tmp_path: Path) -> None:
    from explainfix_cli.io.data import input_channels

    root = _folder(tmp_path / "imgs", n=2)
    assert input_channels(open_model(committed_sample("resnet.safetensors")).model) == 1
    data = load_data(root, channels=1)
    assert data.x.shape[1] == 1 and data.preprocessing == Preprocessing((0.0,), (1.0,), 1, (8, 8))
    assert load_data(root, channels=3).x.shape[1] == 3
    with pytest.raises(UserError, match="--grayscale reads one channel but the model's first convolution takes 3"):
        load_data(root, grayscale=True, channels=3)


def test_images_and_masks_finetune_the_unet_with_augmentation(tmp_path: Path) -> None:
    from explainfix_cli.training.finetune import Recipe, finetune_file

    loaded = open_model(committed_sample("unet.safetensors"))
    pre = loaded.preprocessing
    assert pre is not None
    root, _ = _nuclei_folder(tmp_path / "nuclei", pre, n=24)
    train = load_data(root, preprocessing=pre, batch_size=8, augment="light")
    val = load_data(root, preprocessing=pre, batch_size=8)
    report = finetune_file(loaded, train, val, tmp_path / "tuned.safetensors", recipe=Recipe(epochs=1, lr=1e-3))
    assert report.epochs == 1 and report.metric == "dice" and report.history[0].loss > 0
    assert report.metric_after is not None and report.metric_before is not None and report.metric_after >= report.metric_before
    assert train.source.decoded == 24 + 2 * 2  # one augmented epoch, plus x[:2] and y[:2] that check the fit
    assert open_model(tmp_path / "tuned.safetensors").preprocessing == Preprocessing(pre.mean, pre.std, 1, (32, 32))


# ---- the command line ---------------------------------------------------------------------------
def test_cli_reads_grey_images_as_the_state_dicts_first_convolution_takes_them(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from explainfix_cli.cli.app import app

    def run(*args: str) -> dict:
        result = CliRunner().invoke(app, [*args, "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    root = str(committed_sample("digits_images"))
    state_dict = run("evaluate", str(committed_sample("resnet.pt")), "--arch", "explainfix_cli.zoo:resnet", "--data", root, "--workers", "2")
    raw = run("evaluate", str(committed_sample("resnet.safetensors")), "--data", root, "--mean", "0", "--std", "1")  # the same weights, [0, 1] pixels
    assert state_dict["model"]["value"] == raw["model"]["value"] and state_dict["model"]["samples"] == 100
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\n" + "".join(f"{os.path.relpath(p, tmp_path)},{p.parent.name}\n" for p in sorted(Path(root).glob("*/*.png"))))
    listed = run("evaluate", str(committed_sample("resnet.safetensors")), "--data", str(listing), "--mean", "0", "--std", "1")
    assert listed["model"]["value"] == raw["model"]["value"]
    bad = CliRunner().invoke(app, ["finetune", str(committed_sample("resnet.safetensors")), "--data", root, "--val", root, "--augment", "heavy", "--out", str(tmp_path / "f.safetensors")])
    assert bad.exit_code == 2 and "--augment must be one of none, light, standard" in bad.stderr
    assert not (tmp_path / "f.safetensors").exists()
