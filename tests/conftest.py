"""Shared fixtures: a real HTTP server on 127.0.0.1, and one tiny finished pipeline repository
with its trained model, built once per test session for all pytest-xdist workers."""

from __future__ import annotations

import fcntl
import functools
import shutil
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
def finished_repo(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """One tiny repository, built once per test session and shared by the pytest-xdist
    workers: every stage run by `dvc repro` and committed. Read it, without running DVC in it
    (another worker may be copying it); to change anything or run DVC, take a `repo` copy."""
    from tests.repos import commit_all, local_repo, run

    # xdist's workers have their own temporary folders under one shared by the whole run
    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent
    root = shared / "finished"
    with open(shared / "finished.lock", "w") as lock:
        # the first worker to get here builds it; the others wait for it here
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "built").exists():
            shutil.rmtree(root, ignore_errors=True)  # a build that failed
            root.mkdir()
            repo = local_repo(root)
            run(repo, "dvc", "repro")
            commit_all(repo, "first run")
            (root / "built").touch()
    return root / "repo"


@pytest.fixture
def repo(finished_repo: Path, tmp_path: Path) -> Path:
    """A private copy of `finished_repo` (work tree, git history and DVC cache)."""
    from tests.repos import copy_repo

    return copy_repo(finished_repo, tmp_path)


@pytest.fixture(scope="session")
def tiny_model(finished_repo: Path) -> Path:
    """The finetuned model of `finished_repo` (3 colour classes, 16x16 images): read only."""
    return finished_repo / "models" / "finetuned.keras"
