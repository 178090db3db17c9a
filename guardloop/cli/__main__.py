"""`python -m guardloop.cli`: the same command line as the `guardloop` script."""

from guardloop.cli import main

main()
