"""Data in (docs/cli.md "Data in"): files and image folders, target kinds, batching, bad data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import committed_sample
from PIL import Image

from explainfix_cli.errors import UserError
from explainfix_cli.io.data import Dataset, load_data
from explainfix_cli.io.preprocessing import Preprocessing, parse_preprocessing

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"



def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _x(n: int, c: int = 1, size: int = 4) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, c, size, size)).astype(np.float32)


# ---- target kinds -------------------------------------------------------------------------------
def test_npz_labels_one_hot(tmp_path: Path) -> None:
    data = load_data(_npz(tmp_path / "d.npz", x=_x(3), y=np.array([2, 0, 1])))
    assert data.target_kind == "labels"
    assert data.metric_name == "accuracy"
    assert data.y.dtype == torch.int64
    output = torch.zeros(3, 4)
    expected = torch.tensor([[0.0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0]])
    assert torch.equal(data.targets(output, data.y), expected)


def test_float_labels_that_are_integers_are_accepted(tmp_path: Path) -> None:
    data = load_data(_npz(tmp_path / "d.npz", x=_x(2), y=np.array([1.0, 0.0])))
    assert data.target_kind == "labels"
    assert data.y.tolist() == [1, 0]
    with pytest.raises(UserError, match="integer class labels"):
        load_data(_npz(tmp_path / "e.npz", x=_x(2), y=np.array([1.5, 0.0])))


def test_sample_digits() -> None:
    data = load_data(committed_sample("digits_val.npz"))
    assert data.x.shape[1:] == (1, 16, 16)
    assert data.target_kind == "labels"
    assert len(data.y) == len(data.x)
    assert set(data.y.tolist()) == set(range(10))


def test_safetensors_data(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    x = _x(5)
    path = tmp_path / "d.safetensors"
    save_file({"x": x, "y": np.array([0, 1, 2, 1, 0], dtype=np.int64)}, str(path))
    data = load_data(path, batch_size=2)
    assert torch.equal(data.x, torch.from_numpy(x))
    assert data.y.tolist() == [0, 1, 2, 1, 0]
    assert data.target_kind == "labels"
    assert len(data) == 3


def test_multilabel_passthrough(tmp_path: Path) -> None:
    y = np.array([[1, 0, 1], [0, 0, 0]], dtype=np.int64)  # integer 0/1 is fine too
    data = load_data(_npz(tmp_path / "d.npz", x=_x(2), y=y))
    assert data.target_kind == "multilabel"
    assert data.metric_name == "auc"
    got = data.targets(torch.zeros(2, 3), data.y)
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.tensor([[1.0, 0, 1], [0, 0, 0]]))
    with pytest.raises(UserError, match=r"\(3,\).*\(4,\)"):
        data.targets(torch.zeros(2, 4), data.y)


def test_sample_multilabel() -> None:
    data = load_data(committed_sample("digits_multilabel_val.npz"))
    assert data.target_kind == "multilabel"
    assert data.y.shape == (len(data.x), 4)


def test_masks_passthrough(tmp_path: Path) -> None:
    y = np.zeros((2, 1, 4, 4), dtype=np.float32)
    y[0, 0, 1:3, 1:3] = 1
    data = load_data(_npz(tmp_path / "d.npz", x=_x(2), y=y))
    assert data.target_kind == "mask"
    assert data.metric_name == "dice"
    got = data.targets(torch.zeros(2, 1, 4, 4), data.y)
    assert torch.equal(got, torch.from_numpy(y))
    assert got.sum() == 4
    with pytest.raises(UserError, match="must match"):
        data.targets(torch.zeros(2, 2, 4, 4), data.y)


def test_sample_nuclei_masks() -> None:
    data = load_data(committed_sample("nuclei_val.npz"))
    assert data.target_kind == "mask"
    assert data.y.shape == data.x.shape[:1] + data.y.shape[1:2] + data.x.shape[2:]


def test_labels_out_of_range_for_the_model(tmp_path: Path) -> None:
    data = load_data(_npz(tmp_path / "d.npz", x=_x(2), y=np.array([0, 7])))
    with pytest.raises(UserError, match=r"label 7.*only 5 outputs"):
        data.targets(torch.zeros(2, 5), data.y)


def test_labels_need_a_two_dimensional_output(tmp_path: Path) -> None:
    data = load_data(_npz(tmp_path / "d.npz", x=_x(2), y=np.array([0, 1])))
    with pytest.raises(UserError, match="class labels"):
        data.targets(torch.zeros(2, 1, 4, 4), data.y)


# ---- batching -----------------------------------------------------------------------------------
def test_batching_order_and_limit() -> None:
    x = torch.arange(7, dtype=torch.float32).reshape(7, 1, 1, 1)
    y = torch.arange(7)
    data = Dataset(x, y, batch_size=3)
    assert len(data) == 3
    assert data.num_samples == 7
    assert [b[1].tolist() for b in data] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [b[0].flatten().tolist() for b in data] == [[0, 1, 2], [3, 4, 5], [6]]
    # the same order every time
    assert [b[1].tolist() for b in data] == [b[1].tolist() for b in data]

    limited = Dataset(x, y, batch_size=3, batches=2)
    assert len(limited) == 2
    assert limited.num_samples == 6
    assert [b[1].tolist() for b in limited] == [[0, 1, 2], [3, 4, 5]]
    assert len(Dataset(x, y, batch_size=3, batches=10)) == 3


def test_load_data_passes_batching(tmp_path: Path) -> None:
    data = load_data(_npz(tmp_path / "d.npz", x=_x(10), y=np.arange(10)), batch_size=4, batches=2)
    assert [b[1].tolist() for b in data] == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize(("batch_size", "batches", "option"), [(0, None, "`batch_size`"), (4, 0, "`batches`")])
def test_bad_batching_options(tmp_path: Path, batch_size: int, batches: int | None, option: str) -> None:
    with pytest.raises(UserError, match=option):
        load_data(_npz(tmp_path / "d.npz", x=_x(2), y=np.arange(2)), batch_size=batch_size, batches=batches)


# ---- image folders ------------------------------------------------------------------------------
def test_sample_image_folder() -> None:
    root = committed_sample("digits_images")
    assert any(root.glob("*/*.png")), "the committed sample folder digits_images holds no images"
    data = load_data(root, grayscale=True, batch_size=16)
    assert data.classes == sorted(p.name for p in root.iterdir() if p.is_dir())
    assert data.x.shape[1:] == (1, 16, 16)
    assert data.x.dtype == torch.float32
    assert float(data.x[:].min()) >= 0 and float(data.x[:].max()) <= 1
    assert data.target_kind == "labels"
    counts = [len(list((root / c).glob("*.png"))) for c in data.classes]
    assert data.y.tolist() == [k for k, n in enumerate(counts) for _ in range(n)]
    rgb = load_data(root)
    assert rgb.x.shape[1] == 3


def _rgb_folder(root: Path) -> Path:
    sizes = {"cat": [(8, 6), (10, 10)], "dog": [(12, 7)]}
    for cls, shapes in sizes.items():
        (root / cls).mkdir(parents=True)
        for k, (w, h) in enumerate(shapes):
            Image.new("RGB", (w, h), color=(255, 0, 51 * k)).save(root / cls / f"{k}.png")
    (root / "dog" / "notes.txt").write_text("not an image, skipped")
    return root


def test_image_folder_of_mixed_sizes(tmp_path: Path) -> None:
    root = _rgb_folder(tmp_path / "images")
    with pytest.raises(UserError, match=r"1\.png is 10x10 but the first image is 8x6; pass `image_size`"):
        list(load_data(root))  # streamed: found when the image is read, as one sentence
    data = load_data(root, image_size=5)
    assert data.x.shape == (3, 3, 5, 5)
    assert data.classes == ["cat", "dog"]
    assert data.y.tolist() == [0, 0, 1]
    assert torch.allclose(data.x[:, 0], torch.ones(3, 5, 5))  # red channel: 255 -> 1.0
    assert torch.allclose(data.x[1, 2], torch.full((5, 5), 51 / 255))
    gray = load_data(root, image_size=5, grayscale=True)
    assert gray.x.shape == (3, 1, 5, 5)


def test_image_folder_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="sub-folders"):
        load_data(empty)
    (empty / "a").mkdir()
    with pytest.raises(UserError, match="no images"):
        load_data(empty)
    (empty / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"broken\.png"):
        list(load_data(empty))


# ---- bad data -----------------------------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_data(tmp_path / "nothing.npz")


def test_missing_x_key(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="'x'"):
        load_data(_npz(tmp_path / "d.npz", images=_x(2), y=np.arange(2)))
    with pytest.raises(UserError, match="'y'"):
        load_data(_npz(tmp_path / "e.npz", x=_x(2), labels=np.arange(2)))


def test_n_mismatch(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="3 samples but y has 2"):
        load_data(_npz(tmp_path / "d.npz", x=_x(3), y=np.arange(2)))


def test_no_samples(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no samples"):
        load_data(_npz(tmp_path / "d.npz", x=_x(0), y=np.zeros(0, dtype=np.int64)))


def test_negative_labels(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=">= 0"):
        load_data(_npz(tmp_path / "d.npz", x=_x(2), y=np.array([0, -1])))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_inputs(tmp_path: Path, bad: float) -> None:
    x = _x(2)
    x[1, 0, 2, 2] = bad
    with pytest.raises(UserError, match="NaN"):
        load_data(_npz(tmp_path / "d.npz", x=x, y=np.arange(2)))


def test_non_float_inputs(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="float"):
        load_data(_npz(tmp_path / "d.npz", x=np.ones((2, 1, 4, 4), dtype=np.uint8), y=np.arange(2)))


def test_wrong_input_rank(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"\(N, C, H, W\)"):
        load_data(_npz(tmp_path / "d.npz", x=np.ones((2, 16, 16), dtype=np.float32), y=np.arange(2)))


def test_wrong_target_rank(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="multi-label"):
        load_data(_npz(tmp_path / "d.npz", x=_x(2), y=np.zeros((2, 1, 4), dtype=np.float32)))


@pytest.mark.parametrize("name", ["d.csv", "d.npz", "d.safetensors"])
def test_unreadable_or_foreign_files(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("x,y\n1,2\n")
    with pytest.raises(UserError, match=name.replace(".", r"\.")):
        load_data(path)


def test_truncated_npz(tmp_path: Path) -> None:
    full = (_npz(tmp_path / "full.npz", x=_x(50, size=8), y=np.arange(50))).read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(full[: len(full) // 2])
    with pytest.raises(UserError, match="not a readable"):
        load_data(cut)


def test_pickled_npz_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=_x(2), y=np.array([{"a": 1}, {"b": 2}], dtype=object))
    with pytest.raises(UserError, match="not a readable"):
        load_data(path)


# ---- preprocessing: a model's own normalisation for image folders ---------------------------------
def test_preprocessing_normalises_each_channel(tmp_path: Path) -> None:
    root = _rgb_folder(tmp_path / "images")
    pre = parse_preprocessing("0.5,0.2,0.1", "0.25,0.5,2")
    data = load_data(root, image_size=5, preprocessing=pre)
    assert torch.allclose(data.x[:, 0], torch.full((3, 5, 5), (1.0 - 0.5) / 0.25))  # red 255
    assert torch.allclose(data.x[:, 1], torch.full((3, 5, 5), (0.0 - 0.2) / 0.5))  # green 0
    assert torch.allclose(data.x[1, 2], torch.full((5, 5), (51 / 255 - 0.1) / 2))  # blue 51
    one = load_data(root, image_size=5, preprocessing=parse_preprocessing("0.5", "0.5"))  # one value, every channel
    assert torch.allclose(one.x[:, 0], torch.ones(3, 5, 5)) and torch.allclose(one.x[:, 1], -torch.ones(3, 5, 5))


def test_preprocessing_sets_colour_mode_and_size_but_not_a_data_files_values(tmp_path: Path) -> None:
    root = _rgb_folder(tmp_path / "images")
    data = load_data(root, preprocessing=Preprocessing((0.0,), (1.0,), channels=1, size=(6, 6)))
    assert data.x.shape == (3, 1, 6, 6)  # grey and resized, as the model was trained
    path = _npz(tmp_path / "d.npz", x=_x(2), y=np.arange(2))
    as_stored = load_data(path, preprocessing=Preprocessing((10.0,), (2.0,)))
    assert torch.equal(as_stored.x, torch.from_numpy(_x(2)))


@pytest.mark.parametrize(
    ("mean", "std", "message"),
    [("0.5", None, "go together"), ("0.5,x", "1", "comma-separated"), ("0.5,0.5", "1", "one value per channel"), ("0", "0", "positive")],
)
def test_bad_preprocessing(mean: str | None, std: str | None, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_preprocessing(mean, std)


def test_preprocessing_of_another_channel_count(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="3 channels"):
        load_data(_rgb_folder(tmp_path / "images"), image_size=5, preprocessing=parse_preprocessing("0,0", "1,1"))


def test_sample_folder_normalised_is_the_npz() -> None:
    """The bundled folder holds val images as 8-bit PNGs: normalised the model's way they are
    digits_val.npz's x up to the 8-bit rounding, 0.5/255/std."""
    from explainfix_cli.io.checkpoints import open_model

    root = committed_sample("digits_images")
    loaded = open_model(committed_sample("resnet.safetensors"))
    assert loaded.preprocessing is not None
    data = load_data(root, preprocessing=loaded.preprocessing)
    val = load_data(committed_sample("digits_val.npz"))
    index = [int(f.stem) for c in data.classes or [] for f in sorted((root / c).iterdir())]  # files are named by val index
    assert data.x.shape == (100, 1, 16, 16)
    assert float((data.x[:] - val.x[index]).abs().max()) <= 0.5 / 255 / loaded.preprocessing.std[0] + 1e-6
    assert torch.equal(data.y, val.y[index])


def test_class_names_of_a_data_file(tmp_path: Path) -> None:
    path = _npz(tmp_path / "d.npz", x=_x(2), y=np.eye(2, 3, dtype=np.float32), classes=np.array(["cat", "dog", "owl"]))
    assert load_data(path).classes == ["cat", "dog", "owl"]
    assert load_data(committed_sample("digits_multilabel_val.npz")).classes == ["even", "at_least_5", "prime", "multiple_of_3"]
    with pytest.raises(UserError, match="class names"):
        load_data(_npz(tmp_path / "e.npz", x=_x(2), y=np.arange(2), classes=np.arange(2)))
    from safetensors.numpy import save_file

    save_file({"x": _x(2), "y": np.eye(2, 3, dtype=np.float32)}, str(tmp_path / "d.safetensors"), metadata={"classes": '["cat", "dog", "owl"]'})
    assert load_data(tmp_path / "d.safetensors").classes == ["cat", "dog", "owl"]
