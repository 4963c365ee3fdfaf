"""Model formats are told by content, not by name (docs/cli.md, "Models in")."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from helpers import SAMPLES

from explainfix_cli.errors import UserError
from explainfix_cli.io.checkpoints import ArchSpec, open_model
from explainfix_cli.io.formats import sniff

RESNET = ArchSpec("explainfix_cli.zoo:resnet", {"num_classes": 10, "in_channels": 1})


def test_random_bytes_named_onnx_are_unrecognised_not_a_pickle(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(bytes(range(7, 250)) * 4)
    with pytest.raises(UserError, match="unrecognised model format") as e:
        open_model(path, trust_checkpoint=True)
    assert "pickle" not in str(e.value)


def test_a_safetensors_file_cut_short_says_so(tmp_path: Path) -> None:
    """An interrupted copy: the first 1,000 bytes of the sample, whose JSON header alone is longer."""
    whole = (SAMPLES / "resnet.safetensors").read_bytes()
    header = 8 + int.from_bytes(whole[:8], "little")
    path = tmp_path / "resnet.safetensors"
    path.write_bytes(whole[:1000])
    with pytest.raises(UserError, match=f"ends early: its header alone needs {header:,} bytes and the file has 1,000"):
        open_model(path)
    path.write_bytes(whole[: len(whole) - 100])  # the header whole, the tensors cut: the reader says so
    with pytest.raises(UserError, match="not a readable safetensors file"):
        open_model(path)


def test_an_onnx_header_is_named(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    # ir_version 8, then producer_name "pytorch": how every ONNX export begins
    path.write_bytes(b"\x08\x08\x12\x07pytorch\x1a\x052.1.0" + bytes(64))
    with pytest.raises(UserError, match="is an ONNX model"):
        open_model(path)


def test_files_load_whatever_their_names(tmp_path: Path) -> None:
    weights = tmp_path / "weights.bin"  # safetensors written by explainfix, named otherwise
    shutil.copy(SAMPLES / "resnet.safetensors", weights)
    reference = open_model(SAMPLES / "resnet.safetensors").model
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(open_model(weights).model(x), reference(x))
    state_dict = tmp_path / "resnet.safetensors"  # a torch.save state dict named .safetensors
    shutil.copy(SAMPLES / "resnet.pt", state_dict)
    assert torch.equal(open_model(state_dict, RESNET).model(x), reference(x))
    assert sniff(weights) == "safetensors" and sniff(state_dict) == "torch-zip"


def test_only_a_real_pickle_gets_the_pickle_message(tmp_path: Path) -> None:
    legacy = tmp_path / "model.ckpt"
    torch.save(torch.nn.Conv2d(1, 2, 3), legacy, _use_new_zipfile_serialization=False)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(torch.nn.Conv2d(1, 2, 3), protocol=4))
    assert sniff(legacy) == sniff(raw) == "pickle"
    with pytest.raises(UserError, match="pickled Python object"):
        open_model(legacy)


def test_exported_program_is_recognised_by_content(tmp_path: Path) -> None:
    program = torch.export.export(torch.nn.Conv2d(1, 2, 3).eval(), (torch.zeros(1, 1, 8, 8),))
    path = tmp_path / "program.bin"
    torch.export.save(program, str(path))
    assert sniff(path) == "torch-export"
    assert open_model(path).model(torch.zeros(1, 1, 8, 8)).shape == (1, 2, 6, 6)
