"""`python -m lorakit` runs the CLI."""

from .cli import main

main()
