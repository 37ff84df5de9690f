"""`python -m vtadl` is the `vtadl` command."""

from vtadl.cli import run

run()
