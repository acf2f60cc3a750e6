"""`python -m exporter` runs the same CLI as `enginekit`."""

from .cli import main

main()
