"""Runs that go wrong: a training killed mid-way resumes, a failing stage keeps what came
before it, and reruns are reproducible. Real `dvc repro` in a temporary repository."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
import yaml

from imageclf.errors import PipelineError
from imageclf.fileio import atomic_path
from imageclf.models import build_model, load_model
from imageclf.params import ModelParams
from imageclf.training import EpochCheckpoint, stage_fingerprint
from tests import synthetic
from tests.repos import PROJECT, ran_stages, run, set_params, venv_env


def train_killed_mid_way(repo: Path, at_epoch: int) -> int:
    """Start `dvc repro -f -s train`, SIGKILL it once epoch `at_epoch` is checkpointed;
    returns the epoch of the last checkpoint it left."""
    backup = repo / "checkpoints" / "train" / "backup"
    process = subprocess.Popen(
        ["dvc", "repro", "-f", "-s", "train"],
        cwd=repo,
        env=venv_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if checkpointed_epoch(backup) >= at_epoch:
            break
        time.sleep(0.01)
    assert process.poll() is None, "training ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return checkpointed_epoch(backup)


def checkpointed_epoch(backup: Path) -> int:
    epochs = (
        [int(p.name[6:10]) for p in backup.glob("epoch-*.weights.h5")] if backup.is_dir() else []
    )
    return max(epochs, default=0)


def curve_steps(repo: Path, stage: str = "train") -> list[int]:
    rows = (repo / "plots" / f"{stage}.tsv").read_text().splitlines()[1:]
    return [int(row.split("\t")[0]) for row in rows]


def model_weights(path: Path) -> list[np.ndarray]:
    return [np.asarray(w) for w in load_model(path).weights]


def without_time(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "seconds"}


def test_killed_training_resumes_and_ends_as_an_uninterrupted_run(repo: Path) -> None:
    set_params(repo, **{"train.epochs": 12})
    run(repo, "dvc", "repro", "train")  # uninterrupted, for reference
    reference = model_weights(repo / "models" / "model.keras")
    reference_curves = (repo / "plots" / "train.tsv").read_text()
    reference_metrics = without_time(repo / "metrics" / "train.json")

    killed_at = train_killed_mid_way(repo, at_epoch=4)
    assert 4 <= killed_at < 12
    assert not (repo / "models" / "model.keras").exists()  # DVC removed it before the rerun
    seconds = json.loads((repo / "checkpoints" / "train" / "backup" / "seconds.json").read_text())
    rerun = run(repo, "dvc", "repro", "-f", "-s", "train")
    assert f"Resuming from epoch {killed_at} of 12" in rerun.stdout
    # the stage's time counts the killed run's epochs too
    killed_seconds = seconds[str(killed_at)]
    assert killed_seconds > 0
    assert json.loads((repo / "metrics" / "train.json").read_text())["seconds"] > killed_seconds
    assert not (repo / "checkpoints" / "train").exists()
    # the same model, metrics and curves as without the kill, every epoch exactly once
    for got, expected in zip(model_weights(repo / "models" / "model.keras"), reference):
        np.testing.assert_array_equal(got, expected)
    assert without_time(repo / "metrics" / "train.json") == reference_metrics
    assert curve_steps(repo) == list(range(12))
    assert (repo / "plots" / "train.tsv").read_text() == reference_curves


def test_killed_training_starts_over_when_a_param_changed(repo: Path) -> None:
    set_params(repo, **{"train.epochs": 12})
    killed_at = train_killed_mid_way(repo, at_epoch=4)
    assert killed_at >= 4
    # fewer epochs than the checkpoint reached, another learning rate: another run
    set_params(repo, **{"train.epochs": 3, "train.lr": 0.5, "train.warmup_epochs": 0.5})
    rerun = run(repo, "dvc", "repro", "train")  # the stages after it are not at stake here
    assert "belongs to a run with other params, data or code; starting over" in rerun.stdout
    assert "Resuming" not in rerun.stdout
    assert curve_steps(repo) == [0, 1, 2]
    assert {"accuracy", "val_accuracy", "lr"} <= set(
        json.loads((repo / "metrics" / "train.json").read_text())
    )
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["lr"] == 0.5


def test_checkpoint_of_another_run_or_unreadable_is_not_resumed(tmp_path: Path) -> None:
    meta = {"image_size": 16, "mean": [0.0] * 3, "std": [1.0] * 3, "class_names": ["a", "b"]}
    params = ModelParams(arch="fastnet", widths=[4, 8, 8], weights="none", input_size=None)
    model = build_model(params, meta)
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    folder = tmp_path / "backup"
    assert EpochCheckpoint(folder, "run A").restore(model) == 0  # nothing yet: a new folder
    saved = [np.asarray(w) for w in model.weights]
    model.save_weights(folder / "epoch-0001.weights.h5")
    (folder / "epoch-0002.weights.h5").write_bytes(b"cut off by a kill")

    other = build_model(params, meta)
    other.compile(optimizer="sgd", loss="categorical_crossentropy")
    with pytest.warns(UserWarning, match="epoch-0002.weights.h5: checkpoint unreadable"):
        assert EpochCheckpoint(folder, "run A").restore(other) == 1  # the one before
    for got, expected in zip(other.weights, saved):
        np.testing.assert_array_equal(np.asarray(got), expected)
    assert EpochCheckpoint(folder, "run B").restore(other) == 0
    assert [p.name for p in folder.iterdir()] == ["fingerprint"]


def test_fingerprint_follows_the_stage_params_and_deps_only(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copy(PROJECT / "dvc.yaml", "dvc.yaml")
    shutil.copy(PROJECT / "params.yaml", "params.yaml")
    Path("data/augmented").mkdir(parents=True)
    Path("data/augmented/train_000.npy").write_bytes(b"copy 0")
    first = stage_fingerprint("train")
    set_params(tmp_path, **{"evaluate.tta": "none"})  # not a train param
    assert stage_fingerprint("train") == first
    set_params(tmp_path, **{"train.label_smoothing": 0.0})
    changed_param = stage_fingerprint("train")
    assert changed_param != first
    Path("data/augmented/train_000.npy").write_bytes(b"copy 0, other seed")
    assert stage_fingerprint("train") not in (first, changed_param)


def locked_results(repo: Path) -> dict:
    """dvc.lock's stages that make results: check_params, which validates the params and
    makes nothing, is locked as soon as it passes, before a later stage fails."""
    stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    stages.pop("check_params")
    return stages


def test_failing_stage_under_dvc_repro_then_dvc_checkout_restores_the_last_good_outputs(
    repo: Path,
) -> None:
    good_model = (repo / "models" / "model.keras").read_bytes()
    lock_before = locked_results(repo)
    # a weights file that is not there: train fails once it runs, after DVC removed its outputs
    set_params(repo, **{"model.weights": "pretrained/missing.keras"})
    failed = run(repo, "dvc", "repro", check=False)
    assert failed.returncode != 0
    assert "model.weights: pretrained/missing.keras does not exist" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert locked_results(repo) == lock_before
    assert (repo / "data" / "augmented").is_dir() and (repo / "data" / "prepared").is_dir()
    # DVC removed the stage's outputs before running it: the last good ones come back from
    # the DVC cache (models, data) and from git (metrics and plots, `cache: false`)
    set_params(repo, **{"model.weights": "none"})
    run(repo, "dvc", "checkout")
    run(repo, "git", "checkout", "--", "metrics", "plots")
    assert (repo / "models" / "model.keras").read_bytes() == good_model
    # check_params locked the failed run's params; it alone runs again, nothing retrains
    assert ran_stages(run(repo, "dvc", "repro").stdout) == []
    assert run(repo, "dvc", "status").stdout.strip() == "Data and pipelines are up to date."


def test_bad_params_fail_with_their_key_and_once_fixed_nothing_retrains(repo: Path) -> None:
    set_params(repo, **{"model.arch": "resnet9000"})
    failed = run(repo, "dvc", "repro", check=False)
    assert failed.returncode != 0
    assert "model.arch = 'resnet9000': must be one of" in failed.stderr + failed.stdout
    set_params(repo, **{"model.arch": "fastnet"})
    assert ran_stages(run(repo, "dvc", "repro").stdout) == []


def test_a_misspelled_section_fails_dvc_repro_though_no_stage_reads_it(repo: Path) -> None:
    # no stage declares `trian`, so without check_params DVC would say "up to date"
    set_params(repo, trian={"epochs": 3})
    failed = run(repo, "dvc", "repro", check=False)
    assert failed.returncode != 0
    assert "trian: unknown key" in failed.stderr + failed.stdout
    assert ran_stages(failed.stdout) == []
    params = yaml.safe_load((repo / "params.yaml").read_text())
    del params["trian"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran_stages(run(repo, "dvc", "repro").stdout) == []


def test_same_params_same_results_other_seed_other_results(repo: Path) -> None:
    before = {
        name: without_time(repo / "metrics" / f"{name}.json")
        for name in ("train", "finetune", "eval")
    }
    forced = run(repo, "dvc", "repro", "-f", "-s", "train")
    assert ran_stages(forced.stdout) == ["train"]
    run(repo, "dvc", "repro", "evaluate")  # not export: its metrics are not compared here
    for name, metrics in before.items():
        assert without_time(repo / "metrics" / f"{name}.json") == metrics, name
    assert curve_steps(repo) == [0, 1]  # a rerun starts its curves afresh
    set_params(repo, seed=7)
    # every stage that draws random numbers reads the seed (and what follows them reruns)
    status = yaml.safe_load(run(repo, "dvc", "status", "--json").stdout)
    reading_seed = [stage for stage, changes in status.items() if "'seed'" in str(changes)]
    assert sorted(reading_seed) == ["augment", "check_params", "finetune", "preprocess", "train"]
    assert ran_stages(run(repo, "dvc", "repro", "train").stdout) == [
        "preprocess",
        "augment",
        "train",
    ]
    assert without_time(repo / "metrics" / "train.json") != before["train"]


def test_outputs_deleted_by_hand_come_back_from_the_cache_without_retraining(repo: Path) -> None:
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
    repo: Path,
) -> None:
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
    repo: Path, tmp_path: Path, http_server
) -> None:
    lock_before = locked_results(repo)
    FlakyArchive.archive = synthetic.tar_gz(
        tmp_path / "shapes",
        tmp_path / "shapes.tar.gz",  # the dataset next to the copy
    ).read_bytes()
    url = http_server(handler=FlakyArchive) + "/shapes.tar.gz"
    set_params(repo, **{"data.source": url})

    failed = run(repo, "dvc", "repro", check=False)
    assert failed.returncode != 0
    assert f"error: {url}: download failed after 4 attempt(s)" in failed.stderr
    assert locked_results(repo) == lock_before
    assert not (repo / "data" / "raw").exists()
    assert [p.name for p in (repo / "data").iterdir() if p.name.startswith(".raw")] == []

    FlakyArchive.broken = False
    assert ran_stages(run(repo, "dvc", "repro", "download").stdout) == ["download"]
    assert (repo / "data" / "raw" / "shapes" / "train" / "red").is_dir()
