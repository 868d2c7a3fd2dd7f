"""`python -m mlbuild`: the same as the `mlbuild` command."""

from mlbuild.cli import run_main

run_main()
