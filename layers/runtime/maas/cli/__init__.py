"""The ``maas`` command line (typer + rich). Entry point: ``maas.cli.main:main``."""

from __future__ import annotations

from rich.console import Console


class CliError(Exception):
    """A failure the CLI reports as one ``error: ...`` line on stderr, exiting 1."""


def stdout_console() -> Console:
    # Built per use so output follows the current sys.stdout (CliRunner swaps it in tests). Markup
    # is off: names, descriptions and reasons come from the server and may hold "[...]" text; the
    # few styled strings are built as rich ``Text``.
    return Console(highlight=False, markup=False)


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, markup=False)


__all__ = ["CliError", "stderr_console", "stdout_console"]
