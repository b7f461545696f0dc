"""The ``confide`` command.

Every error is one line on stderr and an exit code, never a traceback: a
:class:`~confide.exceptions.ConfideError` exits with its own code, a usage error (unknown
option, bad value) with 2, anything unexpected with 1 plus a hint to rerun with ``--debug``
(or ``CONFIDE_DEBUG=1``) for the traceback. Messages are printed as plain text, never as rich
markup, so ``[run]`` in a message stays ``[run]``.

Start-up stays light: this module and the command modules import torch, rich's progress bars
and the rest of Confide inside the command functions, so ``confide --help`` and
``confide strategies list`` do not load torch.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["app", "main", "fail", "print_error", "DEBUG_ENV"]

#: set to 1 to see the traceback of an unexpected error
DEBUG_ENV = "CONFIDE_DEBUG"

app = typer.Typer(
    name="confide",
    help="Federated learning with secure aggregation, differential privacy and TLS.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain click help: typer's rich help loads rich.markdown and pygments (~0.2 s per call)
    rich_markup_mode=None,
)

_debug = False


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option(
        "--debug", help=f"Show the traceback of an unexpected error (or set {DEBUG_ENV}=1).")
    ] = False,
) -> None:
    """Federated learning with secure aggregation, differential privacy and TLS."""
    global _debug
    _debug = debug


_CONSOLES: dict[bool, Console] = {}


def _get_console(*, stderr: bool) -> Console:
    """A rich console that prints text as it is (no markup, no highlighting)."""
    if stderr not in _CONSOLES:
        from rich.console import Console

        _CONSOLES[stderr] = Console(stderr=stderr, markup=False, highlight=False)
    return _CONSOLES[stderr]


def __getattr__(name: str) -> Any:
    # ``console`` / ``err_console`` are built on first use: importing rich.console costs start-up
    if name == "console":
        return _get_console(stderr=False)
    if name == "err_console":
        return _get_console(stderr=True)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def print_error(message: object) -> None:
    """``error: MESSAGE`` as one plain-text line on stderr (newlines folded into '; ')."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    text = "; ".join(lines) or "unknown error"
    typer.echo(typer.style("error:", fg="red", bold=True) + " " + text, err=True)


def fail(message: str, code: int = 1) -> None:
    """Print one line to stderr and exit with ``code``."""
    print_error(message)
    raise typer.Exit(code)


def _setup_logging(quiet: bool) -> None:
    from rich.logging import RichHandler

    level = logging.WARNING if quiet else logging.INFO
    logger = logging.getLogger("confide")
    logger.handlers.clear()
    handler = RichHandler(console=_get_console(stderr=True), show_time=False, show_path=False,
                          markup=False)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


ConfigArg = Annotated[
    Path | None, typer.Argument(help="Job file (TOML). Defaults: digits, 20 clients, FedAvg.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a key: section.key=value (repeatable)."),
]


@app.command()
def simulate(
    config: ConfigArg = None,
    set_: SetOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o",
                                                help="Run folder (default: runs/<new>).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this folder.")] = None,
    stop_after: Annotated[int | None, typer.Option(
        help="Stop after this round (resume later with --resume).", min=1)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Run a federated training job on this machine (simulation mode)."""
    _setup_logging(quiet)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.text import Text

    from confide.app.simulate import run_simulation, summarize

    err_console = _get_console(stderr=True)
    console = _get_console(stderr=False)

    progress = Progress(
        TextColumn("[bold]{task.description}"), MofNCompleteColumn(), BarColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
        console=err_console, disable=quiet, transient=False,
    )
    task_id = None
    started = False

    def on_start(sim) -> None:  # type: ignore[no-untyped-def]
        nonlocal task_id, started
        for note in sim.notes:
            logging.getLogger("confide").info(note)
        cfg = sim.config
        task_id = progress.add_task("round", total=cfg.run.rounds,
                                    completed=sim.coordinator.completed_rounds, status="")
        progress.start()
        started = True

    def on_round_end(record) -> None:  # type: ignore[no-untyped-def]
        acc = record.get("test_accuracy")
        status = f"acc {acc:.4f}" if acc is not None else ""
        if record.get("epsilon") is not None:
            status += f"  ε {record['epsilon']:.3f}"
        status += f"  clients {record['num_clients']}/{record['num_sampled']}"
        if task_id is not None:
            progress.update(task_id, advance=1, status=status)

    # A terminal gets a live clients bar; a pipe or log file plain lines (the default).
    from confide.progress import RichRoundProgress

    in_round = RichRoundProgress(progress) if err_console.is_terminal and not quiet else None
    try:
        run_dir, history = run_simulation(
            config, overrides=set_ or [], output=output, resume=resume, stop_after=stop_after,
            on_start=on_start, on_round_end=on_round_end, progress=in_round,
        )
    finally:
        if started:  # stopping a bar that never started prints a stray blank line
            progress.stop()
    summary = summarize(history)
    if not quiet:
        acc = summary["final_accuracy"]
        done = Text("done", style="bold green")
        if acc is not None:
            done.append(f": {summary['rounds']} rounds, final test accuracy {acc:.4f}")
        console.print(done)
        typer.echo(f"run folder: {run_dir}")  # never wrapped: scripts read the path
    else:
        typer.echo(str(run_dir))


def _register_groups() -> None:
    """Attach sub-command groups that live in their own modules."""
    import importlib

    for module in ("confide.cli.strategies", "confide.cli.privacy", "confide.cli.deploy",
                   "confide.cli.audit", "confide.cli.config_reference"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue
            raise
        mod.register(app)


def _usage_error_type() -> type[Exception]:
    """The ``ClickException`` class that typer's usage errors derive from.

    Found through ``typer.BadParameter`` so that no ``import click`` is needed: typer 0.2x
    vendors click (and a plain install has no click), older typer re-exports click's own.
    """
    for cls in typer.BadParameter.__mro__:
        if cls.__name__ == "ClickException":
            return cls
    return typer.BadParameter  # pragma: no cover - every typer has ClickException above it


def _usage_hint(exc: Exception) -> str:
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None)
    return f" (see '{path} --help')" if path else ""


def _debug_on() -> bool:
    return _debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every error becomes one stderr line and its exit code."""
    global _debug
    _debug = False
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from confide.exceptions import ConfideError

    _register_groups()
    try:
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:  # typer turns Ctrl-C (and SIGTERM) into 130 here
            sys.exit(code)
    except ConfideError as exc:
        print_error(exc)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort as exc:
        if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
            print_error("interrupted; resume the run with --resume")
        else:
            print_error("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        print_error("interrupted; resume the run with --resume")
        sys.exit(130)
    except OSError as exc:  # a path the user gave: not a folder, no permission, disk full
        if _debug_on():
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print_error(f"{exc.strerror or exc}{where}")
        sys.exit(1)
    except Exception as exc:
        if isinstance(exc, _usage_error_type()):
            exit_code = int(getattr(exc, "exit_code", 2))
            message = exc.format_message()  # type: ignore[attr-defined]
            if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group: its help, as click
                typer.echo(message, err=True)
                sys.exit(exit_code)
            print_error(message + _usage_hint(exc))
            sys.exit(exit_code)
        if _debug_on():
            raise
        print_error(f"unexpected {type(exc).__name__}: {exc} (rerun with 'confide --debug ...' "
                    f"or {DEBUG_ENV}=1 for the traceback)")
        sys.exit(1)
    # click returns (does not raise) the code of ``typer.Exit`` when standalone_mode is off
    if isinstance(code, int) and code != 0:
        sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
