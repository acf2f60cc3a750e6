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


# Set once per command by the app's callback (exporter/cli/__init__.py): -q hides progress, -v shows debug logs.
VERBOSITY = {"level": 0}


def plain_output(stream: Any) -> bool:
    """True where output is read later rather than watched: not a terminal (a CI log, `| tee`), or CI
    / NO_COLOR set. There rich would cut table cells to 80 columns ('9.54e-…'), so nothing is cut."""
    return not getattr(stream, "isatty", lambda: False)() or bool(os.environ.get("CI") or os.environ.get("NO_COLOR"))


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    # emoji=False: messages quote the user's text, and rich would draw ':b:' in '--shapes batch=a:b:c' as 🅱.
    # Off a terminal: a width no table reaches, so cells are never truncated or folded; each row stays one line.
    width = 10_000 if plain_output(sys.stderr if stderr else sys.stdout) else None
    return Console(stderr=stderr, highlight=False, soft_wrap=False, emoji=False, width=width)


INTERNAL_ERROR_EXIT = 3  # a bug in enginekit (user errors exit 2, a failed parity gate 1)
# The stage the command was in (the last progress message, without its detail), for the internal-error paragraph.
CURRENT_STAGE: dict[str, str | None] = {"stage": None}


def handle_errors(fn: F) -> F:
    """Print EnginekitError as one paragraph (no traceback) and exit with its code; any other exception
    is a bug: its traceback goes to a file, and one paragraph names that file (exit 3)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from rich.markup import escape

        as_json = bool(kwargs.get("as_json"))  # under --json, stdout stays one JSON document, errors included
        try:
            return fn(*args, **kwargs)
        except EnginekitError as exc:
            if as_json:
                _print_json({"error": str(exc), "exit_code": exc.exit_code, "kind": type(exc).__name__})
            else:  # soft_wrap: never hard-break the paragraph, so the commands in it can be copied whole.
                _console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # a bug: never a raw traceback on the console
            saved = save_traceback(exc)
            stage = CURRENT_STAGE["stage"]
            where = f"While '{stage}', " if stage else ""
            text = (f"{where}{type(exc).__name__}: {str(exc)[:300]}. This is a bug in enginekit, not a problem with your "
                    f"input; the traceback is saved in {saved}. Please report it with that file.")
            if as_json:
                _print_json({"error": text, "exit_code": INTERNAL_ERROR_EXIT, "kind": "InternalError",
                             "traceback": str(saved)})
            else:
                _console(stderr=True).print(f"[bold red]internal error:[/] {escape(text)}", soft_wrap=True)
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
    """A progress callback: a spinner on the current stage, a ✓ line with its time for each done
    (nothing under -q)."""
    CURRENT_STAGE["stage"] = None

    def note(msg: str) -> None:
        CURRENT_STAGE["stage"] = msg.split(": ")[0]

    if not enabled or VERBOSITY["level"] < 0:
        yield note
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
            note(msg)
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


def configure_output(quiet: bool, verbose: int) -> None:
    """-q / -v for every command: enginekit's own log level (WARNING by default, ERROR under -q, INFO
    and DEBUG under -v and -vv), the progress display, and ONNX Runtime's log severity (its log lines
    bypass Python's logging; by default only fatal ones print, since every error it reports also
    comes back as an exception that enginekit turns into one paragraph)."""
    import logging

    VERBOSITY["level"] = -1 if quiet else verbose
    level = logging.ERROR if quiet else {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    if verbose:
        os.environ["ENGINEKIT_ORT_LOG_LEVEL"] = "2" if verbose == 1 else "0"  # warnings / everything


def flags_without_type_tags() -> None:
    """typer 0.29 tags every option in --help with its type, flags included ('--force <bool>'), which reads
    as if the flag took a value; flags (and --help) are shown without one, valued options keep theirs."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "flags_untagged", False):  # older typer (0.2x) tags nothing: leave it
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if self.is_flag or self.count else shown(self, ctx)

    display_type_rich.flags_untagged = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]
