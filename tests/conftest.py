"""Shared fixtures: a real HTTP server on 127.0.0.1, and one tiny finished pipeline repository
with its trained model, built once per test session (per pytest-xdist worker)."""

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


@pytest.fixture(scope="session")
def finished_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny repository, built once per test session (per worker): every stage run by
    `dvc repro` and committed. Read it freely; to change anything, take a `repo` copy instead."""
    from tests.repos import commit_all, local_repo, run

    repo = local_repo(tmp_path_factory.mktemp("finished"))
    run(repo, "dvc", "repro")
    commit_all(repo, "first run")
    return repo


@pytest.fixture
def repo(finished_repo: Path, tmp_path: Path) -> Path:
    """A private copy of `finished_repo` (work tree, git history and DVC cache)."""
    from tests.repos import copy_repo

    return copy_repo(finished_repo, tmp_path)


@pytest.fixture(scope="session")
def tiny_model(finished_repo: Path) -> Path:
    """The finetuned model of `finished_repo` (3 colour classes, 16x16 images): read only."""
    return finished_repo / "models" / "finetuned.keras"
