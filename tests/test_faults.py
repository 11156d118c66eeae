"""Runs that go wrong: a training killed mid-way resumes, a failing stage keeps what came
before it, and reruns are reproducible. Real `dvc repro` in a temporary repository."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import yaml

from imageclf.errors import PipelineError
from imageclf.fileio import atomic_path
from imageclf.models import build_model
from imageclf.params import ModelParams
from tests import synthetic
from tests.test_pipeline import STAGES, make_repo, ran_stages, run, venv_env


def set_params(repo: Path, **changes: object) -> None:
    """`set_params(repo, **{"train.epochs": 3})`: edit params.yaml like `dvc exp run -S`."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if name:
            params[section][name] = value
        else:
            params[section] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def local_repo(tmp_path: Path) -> Path:
    dataset = synthetic.image_folders(tmp_path / "shapes", per_class=30, test_per_class=8)
    return make_repo(tmp_path, str(dataset), None)


def test_training_killed_mid_way_resumes_from_the_last_epoch(tmp_path: Path) -> None:
    repo = local_repo(tmp_path)
    set_params(repo, **{"train.epochs": 30})
    run(repo, "dvc", "repro", "augment")
    metadata = repo / "checkpoints" / "train" / "backup" / "training_metadata.json"
    process = subprocess.Popen(
        ["dvc", "repro", "train"],
        cwd=repo,
        env=venv_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if metadata.exists() and json.loads(metadata.read_text() or "{}").get("epoch", 0) >= 3:
            break
        time.sleep(0.02)
    assert process.poll() is None, "training ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = json.loads(metadata.read_text())["epoch"]
    assert 3 <= killed_at < 30
    assert not (repo / "models" / "model.keras").exists()

    rerun = run(repo, "dvc", "repro")
    assert "Resuming from epoch" in rerun.stdout
    resumed_at = int(rerun.stdout.split("Resuming from epoch ")[1].split()[0])
    assert killed_at <= resumed_at < 30
    assert ran_stages(rerun.stdout) == ["train", "finetune", "evaluate"]
    assert (repo / "models" / "model.keras").exists()
    assert not (repo / "checkpoints" / "train").exists()
    # the curves tell one story: every epoch once, killed run and resumed run together
    steps = [
        int(line.split("\t")[0])
        for line in (repo / "plots" / "train.tsv").read_text().splitlines()[1:]
    ]
    assert sorted(set(steps)) == list(range(30))


def test_corrupt_checkpoint_starts_over_with_a_warning(tmp_path: Path) -> None:
    repo = local_repo(tmp_path)
    run(repo, "dvc", "repro", "augment")
    backup = repo / "checkpoints" / "train" / "backup"
    backup.mkdir(parents=True)
    (backup / "training_metadata.json").write_text('{"epoch": 1}')
    (backup / "latest.weights.h5").write_bytes(b"not an HDF5 file")
    result = run(repo, "dvc", "repro", "train")
    assert "checkpoint unreadable" in result.stderr and "starting over" in result.stderr
    assert "Resuming" not in result.stdout
    assert (repo / "models" / "model.keras").exists()


def test_a_failing_stage_keeps_earlier_outputs_and_rerun_starts_there(tmp_path: Path) -> None:
    repo = local_repo(tmp_path)
    run(repo, "dvc", "repro", "augment")
    lock_before = (repo / "dvc.lock").read_text()
    # an architecture the registry does not know: train must refuse before any work
    set_params(repo, **{"model.arch": "resnet9000"})
    failed = run(repo, "dvc", "repro", check=False)
    assert failed.returncode != 0
    assert "model.arch = 'resnet9000': must be one of" in failed.stderr + failed.stdout
    assert (repo / "dvc.lock").read_text() == lock_before
    assert (repo / "data" / "augmented").is_dir() and (repo / "data" / "prepared").is_dir()
    set_params(repo, **{"model.arch": "fastnet"})
    assert ran_stages(run(repo, "dvc", "repro").stdout) == ["train", "finetune", "evaluate"]


def test_same_params_same_metrics_other_seed_other_metrics(tmp_path: Path) -> None:
    repo = local_repo(tmp_path)
    run(repo, "dvc", "repro")
    first = (repo / "metrics" / "train.json").read_text()
    run(repo, "dvc", "repro", "--force", "train")
    again = (repo / "metrics" / "train.json").read_text()
    without_time = lambda text: {k: v for k, v in json.loads(text).items() if k != "seconds"}  # noqa: E731
    assert without_time(again) == without_time(first)
    curve = (repo / "plots" / "train.tsv").read_text().splitlines()
    assert len(curve) == 1 + 2  # header and the two epochs: a rerun starts its curves afresh
    set_params(repo, seed=7)
    ran = ran_stages(run(repo, "dvc", "repro").stdout)
    assert ran == list(STAGES[1:])  # every stage that draws random numbers, and evaluate
    assert without_time((repo / "metrics" / "train.json").read_text()) != without_time(first)


def test_outputs_deleted_by_hand_come_back_from_the_cache_without_retraining(
    tmp_path: Path,
) -> None:
    repo = local_repo(tmp_path)
    run(repo, "dvc", "repro")
    deleted = {
        path: (repo / path).read_bytes()
        for path in (
            "models/model.keras",
            "models/finetuned.keras",
            "metrics/train.json",
            "plots/train.tsv",
        )
    }
    for path in deleted:
        (repo / path).unlink()
    rerun = run(repo, "dvc", "repro")
    assert ran_stages(rerun.stdout) == []
    assert "Stage 'train' is cached - skipping run" in rerun.stdout
    for path, content in deleted.items():
        assert (repo / path).read_bytes() == content, path
    assert run(repo, "dvc", "status").stdout.strip() == "Data and pipelines are up to date."


@contextlib.contextmanager
def file_size_limit(size: int) -> Iterator[None]:
    """Writes beyond `size` bytes fail as on a full disk (EFBIG; Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_disk_full_while_saving_a_model_keeps_the_previous_file(tmp_path: Path) -> None:
    meta = {"image_size": 16, "mean": [0.0] * 3, "std": [1.0] * 3, "class_names": ["a", "b"]}
    model = build_model(
        ModelParams(arch="fastnet", widths=[4, 8, 8], weights="none", input_size=None), meta
    )
    path = tmp_path / "model.keras"
    with atomic_path(path) as tmp:
        model.save(tmp)
    good = path.read_bytes()
    with (
        file_size_limit(len(good) // 2),
        pytest.raises(PipelineError) as failure,
        atomic_path(path) as tmp,
    ):
        model.save(tmp)
    assert str(path) in str(failure.value) and "Free disk space" in str(failure.value)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["model.keras"]  # no temporary file left


def test_disk_full_while_writing_arrays_fails_the_stage_and_keeps_the_previous_data(
    tmp_path: Path,
) -> None:
    repo = local_repo(tmp_path)
    run(repo, "dvc", "repro", "preprocess")
    prepared = repo / "data" / "prepared"
    before = {path.name: path.read_bytes() for path in prepared.iterdir()}
    set_params(repo, seed=7)  # other splits: every array would change
    limit = min(len(content) for name, content in before.items() if name.endswith(".npz"))
    result = subprocess.run(
        [sys.executable, "-m", "stages.preprocess"],
        cwd=repo,
        env=venv_env(),
        capture_output=True,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit // 2, limit // 2)),
    )
    assert result.returncode == 1
    assert "data/prepared/" in result.stderr and "Free disk space" in result.stderr
    assert "Traceback" not in result.stderr
    assert {path.name: path.read_bytes() for path in prepared.iterdir()} == before


class FlakyArchive(BaseHTTPRequestHandler):
    """Serves `archive`; while `broken`, cuts every download off half-way."""

    archive = b""
    broken = True

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.archive)))
        self.end_headers()
        cls = type(self)
        self.wfile.write(cls.archive[: len(cls.archive) // 2] if cls.broken else cls.archive)
        self.wfile.flush()
        self.connection.close()

    def log_message(self, *args: object) -> None:
        pass


def test_download_cut_off_fails_the_stage_cleanly_and_a_rerun_succeeds(
    tmp_path: Path, http_server
) -> None:
    repo = local_repo(tmp_path)
    run(repo, "dvc", "repro", "preprocess")
    lock_before = (repo / "dvc.lock").read_text()
    FlakyArchive.archive = synthetic.tar_gz(
        tmp_path / "shapes", tmp_path / "shapes.tar.gz"
    ).read_bytes()
    url = http_server(handler=FlakyArchive) + "/shapes.tar.gz"
    set_params(repo, **{"data.source": url})

    failed = run(repo, "dvc", "repro", check=False)
    assert failed.returncode != 0
    assert f"error: {url}: download failed after 4 attempt(s)" in failed.stderr
    assert (repo / "dvc.lock").read_text() == lock_before
    assert not (repo / "data" / "raw").exists()
    assert [p.name for p in (repo / "data").iterdir() if p.name.startswith(".raw")] == []

    FlakyArchive.broken = False
    assert ran_stages(run(repo, "dvc", "repro", "download").stdout) == ["download"]
    assert (repo / "data" / "raw" / "shapes" / "train" / "red").is_dir()
