"""Progress of long work (progress.py): the stages the library reports and how far each got."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import sample_data, sample_model

from explainfix_cli import progress
from explainfix_cli.explanation import explain
from explainfix_cli.pruning.pipeline import prune


class Recorder:
    def __init__(self) -> None:
        self.open: list[list] = []
        self.done: list[tuple[str, int | None, int]] = []  # (stage, total, steps advanced)

    def start(self, stage: str, total: int | None) -> None:
        self.open.append([stage, total, 0])

    def advance(self, steps: int) -> None:
        self.open[-1][2] += steps

    def finish(self) -> None:
        self.done.append(tuple(self.open.pop()))  # type: ignore[arg-type]


def test_prune_and_explain_report_their_stages_and_minibatches(tmp_path: Path) -> None:
    data = sample_data("resnet", batch_size=64, batches=3)
    recorder = Recorder()
    with progress.reporting(recorder):
        prune(sample_model("resnet").model, data, pct=80, out=tmp_path / "p.safetensors")
        result = explain(sample_model("resnet").model, data, tmp_path / "report", attributions=2)
    stages = [stage for stage, _, _ in recorder.done]
    assert stages[:6] == ["saliency", "measuring the original", "zeroing", "removing channels", "measuring the pruned model", "writing"]
    assert ("saliency", 3, 3) in recorder.done  # one step per minibatch
    figures = len(result.figures)
    assert ("drawing figures", figures, figures) in recorder.done and figures >= 5
    assert not recorder.open


def test_nothing_is_reported_without_a_reporter(capsys: pytest.CaptureFixture[str]) -> None:
    """Outside `reporting` nothing reaches a reporter (one installed before is gone again) and
    nothing is printed; the stage still runs its body."""
    recorder = Recorder()
    with progress.reporting(recorder), progress.stage("inside", total=1):
        progress.advance()
    ran = []
    progress.advance()  # no reporter: a no-op, not an error
    with progress.stage("anything", total=3):
        progress.advance(3)
        ran.append(True)
    assert ran == [True]
    assert recorder.done == [("inside", 1, 1)] and recorder.open == []
    assert capsys.readouterr() == ("", "")
