"""Shared fixtures: a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def http_server() -> Iterator[Callable[..., str]]:
    """`serve(directory)` or `serve(handler=HandlerClass)`: start a server, return its base URL."""
    servers: list[ThreadingHTTPServer] = []

    def serve(
        directory: Path | None = None, handler: type[BaseHTTPRequestHandler] | None = None
    ) -> str:
        handler_class = handler or functools.partial(QuietHandler, directory=str(directory))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()
