"""The command line: parses options, calls one library function per command, renders the result."""


def main() -> None:
    """The `explainfix` console script."""
    from explainfix_cli.cli.app import main as run

    run()
