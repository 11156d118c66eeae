"""The real pipeline: `dvc repro` in a temporary git repository, on tiny synthetic datasets
served over HTTP from 127.0.0.1, in both supported layouts."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests import synthetic

PROJECT = Path(__file__).resolve().parents[1]
STAGES = ("download", "preprocess", "augment", "train", "finetune", "evaluate")


def venv_env() -> dict[str, str]:
    return {
        **os.environ,
        # the venv running the tests provides python, dvc and the libraries
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


def run(repo: Path, *command: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=repo, env=venv_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def ran_stages(output: str) -> list[str]:
    return [stage for stage in STAGES if f"Running stage '{stage}'" in output]


def make_repo(root: Path, source: str, checksum: str | None) -> Path:
    """A fresh git + DVC repository with the project's pipeline and tiny-data params."""
    repo = root / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "stages", "imageclf"):
        source_path = PROJECT / name
        if source_path.is_dir():
            shutil.copytree(source_path, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source_path, repo / name)
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["data"].update(source=source, checksum=checksum, image_size=16)
    params["preprocess"]["val_fraction"] = 0.2
    params["augment"]["copies"] = 2
    params["model"]["widths"] = [4, 8, 8]
    params["train"].update(epochs=2, batch_size=16)
    params["evaluate"]["misclassified"] = 6
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(repo, "git", "init", "-q")
    run(repo, "git", "config", "user.email", "test@example.com")
    run(repo, "git", "config", "user.name", "test")
    run(repo, "dvc", "init", "-q")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "pipeline")
    return repo


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def commit_all(repo: Path, message: str) -> None:
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", message)


def test_image_folder_dataset_over_http(tmp_path: Path, http_server) -> None:
    served = tmp_path / "served"
    served.mkdir()
    dataset = synthetic.image_folders(tmp_path / "shapes", per_class=30, test_per_class=8)
    archive = synthetic.tar_gz(dataset, served / "shapes.tar.gz")
    repo = make_repo(tmp_path, f"{http_server(served)}/shapes.tar.gz", sha256(archive))

    first = run(repo, "dvc", "repro")
    assert ran_stages(first.stdout) == list(STAGES)
    metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    for key in ("accuracy", "precision", "recall", "f1"):
        assert 0 <= metrics[key] <= 1
    assert sorted(metrics["per_class"]) == sorted(synthetic.CLASSES)
    assert metrics["accuracy"] > 0.5  # colour classes are easy: well above chance (1/3)
    for name in ("train", "finetune"):
        stage_metrics = json.loads((repo / "metrics" / f"{name}.json").read_text())
        assert stage_metrics["seconds"] > 0 and "val_accuracy" in stage_metrics
    for png in ("confusion", "per_class", "misclassified", "augment_samples"):
        assert (repo / "plots" / f"{png}.png").stat().st_size > 1000
    confusion = (repo / "plots" / "confusion.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) == 1 + 24
    shown = run(repo, "dvc", "metrics", "show").stdout
    assert "metrics/eval.json" in shown and "accuracy" in shown
    commit_all(repo, "first run")

    # nothing changed: nothing runs
    assert ran_stages(run(repo, "dvc", "repro").stdout) == []

    # a param only evaluate reads: only evaluate runs
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["tta"] = "none"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran_stages(run(repo, "dvc", "repro").stdout) == ["evaluate"]
    diff = run(repo, "dvc", "metrics", "diff", "--all").stdout
    assert "metrics/eval.json" in diff and "accuracy" in diff

    # plots render as one HTML page
    run(repo, "dvc", "plots", "show", "-o", "page")
    page = (repo / "page" / "index.html").read_text()
    for title in (
        "Loss per epoch",
        "Accuracy per epoch",
        "Learning rate",
        "Confusion matrix, test split",
        "F1 per class, test split",
        "Validation accuracy per epoch, train stage",
    ):
        assert title in page, title
    commit_all(repo, "no tta")

    # an experiment on a training param reruns training and what follows it, nothing before
    experiment = run(repo, "dvc", "exp", "run", "-S", "train.epochs=3")
    assert ran_stages(experiment.stdout) == ["train", "finetune", "evaluate"]
    table = run(repo, "dvc", "exp", "show", "--no-pager", "--csv").stdout
    assert "train.epochs" in table and re.search(r"^.*,3,", table, re.MULTILINE)


def test_cifar_batches_dataset_over_http(tmp_path: Path, http_server) -> None:
    served = tmp_path / "served"
    served.mkdir()
    batches = synthetic.cifar_batches(tmp_path / "cifar-10-batches-py")
    synthetic.tar_gz(batches, served / "cifar-10-python.tar.gz")
    repo = make_repo(tmp_path, f"{http_server(served)}/cifar-10-python.tar.gz", None)
    assert ran_stages(run(repo, "dvc", "repro").stdout) == list(STAGES)
    metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    assert list(metrics["per_class"]) == list(synthetic.CLASSES)  # names from batches.meta
    meta = json.loads((repo / "data" / "prepared" / "meta.json").read_text())
    assert meta["counts"]["test"] == {name: 8 for name in synthetic.CLASSES}
