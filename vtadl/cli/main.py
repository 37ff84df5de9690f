"""The `vtadl` app: its groups, the --verbose switch, and every command registered here,
in the order that `vtadl --help` lists them."""

from __future__ import annotations

import logging
import sys

import typer

from vtadl.cli.data import data_bench, data_check, data_demo, data_download, data_pack
from vtadl.cli.jobs import cancel, logs, results, retry, status, submit, worker
from vtadl.cli.options import flag
from vtadl.cli.run import evaluate, export, predict, train
from vtadl.cli.service import service_start, service_status, service_stop
from vtadl.cli.tune import dashboard, report, tune

HELP = """Find defects in images of your products: train an anomaly detector (VT-ADL) on images
of good parts, measure it on a test split with known defects, and get heat maps of where
new images look wrong.

Start with `vtadl data demo data/demo`, then
`vtadl train --root data/demo --category brick --variant vtadl_small`.
"""

app = typer.Typer(no_args_is_help=True, add_completion=False, help=HELP)
data_app = typer.Typer(
    no_args_is_help=True,
    help="Datasets: write the demo dataset or the benchmark (bench), download, check and pack.",
)
service_app = typer.Typer(no_args_is_help=True, help="The private Redis that the queue uses.")
app.add_typer(data_app, name="data")
app.add_typer(service_app, name="service")

# Each group's commands, by name, in the order of its --help.
COMMANDS = [
    (
        app,
        {
            "train": train,
            "evaluate": evaluate,
            "predict": predict,
            "export": export,
            "tune": tune,
            "report": report,
            "dashboard": dashboard,
            "submit": submit,
            "worker": worker,
            "status": status,
            "logs": logs,
            "cancel": cancel,
            "retry": retry,
            "results": results,
        },
    ),
    (
        data_app,
        {
            "demo": data_demo,
            "check": data_check,
            "pack": data_pack,
            "download": data_download,
            "bench": data_bench,
        },
    ),
    (service_app, {"start": service_start, "status": service_status, "stop": service_stop}),
]
for group, commands in COMMANDS:
    for name, command in commands.items():
        group.command(name)(command)


@app.callback()
def main(verbose: bool = flag("--verbose", "Log progress details.", "-v")):
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run() -> None:
    app(prog_name="vtadl")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
