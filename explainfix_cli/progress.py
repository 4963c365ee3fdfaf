"""Progress of long work: the library says which stage it is in and how far; whoever runs it
decides whether to show it (the command line does, with rich, only on a terminal).

Nothing is shown unless a reporter is installed with `reporting`, so library users see nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol


class Reporter(Protocol):
    def start(self, stage: str, total: int | None) -> None: ...

    def advance(self, steps: int) -> None: ...

    def finish(self) -> None: ...


_reporter: ContextVar[Reporter | None] = ContextVar("explainfix_reporter", default=None)


@contextmanager
def reporting(reporter: Reporter) -> Iterator[None]:
    """Show the stages of everything run inside the block on `reporter`."""
    token = _reporter.set(reporter)
    try:
        yield
    finally:
        _reporter.reset(token)


@contextmanager
def stage(name: str, total: int | None = None) -> Iterator[None]:
    """A named stage of work, of `total` steps if known (e.g. minibatches)."""
    reporter = _reporter.get()
    if reporter is None:
        yield
        return
    reporter.start(name, total)
    try:
        yield
    finally:
        reporter.finish()


def advance(steps: int = 1) -> None:
    reporter = _reporter.get()
    if reporter is not None:
        reporter.advance(steps)
