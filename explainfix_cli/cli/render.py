"""What the command line shows: rich tables for people on stdout, exactly one JSON object with
--json (non-finite numbers as null, numbers.strict), progress bars and talk on stderr, and the
verdict of the CI gates of evaluate and bench (docs/cli.md)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer

from explainfix_cli.numbers import finite, strict


def stderr_console():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(stderr=True)


def stdout_console():  # type: ignore[no-untyped-def]
    """Results a person asked for (tables) go to stdout, so `explainfix info m > info.txt` works."""
    from rich.console import Console

    return Console()



def emit(as_json: bool, payload: dict[str, Any], render: Callable[[], None]) -> None:
    if as_json:
        sys.stdout.write(json.dumps(strict(payload), allow_nan=False) + "\n")
    else:
        render()


class Bars:
    """The library's stages (progress.py) as rich progress bars on stderr, one per open stage."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.bars = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=stderr_console(), transient=True)
        self.open: list[Any] = []

    def start(self, stage: str, total: int | None) -> None:
        self.open.append(self.bars.add_task(stage, total=total))

    def advance(self, steps: int) -> None:
        if self.open:
            self.bars.advance(self.open[-1], steps)

    def finish(self) -> None:
        self.bars.remove_task(self.open.pop())


@contextmanager
def working(message: str) -> Iterator[None]:
    """Progress bars on stderr, only for a person at a terminal: piped output stays clean."""
    if not sys.stderr.isatty():
        yield
        return
    from explainfix_cli import progress

    bars = Bars()
    with bars.bars, progress.reporting(bars), progress.stage(message):
        yield



# ---- rendering for people ----------------------------------------------------------------------
BLOCKED_IN_WORDS = {
    "reaches the model output": "they reach the model's output",
    "normalisation across channels": "a LayerNorm/GroupNorm mixes their channels",
    "channel shuffle of several groups": "a channel shuffle interleaves them with other groups",
    "grouped transposed convolution": "a grouped transposed convolution reads them",
    "no layer reads it": "no layer reads them",
}
METRIC_DROP_WARNING = 0.02  # a fall larger than this in the metric gets a sentence and a way out


def number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def rounded(value: Any) -> str:
    """A value for a person: integers with thousands separators, floats to 4 significant digits
    (`--json` keeps full precision), undefined numbers as n/a."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return "n/a" if finite(value) is None else f"{value:.4g}"


def render_prune(r: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"prune → {r['out']}", title_justify="left")
    for column in ("", "before", "after", "change"):
        table.add_column(column, justify="left" if not column else "right")
    for label, key in (("parameters", "params"), ("MACs per sample", "macs"), ("spatial kernels", "spatial_kernels")):
        before, after = r[f"{key}_before"], r[f"{key}_after"]
        table.add_row(label, f"{before:,}", f"{after:,}", f"{(after - before) / before:+.1%}" if before else "")
    for label, prefix in ((r["metric"], ""), (f"{r['metric']} on --val", "val_")):
        if r["metric"] and r.get(f"{prefix}metric_before") is not None:
            before, after = r[f"{prefix}metric_before"], r[f"{prefix}metric_after"]
            change = "" if before is None or after is None else f"{after - before:+.3f}"
            table.add_row(label, number(before), number(after), change)
    out = stdout_console()
    out.print(table)
    zeroed = f"{r['zeroed_kernels']:,} of {r['spatial_kernels_before']:,} spatial kernels zeroed ({r['pct']:g} %, {r['criterion']} saliency)"
    removed = f"{r['channels_removed']:,} channels removed ({r['channels_folded']:,} folded into biases), --removal {r['removal']}"
    out.print(f"{zeroed}; {removed}.")
    if r["max_logit_change"] is not None:
        change = f"largest output change from removal: {r['max_logit_change']:.2g} on {r['removal_check_samples']:,} samples"
        if r.get("val_max_logit_change") is not None:
            change += f", {r['val_max_logit_change']:.2g} on {r['val_removal_check_samples']:,} held-out samples"
        out.print(change + ".")
    for reason, count in r["blocked_groups"].items():
        out.print(f"{count:,} channel group{'s' if count != 1 else ''} kept whole: {BLOCKED_IN_WORDS.get(reason, reason)}.")
    before, after = r.get("metric_before"), r.get("metric_after")
    if before is not None and after is not None and before - after > METRIC_DROP_WARNING:
        print(
            f"explainfix: {r['metric']} fell from {before:.3f} to {after:.3f}: train the remaining parameters to recover it "
            f"(explainfix finetune {r['out']} --data TRAIN --val VAL --teacher ORIGINAL --out TUNED).",
            file=sys.stderr,
        )



def key_value_table(title: str, rows: list[tuple[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in rows:
        table.add_row(key, rounded(value))
    stdout_console().print(table)


def gate_verdict(gates: list[Any]) -> None:
    """One verdict line per gate on stderr, passed or failed, with --json too (after the results
    were printed); exit 1 when a gate failed."""
    for g in gates:
        print(f"explainfix: gate {g.name} {'passed' if g.passed else 'failed'}: {g.sentence}", file=sys.stderr)
    if any(not g.passed for g in gates):
        raise typer.Exit(1)


def side_by_side(title: str, names: list[str], rows: list[tuple[str, list[Any]]]) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in ["", *names]:
        table.add_column(col, justify="right" if col else "left")
    for label, values in rows:
        table.add_row(label, *("-" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.4g}" if isinstance(v, float) else str(v) for v in values))
    stdout_console().print(table)


def render_target(payload: dict[str, Any]) -> None:
    """The prune summary, then which pct the target chose and how it was found (--json lists every probe)."""
    render_prune(payload)
    limits = ", ".join(f"--{k.replace('_', '-')} {v:,}" for k, v in payload["target"].items() if v is not None)
    kinds = [p["model"] for p in payload["probes"]]
    found = f"{kinds.count('zeroed')} pcts scanned on the zeroed model, {kinds.count('pruned')} pruned"
    if payload["finetune"] is not None:
        tuned = payload["finetune"]
        found += (
            f", {kinds.count('adapted')} pruned and fine-tuned; the written model was fine-tuned {tuned['epochs']} epochs "
            f"({payload['metric']} on the data {tuned['metric_before']:.4f} → {tuned['metric_after']:.4f})"
        )
    stdout_console().print(f"pct {payload['pct_chosen']:g} meets {limits}{' after fine-tuning' if payload['finetune'] else ''}: {found}.")
    if payload.get("check_samples") is not None:
        before, after = payload["check_metric_before"], payload["check_metric_after"]
        stdout_console().print(
            f"the drop checked on {payload['check_samples']} samples kept out of scoring and ranking: {payload['metric']} {before:.4f} → {after:.4f} "
            f"(drop {payload['check_drop']:+.4f}; on the {payload['calibration_samples']} that chose: {payload['metric_before'] - payload['metric_after']:+.4f})."
        )
    for sentence in (payload.get("note"), payload.get("check_note")):
        if sentence:
            print(f"explainfix: {sentence}", file=sys.stderr)


def columns_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*row)
    stdout_console().print(table)
