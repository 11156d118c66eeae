"""Sharing data, models and experiments through a DVC remote on a real WebDAV server (WsgiDAV,
started on 127.0.0.1), between two clones of a tiny finished repository, as a team would."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple
from urllib.error import HTTPError, URLError
from urllib.request import urlopen

import pytest
import yaml

from tests.repos import PROJECT, commit_all, ran_stages, run, venv_env

USER, PASSWORD = "alice", "webdav-test-password"


class WebDAV(NamedTuple):
    url: str  # the DVC remote's URL
    folder: Path  # where the server stores what is pushed there


def missing_server() -> str | None:
    """Why the WebDAV round trip cannot run here, or None."""
    if shutil.which("wsgidav", path=venv_env()["PATH"]) is None:
        return "no wsgidav server: pip install -r requirements-dev.txt (or make setup)"
    if importlib.util.find_spec("dvc_webdav") is None:
        return "no dvc-webdav plugin: pip install -r requirements-remote.txt (or make setup)"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


MISSING_SERVER = missing_server()


@pytest.fixture
def webdav(tmp_path: Path) -> Iterator[WebDAV]:
    """A WsgiDAV server with basic authentication, serving a folder with an empty `dvcstore/`
    in it, for a DVC remote."""
    root = tmp_path / "webdav-root"
    # the remote's own folder must exist: DVC creates the folders below it, not the one it names
    (root / "dvcstore").mkdir(parents=True)
    port = free_port()
    config = {
        "host": "127.0.0.1",
        "port": port,
        "provider_mapping": {"/": str(root)},
        "http_authenticator": {"accept_basic": True, "accept_digest": False},
        "simple_dc": {"user_mapping": {"*": {USER: {"password": PASSWORD}}}},
        "verbose": 1,
    }
    config_path = tmp_path / "wsgidav.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log = (tmp_path / "wsgidav.log").open("w")
    server = subprocess.Popen(
        ["wsgidav", "--config", str(config_path)],
        env=venv_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urlopen(url, timeout=1)
            except HTTPError:
                break  # 401 without credentials: it is up
            except URLError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"wsgidav did not start:\n{(tmp_path / 'wsgidav.log').read_text()}")
                time.sleep(0.1)
            else:
                pytest.fail(f"wsgidav at {url} answered without asking for credentials")
        yield WebDAV(f"webdav://127.0.0.1:{port}/dvcstore", root / "dvcstore")
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def set_credentials(repo: Path) -> None:
    # --local: into .dvc/config.local, which git ignores, so no password is ever committed
    run(repo, "dvc", "remote", "modify", "--local", "storage", "user", USER)
    run(repo, "dvc", "remote", "modify", "--local", "storage", "password", PASSWORD)


def assert_up_to_date(repo: Path) -> None:
    status = run(repo, "dvc", "status")
    assert "Data and pipelines are up to date." in status.stdout, status.stdout


@pytest.mark.skipif(MISSING_SERVER is not None, reason=str(MISSING_SERVER))
def test_push_pull_and_experiments_through_a_webdav_remote(
    repo: Path, webdav: WebDAV, tmp_path: Path
) -> None:
    # Clone A: the finished tiny repository; the remote's URL is committed, its password not
    clone_a = repo
    run(clone_a, "dvc", "remote", "add", "-d", "storage", webdav.url)
    set_credentials(clone_a)
    commit_all(clone_a, "DVC remote on the team's WebDAV server")
    assert PASSWORD not in (clone_a / ".dvc" / "config").read_text()
    run(clone_a, "dvc", "push")
    assert any(webdav.folder.rglob("*")), "nothing reached the server"

    # the team's git server: a bare repository on disk
    origin = tmp_path / "origin.git"
    run(tmp_path, "git", "clone", "-q", "--bare", str(clone_a), str(origin))
    run(clone_a, "git", "remote", "add", "origin", str(origin))

    # Clone B: a teammate's fresh clone, no DVC cache and, at its `../shapes`, not even the
    # dataset that `data.source` names: the pulled outputs make the download needless
    clone_b = tmp_path / "teammate" / "repo"
    clone_b.parent.mkdir()
    run(tmp_path, "git", "clone", "-q", str(origin), str(clone_b))
    assert not (clone_b / ".dvc" / "cache").exists()
    assert not (clone_b.parent / "shapes").exists()
    set_credentials(clone_b)
    run(clone_b, "dvc", "pull")
    assert md5(clone_b / "models" / "finetuned.keras") == md5(
        clone_a / "models" / "finetuned.keras"
    )
    assert_up_to_date(clone_b)
    assert ran_stages(run(clone_b, "dvc", "repro").stdout) == []

    # an experiment in A, shared through the git server and the DVC remote
    run(clone_a, "dvc", "exp", "run", "-n", "lower-lr", "-S", "finetune.lr=0.005")
    experiment_metrics = json.loads((clone_a / "metrics" / "eval.json").read_text())
    experiment_model = md5(clone_a / "models" / "finetuned.keras")
    run(clone_a, "dvc", "exp", "push", "origin", "lower-lr")

    baseline_model = md5(clone_b / "models" / "finetuned.keras")
    run(clone_b, "dvc", "exp", "pull", "origin", "lower-lr")
    run(clone_b, "dvc", "exp", "apply", "lower-lr")
    params_b = yaml.safe_load((clone_b / "params.yaml").read_text())
    assert params_b["finetune"]["lr"] == 0.005
    assert json.loads((clone_b / "metrics" / "eval.json").read_text()) == experiment_metrics
    assert md5(clone_b / "models" / "finetuned.keras") == experiment_model != baseline_model
    assert_up_to_date(clone_b)


def test_remote_plugins_load_in_dvc(tmp_path: Path) -> None:
    """Every plugin of requirements-remote.txt installs beside the pinned dvc and gives it the
    remote type the README sets up (`dvc version` lists only the ones that import)."""
    plugins = re.findall(
        r"^dvc-([a-z]+)==", (PROJECT / "requirements-remote.txt").read_text(), re.MULTILINE
    )
    assert plugins
    supports = run(tmp_path, "dvc", "version").stdout.partition("Supports:")[2]
    missing = [name for name in plugins if not re.search(rf"^\s*{name} \(", supports, re.M)]
    assert not missing, f"dvc cannot use {missing}: pip install -r requirements-remote.txt"
