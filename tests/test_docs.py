"""The project's own documents (docs/): the method's sections, the contract's commands, and every
citation of them in the code, the tests and the README points at something that exists."""

from __future__ import annotations

import re
from pathlib import Path

from explainfix_cli.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
METHOD, CLI = ROOT / "docs" / "method.md", ROOT / "docs" / "cli.md"
OLD_NAMES = re.compile(r"\b(METHOD|PRODUCT)" + r"(\.md\b| §)")  # the shared documents outside the repository


def _citing_files() -> list[Path]:
    return [*(ROOT / "explainfix_cli").rglob("*.py"), *(ROOT / "tests").glob("*.py"), ROOT / "README.md"]


def test_method_sections_keep_their_numbers() -> None:
    assert re.findall(r"^## §(\d) ", METHOD.read_text(), re.MULTILINE) == ["1", "2", "3", "4", "5", "6"]


def test_every_command_is_in_the_contract() -> None:
    commands = [c.name or c.callback.__name__ for c in app.registered_commands if c.callback is not None]
    text = CLI.read_text()
    assert commands and all(f"### `explainfix {name}" in text for name in commands), commands


def test_every_citation_points_at_a_section_that_exists() -> None:
    sections = set(re.findall(r"^## §(\d) ", METHOD.read_text(), re.MULTILINE))
    headings = re.findall(r"^#+ (.+)$", CLI.read_text(), re.MULTILINE)
    cited = 0
    for file in _citing_files():
        text = file.read_text()
        assert not OLD_NAMES.search(text), f"{file.name} cites a document that is not in the repository"
        for number in re.findall(r"docs/method\.md §(\d)", text):
            assert number in sections, f"{file.name} cites docs/method.md §{number}"
            cited += 1
        for title in re.findall(r'docs/cli\.md "([^"]+)"', text):
            assert any(h.startswith(title) for h in headings), f"{file.name} cites docs/cli.md {title!r}"
    assert cited >= 20  # the code cites the method throughout
