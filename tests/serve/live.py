"""A live `slm serve` app on a free loopback port, in a thread of the test process.

A plain module (not a test file) shared by the server, fuzz and browser tests: the real ASGI app
under the real uvicorn, so clients talk HTTP to it exactly as they would to `slm serve`.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn

from smallmighty.serve.server import ServeConfig, create_app


class LiveServer:
    """Serves `service` at `self.url` until `close()`."""

    def __init__(self, service: Any, **config: Any) -> None:
        self.service = service
        self.config = ServeConfig(**{"model_name": "tiny", **config})
        self.app = create_app(service, self.config)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def metric(self, name: str) -> float:
        """The value of an unlabelled series of /metrics (summed over labels when it has them)."""
        import httpx

        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        text = httpx.get(self.url + "/metrics", headers=headers).text
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(name) and line[len(name)] in " {"]
        return sum(values)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
