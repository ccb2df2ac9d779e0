"""Run the server in a background thread of this process (tests, notebooks): real uvicorn on a free port."""

from __future__ import annotations

import socket
import threading
import time

import httpx

from osprey.segment import Segmenters

from .app import create_app
from .config import ServeConfig
from .engine import Backend
from .replicas import EngineReplicas


def listening_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A socket bound to `port` (0: one the OS picks) and kept open for uvicorn to serve on. Asking for a free
    port, closing it and letting uvicorn bind it later races with any other process doing the same."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if port:  # a named port may be rebound while its last connections sit in TIME_WAIT (as uvicorn does)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class BackgroundServer:
    """`with BackgroundServer(config) as server:` serves on `server.url` until the block ends (graceful stop)."""

    def __init__(self, config: ServeConfig, backends: list[Backend] | None = None, host: str = "127.0.0.1",
                 port: int | None = None, wait_ready: bool = True, startup_timeout_s: float = 60.0,
                 segmenters: Segmenters | None = None) -> None:
        import uvicorn

        self.app = create_app(config, backends, segmenters)
        self.socket = listening_socket(host, port or 0)
        self.host, self.port = host, int(self.socket.getsockname()[1])
        self.url = f"http://{host}:{self.port}"
        self.wait_ready, self.startup_timeout_s = wait_ready, startup_timeout_s
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=host, port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=max(1, int(config.request_timeout_s))))
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="osprey-server", daemon=True)

    @property
    def engine(self) -> EngineReplicas:
        return self.app.state.engine

    def start(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        while self.wait_ready:
            status = httpx.get(self.url + "/health").status_code
            if status == 200:
                break
            if self.engine.load_error or time.monotonic() > deadline:
                raise RuntimeError(f"the model did not load: {self.engine.load_error or 'timeout'}")
            time.sleep(0.05)
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        self.socket.close()  # uvicorn has closed its server on it; this releases a never-started one too

    def __enter__(self) -> BackgroundServer:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
