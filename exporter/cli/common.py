"""What every `enginekit` command shares: the console, the error handler that prints a user error
as one paragraph with its exit code, the stage progress display, JSON output, quiet libraries."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer

from runtimes.errors import EnginekitError

F = TypeVar("F", bound=Callable[..., Any])


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def handle_errors(fn: F) -> F:
    """Print EnginekitError as one paragraph (no traceback) and exit with its code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EnginekitError as exc:
            from rich.markup import escape

            # soft_wrap: never hard-break the paragraph, so the commands in it can be copied whole.
            _console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def stages(enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """A progress callback: a spinner on the current stage, a ✓ line with its time for each done."""
    if not enabled:
        yield lambda _msg: None
        return
    import time

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = _console(stderr=True)
    # A stage is a message; "Stage: detail" messages update the spinner without starting a new stage.
    state: dict[str, Any] = {"stage": None, "t": 0.0}
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task("starting", total=None)

        def finish() -> None:
            if state["stage"]:
                progress.console.print(f"[green]✓[/] {state['stage']} [dim]({time.perf_counter() - state['t']:.1f} s)[/]")

        def say(msg: str) -> None:
            current = state["stage"]
            if current is None or msg.split(":")[0] != current.split(":")[0]:
                finish()
                state["stage"], state["t"] = msg, time.perf_counter()
            progress.update(task, description=msg)

        try:
            yield say
            finish()
        finally:
            progress.stop()


def _quiet_libraries() -> None:
    """transformers' progress bars and hub warnings are noise on this CLI's console."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
