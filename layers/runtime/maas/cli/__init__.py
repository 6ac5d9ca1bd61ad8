"""The ``maas`` command line (typer + rich). Entry point: ``maas.cli.main:main``."""

from __future__ import annotations

from rich.console import Console


class CliError(Exception):
    """A failure the CLI reports as one ``error: ...`` line on stderr, exiting 1."""


def stdout_console() -> Console:
    # Built per use so output follows the current sys.stdout (CliRunner swaps it in tests).
    return Console(highlight=False)


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


__all__ = ["CliError", "stderr_console", "stdout_console"]
