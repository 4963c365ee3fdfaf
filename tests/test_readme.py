"""Every example of the README runs, in order, in a fresh folder with a copy of the samples.

Shell blocks run line by line: `explainfix …` in process (the process boundary is tested in
test_cli.py), anything else in a shell. Skipped: the set-up (`scripts/setup.sh`, which made this
environment), the test command itself, the blocks that need torchvision (benchmarks), and the CI pipeline, which
tests/test_ci_example.py runs end to end.

The quick start's own-model walk trains for real as written (about a minute and a half on 2
cores; the README gives the numbers it measured). Here it runs shortened (FAST: fewer epochs), so
its gate is relaxed to one any model meets: what this test checks is that every command of the
walk runs, on the files the one before wrote.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from explainfix_cli.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SKIPPED = ("torchvision", "-m pytest", "prune-and-gate.sh")  # the CI script has its own test (test_ci_example.py)
FAST = (  # (as written, as run here): the own-model walk, shortened
    ("train.py out/net.pt", "train.py out/net.pt --epochs 2"),
    ("--arch examples/own_model/net.py:Net --out out/net-tuned", "--arch examples/own_model/net.py:Net --epochs 1 --batches 4 --out out/net-tuned"),
    ("--arch examples/own_model/net.py:Net --max-drop 0.02", "--arch examples/own_model/net.py:Net --max-drop 1"),
    ("--data out/test_b.npz --min-metric 0.95", "--data out/test_b.npz --min-metric 0"),
)


def blocks() -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in BLOCK.findall((ROOT / "README.md").read_text()) if not any(s in body for s in SKIPPED)]


def _run(command: str, folder: Path) -> tuple[int, str]:
    """One simple command: `explainfix …` in process, anything else in a shell with the venv on PATH."""
    words = shlex.split(command, comments=True)
    if not words or words[:2] == ["bash", "scripts/setup.sh"]:
        return 0, ""
    if Path(words[0]).name == "explainfix" and not any(op in command for op in ("|", ">", ";", "$")):
        result = CliRunner().invoke(app, words[1:])
        return result.exit_code, result.output
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(command, shell=True, cwd=folder, capture_output=True, text=True, timeout=300, env=env)
    return proc.returncode, proc.stdout + proc.stderr


def _run_line(line: str, folder: Path) -> None:
    """`a && b` runs b after a succeeded; `a || b` (an example of a failing gate) runs b when a fails."""
    for written, fast in FAST:
        line = line.replace(written, fast)
    for command in line.split("&&"):
        alternatives = command.split("||")
        code, output = _run(alternatives[0], folder)
        for fallback in alternatives[1:]:
            if code == 0:
                break
            code, output = _run(fallback.replace("$?", str(code)), folder)
        assert code == 0, f"{line}\n{output}"


def test_readme_examples_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(ROOT / "sample_models", tmp_path / "sample_models", ignore=shutil.ignore_patterns("*.pt", "digits_images"))
    (tmp_path / "sample_models" / "digits_images").symlink_to(ROOT / "sample_models" / "digits_images")
    for name in (p.name for p in (ROOT / "sample_models").glob("*.pt")):
        (tmp_path / "sample_models" / name).symlink_to(ROOT / "sample_models" / name)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    ran = 0
    for lang, body in blocks():
        if lang == "python":
            exec(compile(body, "README.md", "exec"), {})
            ran += 1
            continue
        for line in body.splitlines():
            _run_line(line, tmp_path)
            ran += 1
    assert ran >= 10
    assert {"net.pt", "net-small.safetensors", "net-tuned.safetensors"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert (tmp_path / "out" / "report" / "index.html").is_file()


def test_readme_walk_is_what_the_test_shortens() -> None:
    """FAST rewrites lines that are in the README (a renamed file or option would make it a no-op)."""
    text = (ROOT / "README.md").read_text()
    assert all(text.count(written) == 1 for written, _ in FAST), [w for w, _ in FAST if text.count(w) != 1]
