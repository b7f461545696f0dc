"""The ``confide`` command.

User mistakes (:class:`~confide.exceptions.ConfideError`) become one line on stderr and the
error's exit code, never a traceback. Sub-command groups register themselves on ``app``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from confide.exceptions import ConfideError

app = typer.Typer(
    name="confide",
    help="Federated learning with secure aggregation, differential privacy and TLS.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def _root() -> None:
    """Federated learning with secure aggregation, differential privacy and TLS."""


err_console = Console(stderr=True)
console = Console()


def fail(message: str, code: int = 1) -> None:
    """Print one line to stderr and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _setup_logging(quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.INFO
    logger = logging.getLogger("confide")
    logger.handlers.clear()
    handler = RichHandler(console=err_console, show_time=False, show_path=False)
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
    from confide.simulations.run import run_simulation, summarize

    progress = Progress(
        TextColumn("[bold]{task.description}"), MofNCompleteColumn(), BarColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
        console=err_console, disable=quiet, transient=False,
    )
    task_id = None

    def on_start(sim) -> None:  # type: ignore[no-untyped-def]
        nonlocal task_id
        for note in sim.notes:
            logging.getLogger("confide").info(note)
        cfg = sim.config
        task_id = progress.add_task("round", total=cfg.run.rounds,
                                    completed=sim.coordinator.completed_rounds, status="")
        progress.start()

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
        progress.stop()
    summary = summarize(history)
    if not quiet:
        acc = summary["final_accuracy"]
        console.print(
            f"[bold green]done[/]: {summary['rounds']} rounds, final test accuracy "
            f"{acc:.4f}" if acc is not None else "[bold green]done[/]", highlight=False)
        console.print(f"run folder: {run_dir}", highlight=False)
    else:
        console.print(str(run_dir), highlight=False)


def _register_groups() -> None:
    """Attach sub-command groups that live in their own modules."""
    import importlib

    for module in ("confide.cli.strategies", "confide.cli.privacy", "confide.cli.deploy",
                   "confide.cli.audit"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue
            raise
        mod.register(app)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: map ConfideError to one stderr line and its exit code."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    _register_groups()
    try:
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:  # typer turns Ctrl-C (and SIGTERM) into 130 here
            sys.exit(code)
    except ConfideError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("[bold red]error:[/] aborted", highlight=False)
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("[bold red]error:[/] interrupted; resume the run with --resume",
                          highlight=False)
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive as click exceptions
        import click

        if isinstance(exc, click.ClickException):
            err_console.print(f"[bold red]error:[/] {exc.format_message()}", highlight=False,
                              soft_wrap=True)
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
