"""The `explainfix` command line: options in, one library call, rich tables or JSON out.

Data goes to stdout (one JSON object with --json), talk goes to stderr. Bad input exits 2 with
one sentence, failures inside a correct request exit 1; --debug shows the traceback. torch and
friends are imported inside the commands so that --help and completion answer at once.

This module holds the Typer app, its help formatting and `main`; the options are declared in
cli/options.py, the commands live one group per module (cli/model.py, prune.py, explain.py,
check.py, train.py, classes.py) and are registered here.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from explainfix_cli.cli import check, classes, explain, export, model, prune, train
from explainfix_cli.cli.options import SHARED_OPTIONS
from explainfix_cli.cli.run import Inputs


def _flag_help(option: Any) -> Any:
    if option is not None:
        option.metavar = ""  # a flag: shown without a value
    return option


class _Command(TyperCommand):
    def get_help_option(self, ctx: Any) -> Any:
        return _flag_help(super().get_help_option(ctx))


class _Group(TyperGroup):
    def get_help_option(self, ctx: Any) -> Any:
        return _flag_help(super().get_help_option(ctx))


app = typer.Typer(
    name="explainfix",
    cls=_Group,
    help="Prune a CNN by spatial-filter saliency, fix its spatial filters, and explain its spectra (ExplainFix).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


def _version(value: bool) -> None:
    if value:
        from explainfix_cli import __version__

        print(f"explainfix {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", help="Show the version and exit.", metavar="", callback=_version, is_eager=True)] = False) -> None:
    """Prune a CNN by spatial-filter saliency, fix its spatial filters, and explain its spectra (ExplainFix)."""


def with_shared_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The command Typer sees: `fn`'s own parameters plus the shared options of its groups
    (options.shared_options), which reach `fn` as one `o: Inputs`."""
    groups: tuple[str, ...] = getattr(fn, "shared_option_groups", ())
    if not groups:
        return fn
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "o"]
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
        for group in groups for name, (annotation, default) in SHARED_OPTIONS[group].items()
    ]  # fmt: skip
    fields = {p.name for p in extra}  # a command's own option may share a name (bench's --batch-size)

    @functools.wraps(fn)
    def command(**kwargs: Any) -> Any:
        return fn(**{k: v for k, v in kwargs.items() if k not in fields}, o=Inputs(**{k: v for k, v in kwargs.items() if k in fields}))

    command.__signature__ = inspect.Signature([*own, *extra])  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in [*own, *extra]}
    return command


COMMANDS = (  # in the order --help lists them
    model.info, model.saliency, prune.prune, explain.explain, check.evaluate, check.bench,
    train.fix, train.finetune, classes.classes, classes.extract, prune.sweep, export.export,
)
for _command in COMMANDS:  # every command shows flags as flags and receives its shared options as one Inputs
    app.command(cls=_Command)(with_shared_options(_command))


def main() -> None:
    """The console script: click's own usage errors also become one sentence and exit code 2."""
    command = typer.main.get_command(app)
    try:
        code = command.main(standalone_mode=False)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # a usage error of whichever click typer runs on
        message = getattr(e, "format_message", None)
        if message is None:
            raise
        if message():  # empty when the help was shown for a bare `explainfix`
            ctx = getattr(e, "ctx", None)
            where = ctx.command_path if ctx is not None and ctx.command_path != "explainfix" else "explainfix COMMAND"
            print(f"explainfix: error: {message()} (see {where} --help)", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)
