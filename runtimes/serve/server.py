"""uvicorn as `enginekit serve` runs it: the listening socket bound before the models load, the
parser and limits chosen here, and a drained shutdown on SIGTERM/SIGINT that exits 0.

Imported by run_server only (it imports uvicorn at the top), so `import runtimes.serve` stays free
of the HTTP stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import uvicorn
from uvicorn.server import HANDLED_SIGNALS

from ..errors import UsageError

BACKLOG = 2048  # uvicorn's own default (Config.backlog)


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, or UsageError in one paragraph (port taken, address not ours)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    # As uvicorn's Config.bind_socket does: a restart may bind while the old process's connections
    # sit in TIME_WAIT; a port that another process listens on still fails.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        # Listen at once, not when uvicorn starts: Linux lets two SO_REUSEADDR sockets bind the same
        # port while neither listens, so only listen() is sure to have claimed it.
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(
                f"Expected port {port} on {host} to be free for enginekit serve, but it is in use by another "
                f"process. Pass another --port (--port 0 picks a free one and the ready line names it), or "
                f"stop the process that holds it (`ss -ltnp 'sport = :{port}'` shows which)."
            ) from None
        raise UsageError(
            f"Expected an address enginekit serve can listen on, but binding {host}:{port} failed "
            f"({exc.strerror or exc}). Pass --host with an address of this machine (127.0.0.1, 0.0.0.0) and "
            "a --port this user may open (1024 and above, or 0 for any free one)."
        ) from None
    return sock


class Server(uvicorn.Server):
    """uvicorn's Server, except that a SIGTERM or SIGINT which has been handled ends in exit 0.

    uvicorn 0.54 (server.py, capture_signals) answers SIGTERM with a graceful shutdown and then
    raises the same signal again under the handler that was installed before it, the default one:
    a service that has just drained every request dies of the signal (exit 143, or a
    KeyboardInterrupt traceback and 130 for SIGINT), which supervisors report as a failure. The
    shutdown asked for is done by then, so this one only restores the earlier handlers.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def make_server(app: Any, *, graceful_timeout_s: float, keep_alive_s: float, limit_concurrency: int | None,
                max_header_bytes: int, log_level: str) -> Server:
    """The Server for `app`; run it with server.run(sockets=[bind_socket(...)])."""
    return Server(uvicorn.Config(
        app, log_level=log_level, access_log=False, timeout_graceful_shutdown=graceful_timeout_s,  # type: ignore[arg-type]
        # h11, not httptools: httptools has no limit on the request head (an 8 MB header was answered
        # 200). h11 refuses a head still incomplete after h11_max_incomplete_event_size bytes (uvicorn
        # answers 400 and closes); one that arrives whole in a single socket read (asyncio and uvloop
        # read at most 256 KiB) passes, so a connection buffers at most the limit + one read.
        # Its cost, bench/loadtest.py's requests on all-MiniLM-L6-v2 with --threads 1 (2 cores, two
        # rounds each): 75-80 req/s at 1 client against 76-78 with httptools, 112-140 against 116-139
        # at 8: within the noise; on a 2-layer toy BERT whose engine run takes ~1 ms, 8-20% fewer.
        http="h11", h11_max_incomplete_event_size=max_header_bytes,
        # Idle keep-alive connections close after this (uvicorn's default, set here so it is a choice).
        timeout_keep_alive=keep_alive_s,  # type: ignore[arg-type]
        # Connections + requests at once; beyond it uvicorn answers 503 itself and starts no task.
        limit_concurrency=limit_concurrency,
    ))


def serve_on(sock: socket.socket, config: Any, log_level: str, names: str,
             make_app: Callable[[Callable[[], Awaitable[None]], Callable[[], bool]], Any]) -> None:
    """Serve the app `make_app(on_ready, stopping)` builds on the bound `sock` until SIGTERM/SIGINT (both
    services: app.py's and openai_app.py's). on_ready prints `enginekit serve: ready on http://HOST:PORT (names)`
    once uvicorn serves the socket (a warm-up can finish before it does); stopping() says shutdown began."""
    server: Any = None

    async def announce() -> None:
        while not server.started:
            await asyncio.sleep(0.01)
        bound_host, bound_port = sock.getsockname()[:2]
        print(f"enginekit serve: ready on http://{bound_host}:{bound_port} ({names})", flush=True)

    app = make_app(announce, lambda: bool(server.should_exit))
    server = make_server(app, graceful_timeout_s=config.graceful_timeout_s, keep_alive_s=config.keep_alive_s,
                         limit_concurrency=config.limit_concurrency, max_header_bytes=config.max_header_bytes,
                         log_level=log_level)
    server.run(sockets=[sock])


__all__ = ["BACKLOG", "Server", "bind_socket", "make_server", "serve_on"]
