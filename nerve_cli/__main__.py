"""Allow ``python -m nerve_cli``."""

from nerve_cli.cli import main

main()
