"""Run a GemmaServer inside another program, on its own event loop thread."""

from __future__ import annotations

import asyncio
import threading

from coordinator.server import GemmaServer
from coordinator.service_config import ServiceConfig


class ServerThread:
    """A GemmaServer on a private asyncio loop in a daemon thread, as
    `gemma-serve` runs it, for tests, benchmarks and embedding.

    Example:
    >>> running = ServerThread(ServiceConfig(worker=WorkerSpec("default"), port=0))
    >>> GemmaClient(running.address).forward(texts=["hi"])
    >>> running.stop()
    """

    def __init__(self, config: ServiceConfig, start_timeout_s: float = 600):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="gemma-server-loop")
        self.thread.start()
        self.server = GemmaServer(config)
        try:
            self.call(self.server.start(), timeout=start_timeout_s)
        except BaseException:
            self._stop_loop()
            raise
        self.address = f"{config.host}:{self.server.port}"
        # The HTTP front's "host:port" (None when it is off).
        self.http_address = (None if self.server.http_port is None
                             else f"{config.host}:{self.server.http_port}")

    def call(self, coroutine, timeout: float = 60):
        """Runs `coroutine` on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def stop(self, grace: float = 1.0) -> None:
        try:
            self.call(self.server.stop(grace=grace))
        finally:
            self._stop_loop()
