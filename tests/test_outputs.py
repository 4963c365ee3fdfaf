"""Writing outputs (docs/cli.md, "Outputs"): atomic, never deleting what explainfix did not write,
files with the user's umask."""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import SAMPLES
from torch import nn
from typer.testing import CliRunner, Result

from explainfix_cli.cli.app import app
from explainfix_cli.errors import UserError
from explainfix_cli.io.checkpoints import load_model, save_model
from explainfix_cli.io.outputs import atomic_dir, atomic_file


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_file_leaves_nothing_when_the_write_fails(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_file(target, force=False) as tmp:
        tmp.write_bytes(b"half a file")
        raise RuntimeError("disk on fire")
    assert _names(tmp_path) == []


def test_atomic_file_keeps_the_old_file_when_a_forced_write_fails(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(target, force=True) as tmp:
        tmp.write_bytes(b"new but broken")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["out.bin"]


def test_atomic_file_refuses_existing_without_force(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(UserError, match="`force`"), atomic_file(target, force=False):
        pass
    assert target.read_bytes() == b"old"
    with atomic_file(target, force=True) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert _names(tmp_path) == ["out.bin"]


def test_atomic_file_refuses_a_folder_even_with_force(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "canary.txt").write_text("keep me")
    with pytest.raises(UserError, match="is a folder"), atomic_file(tmp_path / "results", force=True) as tmp:
        tmp.write_bytes(b"x")
    assert (tmp_path / "results" / "canary.txt").read_text() == "keep me"
    assert _names(tmp_path) == ["results"]


def test_atomic_file_refuses_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"), atomic_file(tmp_path / "no" / "out.bin", force=False):
        pass


def test_atomic_dir_leaves_nothing_when_the_write_fails(tmp_path: Path) -> None:
    target = tmp_path / "figures"
    with pytest.raises(RuntimeError), atomic_dir(target, force=False) as tmp:
        (tmp / "a.png").write_bytes(b"png")
        raise RuntimeError("interrupted")
    assert _names(tmp_path) == []


def test_atomic_dir_writes_into_a_folder_and_replaces_only_its_own_files(tmp_path: Path) -> None:
    target = tmp_path / "report"
    target.mkdir()
    (target / "canary.txt").write_text("keep me")
    (target / "a.png").write_bytes(b"old figure")
    (target / "sub").mkdir()
    (target / "sub" / "mine.txt").write_text("keep me too")
    with pytest.raises(UserError, match="not empty"), atomic_dir(target, force=False):
        pass
    with atomic_dir(target, force=True) as tmp:
        (tmp / "a.png").write_bytes(b"new figure")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
    assert (target / "a.png").read_bytes() == b"new figure"
    assert (target / "canary.txt").read_text() == "keep me"
    assert (target / "sub" / "mine.txt").read_text() == "keep me too"
    assert _names(target / "sub") == ["b.txt", "mine.txt"]
    assert _names(tmp_path) == ["report"]  # the staging folder is gone


def test_atomic_dir_takes_an_empty_folder_without_force(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty", force=False) as tmp:
        (tmp / "a.txt").write_text("a")
    assert _names(tmp_path / "empty") == ["a.txt"]


def test_atomic_dir_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "report").write_text("a file of the user's")
    with pytest.raises(UserError, match="is a file"), atomic_dir(tmp_path / "report", force=True):
        pass
    assert (tmp_path / "report").read_text() == "a file of the user's"


def test_outputs_get_the_umask_mode_and_replaced_files_keep_theirs(tmp_path: Path, umask_022: None) -> None:
    with atomic_file(tmp_path / "out.bin", force=False) as tmp:
        tmp.write_bytes(b"x")
    with atomic_dir(tmp_path / "folder", force=False) as tmp:
        (tmp / "a.txt").write_text("a")
    assert stat.S_IMODE((tmp_path / "out.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "folder" / "a.txt").stat().st_mode) == 0o644
    # safetensors replaces the temporary file it is given: the mode is set after it wrote
    model = nn.Sequential(nn.Conv2d(1, 2, 3))
    out = save_model(model, tmp_path / "m.safetensors", arch=None)
    assert stat.S_IMODE(Path(out).stat().st_mode) == 0o644
    os.chmod(out, 0o640)
    save_model(model, out, arch=None, force=True)
    assert stat.S_IMODE(Path(out).stat().st_mode) == 0o640


# ---- the commands that lost files before ---------------------------------------------------------
@pytest.fixture
def models(tmp_path: Path) -> Path:
    """A user's folder: a model, its data and a file of their own."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(SAMPLES / "resnet.safetensors", folder / "resnet.safetensors")
    shutil.copy(SAMPLES / "digits_val.npz", folder / "digits_val.npz")
    (folder / "canary.txt").write_text("keep me")
    return folder


def test_explain_into_the_models_folder_keeps_everything(models: Path) -> None:
    before = _names(models)
    result = _invoke("explain", models / "resnet.safetensors", "--data", models / "digits_val.npz", "--batches", "1", "--out", models, "--force", "--no-figures")
    assert result.exit_code == 0, result.output
    assert set(before) <= set(_names(models)) and {"spectra.json", "index.html"} <= set(_names(models))
    assert (models / "canary.txt").read_text() == "keep me"
    assert (models / "resnet.safetensors").read_bytes() == (SAMPLES / "resnet.safetensors").read_bytes()


def test_explain_into_the_working_directory_keeps_everything(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(models)
    result = _invoke("explain", "resnet.safetensors", "--out", ".", "--force", "--no-figures")
    assert result.exit_code == 0, result.output
    assert {"canary.txt", "resnet.safetensors", "digits_val.npz", "spectra.json", "index.html"} == set(_names(models))


def test_prune_refuses_a_results_folder_even_with_force(models: Path) -> None:
    results = models / "results"
    results.mkdir()
    (results / "canary.txt").write_text("keep me")
    result = _invoke("prune", models / "resnet.safetensors", "--data", models / "digits_val.npz", "--out", results, "--force")
    assert result.exit_code == 2 and "is a folder" in result.stderr and result.stderr.count("\n") == 1
    assert _names(results) == ["canary.txt"]


def test_prune_in_place_is_atomic_and_keeps_the_mode(models: Path) -> None:
    model = models / "resnet.safetensors"
    os.chmod(model, 0o640)
    result = _invoke("prune", model, "--data", models / "digits_val.npz", "--batches", "1", "--pct", "90", "--out", model, "--force", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert sum(p.numel() for p in load_model(model).parameters()) == report["params_after"] < report["params_before"]
    assert stat.S_IMODE(model.stat().st_mode) == 0o640
    assert _names(models) == ["canary.txt", "digits_val.npz", "resnet.safetensors"]


def test_a_failed_report_never_deletes_through_a_link_in_its_staging_folder(tmp_path: Path) -> None:
    # the staging folder is removed without a recursive delete: a link in it (to the user's
    # folder, to a file) goes, what it points at stays
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "canary.txt").write_text("keep me")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "report", force=False) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.png").write_bytes(b"png")
        (tmp / "to-folder").symlink_to(mine, target_is_directory=True)
        (tmp / "sub" / "to-file").symlink_to(mine / "canary.txt")
        raise RuntimeError("interrupted")
    assert (mine / "canary.txt").read_text() == "keep me"
    assert _names(tmp_path) == ["mine"]

