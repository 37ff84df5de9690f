from vtadl.cli import run

run()
