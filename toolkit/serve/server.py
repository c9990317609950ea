"""Run the app under uvicorn: in the foreground (`phi3 serve`) or on a thread (tests, embedding)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from ..api import Model
from ..errors import UserError
from .app import create_app
from .scheduler import Scheduler


def build(model: Model, *, max_sequences: int, max_queue: int, api_key: str | None = None):
    """(app, scheduler); the scheduler's engine thread is started."""
    if max_sequences > model.engine.cache_opts.max_batch_size:
        raise ValueError("max_sequences exceeds the engine's batch size (load the model with it)")
    scheduler = Scheduler(model.engine, max_sequences=max_sequences, max_queue=max_queue)
    scheduler.start()
    return create_app(model, scheduler, api_key=api_key), scheduler


def _config(app, host: str, port: int, log_level: str) -> uvicorn.Config:
    # one process, one event loop: the engine is in this process and owned by the scheduler thread
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, workers=1, timeout_graceful_shutdown=5
    )


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, made before the model is loaded: an address in use or a host that does
    not resolve is one UserError then, not uvicorn's log lines and exit 3 after the load."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise UserError(f"--host {host}: cannot listen there ({e.strerror or e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's own: no TIME_WAIT wait
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    return sock


def serve_forever(
    model: Model,
    *,
    sock: socket.socket,
    max_sequences: int,
    max_queue: int,
    api_key: str | None = None,
    log_level: str = "info",
) -> None:
    """Serve on `sock` (`listen_socket`) until interrupted."""
    app, scheduler = build(model, max_sequences=max_sequences, max_queue=max_queue, api_key=api_key)
    host, port = sock.getsockname()[:2]
    try:
        uvicorn.Server(_config(app, host, port, log_level)).run(sockets=[sock])
    finally:
        scheduler.stop()


class BackgroundServer:
    """uvicorn on a thread of this process, stopped by `stop()` (or the with-block's end)."""

    def __init__(
        self,
        model: Model,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_sequences: int = 4,
        max_queue: int = 16,
        api_key: str | None = None,
    ) -> None:
        self.app, self.scheduler = build(
            model, max_sequences=max_sequences, max_queue=max_queue, api_key=api_key
        )
        self.server = uvicorn.Server(_config(self.app, host, port, "warning"))
        self.server.install_signal_handlers = lambda: None  # signals belong to the main thread's owner
        self._thread = threading.Thread(target=self.server.run, name="phi3-http", daemon=True)
        self.host = host

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)
        self.scheduler.stop()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
