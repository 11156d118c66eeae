"""Shared fixtures: a real HTTP server on 127.0.0.1, and one tiny finished pipeline repository
with its trained model, built once per test session for all pytest-xdist workers."""

from __future__ import annotations

import fcntl
import functools
import shutil
import threading
from collections import Counter
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


def shared_folder(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """The temporary folder of the whole test run: xdist's workers have their own under it."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent


def build_finished_repo(shared: Path) -> Path:
    """Build the shared tiny repository under `shared` unless it is built; return it."""
    from tests.repos import commit_all, local_repo, run

    root = shared / "finished"
    with open(shared / "finished.lock", "w") as lock:
        # the first to get here builds it; the others wait for it here
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "built").exists():
            shutil.rmtree(root, ignore_errors=True)  # a build that failed
            root.mkdir()
            repo = local_repo(root)
            run(repo, "dvc", "repro")
            commit_all(repo, "first run")
            (root / "built").touch()
    return root / "repo"


NEEDS_FINISHED_REPO = pytest.StashKey[bool]()


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected tests
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests on the shared tiny repository go last: while it is built, in the background
    from the first test on, every worker runs tests that do not wait for it. Among them, the
    modules with many (short) tests come last, so that the workers finish close together."""
    needs = {item for item in items if "finished_repo" in getattr(item, "fixturenames", ())}
    config.stash[NEEDS_FINISHED_REPO] = bool(needs)
    per_module = Counter(item.path for item in needs)
    # a stable sort: tests keep their order within a module
    items.sort(key=lambda item: (item in needs, per_module[item.path] if item in needs else 0))


@pytest.fixture(scope="session", autouse=True)
def build_finished_repo_in_background(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, worker_id: str
) -> Iterator[None]:
    if not request.config.stash.get(NEEDS_FINISHED_REPO, False):
        yield
        return
    shared = shared_folder(tmp_path_factory, worker_id)
    # a failure here shows when `finished_repo` builds it again, in the foreground
    build = threading.Thread(target=build_finished_repo, args=(shared,), daemon=True)
    build.start()
    yield
    build.join()  # a session that ended early (-x) leaves no DVC command running


@pytest.fixture(scope="session")
def finished_repo(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """One tiny repository, built once per test session and shared by the pytest-xdist
    workers: every stage run by `dvc repro` and committed. Read it, without running DVC in it
    (another worker may be copying it); to change anything or run DVC, take a `repo` copy."""
    return build_finished_repo(shared_folder(tmp_path_factory, worker_id))


@pytest.fixture
def repo(finished_repo: Path, tmp_path: Path) -> Path:
    """A private copy of `finished_repo` (work tree, git history and DVC cache)."""
    from tests.repos import copy_repo

    return copy_repo(finished_repo, tmp_path)


@pytest.fixture(scope="session")
def tiny_model(finished_repo: Path) -> Path:
    """The finetuned model of `finished_repo` (3 colour classes, 16x16 images): read only."""
    return finished_repo / "models" / "finetuned.keras"
