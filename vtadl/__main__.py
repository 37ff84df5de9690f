"""`python -m vtadl` is the `vtadl` command."""

from vtadl.cli.main import run

run()
