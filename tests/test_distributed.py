"""Training beyond one process: tf.distribute's MultiWorkerMirroredStrategy with a chief and a
worker on 127.0.0.1, started the way README says (the chief runs `dvc repro`, the worker runs
the training stages with its own TF_CONFIG). MirroredStrategy: tests/test_models.py."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from imageclf.errors import PipelineError
from imageclf.params import load_params
from imageclf.training import configure_runtime
from tests.repos import PROJECT, commit_all, copy_repo, ran_stages, run, set_params, venv_env

WORKER_COMMAND = "python -m stages.train && python -m stages.finetune"  # as README says


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def tf_config(cluster: dict, task_type: str) -> str:
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": 0}})


def test_chief_and_worker_train_together_and_only_the_chief_writes_outputs(
    repo: Path, tmp_path: Path
) -> None:
    # long enough for both runs to learn the tiny dataset, so that their accuracies compare
    set_params(repo, **{"train.epochs": 6, "train.threads": 1})
    run(repo, "dvc", "repro", "evaluate")
    single = json.loads((repo / "metrics" / "eval.json").read_text())
    single_train = json.loads((repo / "metrics" / "train.json").read_text())
    set_params(repo, **{"train.distribute": "multi_worker"})
    commit_all(repo, "two workers")
    # the worker's machine: its own clone, with the same data (here: copied with the cache)
    worker_repo = copy_repo(repo, tmp_path / "worker")
    outputs = ("models/model.keras", "models/finetuned.keras", "metrics/train.json")
    before = {output: (worker_repo / output).read_bytes() for output in outputs}
    chief_port, worker_port = free_ports(2)
    cluster = {"chief": [f"127.0.0.1:{chief_port}"], "worker": [f"127.0.0.1:{worker_port}"]}
    worker = subprocess.Popen(
        ["bash", "-c", WORKER_COMMAND],
        cwd=worker_repo,
        env={**venv_env(), "TF_CONFIG": tf_config(cluster, "worker")},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        chief = subprocess.run(
            ["dvc", "repro", "evaluate"],  # export has nothing to do with training
            cwd=repo,
            env={**venv_env(), "TF_CONFIG": tf_config(cluster, "chief")},
            capture_output=True,
            text=True,
            timeout=600,
        )
        worker_output, _ = worker.communicate(timeout=120)
    finally:
        worker.kill()
    assert chief.returncode == 0, chief.stdout[-3000:] + chief.stderr[-3000:]
    assert worker.returncode == 0, worker_output[-3000:]
    assert ran_stages(chief.stdout) == ["train", "finetune", "evaluate"]

    # the worker wrote none of the stage's outputs, and its scratch folder is gone
    assert {output: (worker_repo / output).read_bytes() for output in outputs} == before
    assert not (worker_repo / "checkpoints" / "worker-0").exists()
    assert "train" not in run(repo, "dvc", "status", "evaluate").stdout

    # Each worker normalizes with BatchNorm statistics of its half of every global batch (not
    # of the whole batch, as one process does), and the gradients are summed in another order:
    # the same recipe, not the same numbers. On this tiny, easy dataset (3 colour classes) a
    # model that trains as well as the single process's still classifies (nearly) all images.
    multi = json.loads((repo / "metrics" / "eval.json").read_text())
    multi_train = json.loads((repo / "metrics" / "train.json").read_text())
    assert multi["accuracy"] >= single["accuracy"] - 0.1, (multi, single)
    assert abs(multi_train["val_loss"] - single_train["val_loss"]) < 0.25
    curves = (repo / "plots" / "train.tsv").read_text().splitlines()
    assert len(curves) == 1 + 6  # header + one row per epoch, written once by the chief


def test_multi_worker_without_tf_config_says_what_to_set(monkeypatch) -> None:
    monkeypatch.delenv("TF_CONFIG", raising=False)
    params = load_params(PROJECT / "params.yaml").train
    params = params.model_copy(update={"distribute": "multi_worker"})
    with pytest.raises(PipelineError, match="TF_CONFIG is not set.*Training on several machines"):
        configure_runtime(params, seed=0)
