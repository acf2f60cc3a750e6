"""What every `enginekit` command shares: the console, the error handler that prints a user error
as one paragraph with its exit code, the stage progress display, JSON output, quiet libraries."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import typer

from runtimes.errors import EnginekitError

F = TypeVar("F", bound=Callable[..., Any])


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    # emoji=False: messages quote the user's text, and rich would draw ':b:' in '--shapes batch=a:b:c' as 🅱.
    return Console(stderr=stderr, highlight=False, soft_wrap=False, emoji=False)


INTERNAL_ERROR_EXIT = 3  # a bug in enginekit (user errors exit 2, a failed parity gate 1)


def handle_errors(fn: F) -> F:
    """Print EnginekitError as one paragraph (no traceback) and exit with its code; any other exception
    is a bug: its traceback goes to a file, and one paragraph names that file (exit 3)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from rich.markup import escape

        try:
            return fn(*args, **kwargs)
        except EnginekitError as exc:
            # soft_wrap: never hard-break the paragraph, so the commands in it can be copied whole.
            _console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # a bug: never a raw traceback on the console
            saved = save_traceback(exc)
            _console(stderr=True).print(
                f"[bold red]internal error:[/] {escape(type(exc).__name__)}: {escape(str(exc)[:300])}. This is a bug in "
                f"enginekit, not a problem with your input; the traceback is saved in {escape(str(saved))}. Please report "
                "it with that file.", soft_wrap=True)
            raise typer.Exit(INTERNAL_ERROR_EXIT) from None

    return wrapper  # type: ignore[return-value]


def save_traceback(exc: BaseException) -> Path:
    """Write `exc`'s traceback to ENGINEKIT_CRASH_DIR (default: <tmp>/enginekit-crashes), one file each."""
    import tempfile
    import time
    import traceback

    folder = Path(os.environ.get("ENGINEKIT_CRASH_DIR") or Path(tempfile.gettempdir()) / "enginekit-crashes")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    path.write_text(f"enginekit {' '.join(sys.argv)}\n\n" + "".join(traceback.format_exception(exc)), encoding="utf-8")
    return path


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
