"""Every example of the README runs, in order, in a fresh folder with a copy of the samples.

Shell blocks run line by line: `explainfix …` in process (the process boundary is tested in
test_cli.py), anything else in a shell. Skipped: the set-up (`scripts/setup.sh`, which made this
environment), the test command itself, and the blocks that need torchvision (benchmarks).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from explainfix_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SKIPPED = ("torchvision", "-m pytest")


def blocks() -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in BLOCK.findall((ROOT / "README.md").read_text()) if not any(s in body for s in SKIPPED)]


def _run_line(line: str, folder: Path) -> None:
    for command in line.split("&&"):
        words = shlex.split(command, comments=True)
        if not words or words[:2] == ["bash", "scripts/setup.sh"]:
            continue
        if Path(words[0]).name == "explainfix":
            result = CliRunner().invoke(app, words[1:])
            assert result.exit_code == 0, f"{line}\n{result.output}"
        else:
            proc = subprocess.run(command, shell=True, cwd=folder, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, f"{line}\n{proc.stdout}{proc.stderr}"


def test_readme_examples_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(ROOT / "sample_models", tmp_path / "sample_models", ignore=shutil.ignore_patterns("*.pt", "digits_images"))
    (tmp_path / "sample_models" / "digits_images").symlink_to(ROOT / "sample_models" / "digits_images")
    for name in (p.name for p in (ROOT / "sample_models").glob("*.pt")):
        (tmp_path / "sample_models" / name).symlink_to(ROOT / "sample_models" / name)
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
