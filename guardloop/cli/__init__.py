"""`guardloop`: one command line for every job (serve, train, eval, models, bench, ...).

A package of thin modules, one per command group: each parses its options, calls one function of the layers
below and prints the result. `app` (in app.py) is the Typer application they register on; importing them here
registers every command, in the order `guardloop --help` lists them. User errors end with one readable line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

# isort: off
from guardloop.cli.metrics_folder import exit_on_a_bad_metrics_folder

exit_on_a_bad_metrics_folder()  # before the imports below create the metrics (metrics_folder.py says why)
from guardloop.cli.app import app
from guardloop.cli import serve, training, cycles, simulate, variations  # noqa: F401  (they register commands)
from guardloop.cli import registry_commands, bench, pool, pool_map, reviewers  # noqa: F401  (they register groups)
# isort: on

__all__ = ["app", "main"]


def main() -> None:
    app()


if __name__ == "__main__":
    main()
