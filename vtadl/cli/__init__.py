"""The `vtadl` command line: each command parses, calls one library function, prints.

`vtadl.cli.main` builds the Typer app and registers every command; the command modules
(`run`, `data`, `jobs`, `service`, `tune`) import only `console`, `options`, `progress` and
the library. Errors a user can cause become one line on stderr and exit code 2.
"""
