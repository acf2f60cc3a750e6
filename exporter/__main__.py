"""`python -m exporter` runs the same CLI as `enginekit`."""

from exporter.cli import main

main()
