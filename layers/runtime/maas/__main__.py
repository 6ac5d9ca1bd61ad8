"""``python -m maas`` runs the CLI."""

from maas.cli.main import main

main()
