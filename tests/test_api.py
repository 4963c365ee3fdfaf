"""The Python API: stable names, and no hidden global state."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import sample_data, sample_model

import explainfix_cli


@pytest.mark.parametrize("name", explainfix_cli.__all__)
def test_every_public_name_is_the_same_object_on_every_access(name: str) -> None:
    first = getattr(explainfix_cli, name)
    importlib.import_module("explainfix_cli.explanation.report")  # importing a subpackage must not rebind a name
    assert getattr(explainfix_cli, name) is first
    assert getattr(explainfix_cli, name) is first


def test_library_calls_leave_the_global_rng_alone(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    data = sample_data("mobilenet", batch_size=16, batches=1)
    explainfix_cli.prune(sample_model("mobilenet").model, data, pct=70, fill="fillzero", seed=5, out=tmp_path / "m.safetensors")
    explainfix_cli.explain(sample_model("resnet").model, data, tmp_path / "report", with_figures=False)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_an_untested_torch_pruning_is_refused_at_import(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    from explainfix_cli.pruning import tp_adapter as tp_compat

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.7.0")
    try:
        with pytest.raises(ImportError, match=r"torch-pruning>=1\.6,<1\.7"):
            importlib.reload(tp_compat)
    finally:
        monkeypatch.undo()
        importlib.reload(tp_compat)
