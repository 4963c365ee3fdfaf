"""The CI pipeline of the README (examples/ci/prune-and-gate.sh) end to end, as a real shell
script: one gate met (the metric), one not (an impossible latency), so the job fails with exit 1
and still leaves every JSON file and the explain report behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_fails_on_the_gate_that_is_not_met(tmp_path: Path) -> None:
    samples = ROOT / "sample_models"
    env = {
        **os.environ, "EXPLAINFIX": str(Path(sys.executable).parent / "explainfix"),
        "PCT": "50", "EPOCHS": "1", "MAX_DROP": "0.5", "MAX_LATENCY_MS": "0.0001", "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    # fine-tuned on the 360 validation digits: a short epoch (the pipeline, not the recipe, is tested)
    args = [samples / "resnet.safetensors", samples / "digits_val.npz", samples / "digits_val.npz", tmp_path / "out"]
    proc = subprocess.run(["bash", ROOT / "examples" / "ci" / "prune-and-gate.sh", *map(str, args)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    out = tmp_path / "out"
    evaluation, bench = (json.loads((out / f"{name}.json").read_text()) for name in ("evaluate", "bench"))
    assert evaluation["passed"] is True and bench["passed"] is False
    assert json.loads((out / "finetune.json").read_text())["out"] == str(out / "model.safetensors")
    assert (out / "report" / "index.html").exists()
    # every verdict shows, the passing one too, each once (README, CI)
    assert proc.stderr.count("explainfix: gate max_drop passed: ") == 1 and proc.stderr.count("explainfix: gate max_latency_ms failed: ") == 1
