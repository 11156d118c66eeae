"""Temporary git + DVC repositories running the project's real pipeline on tiny data, and the
commands tests run in them (`dvc`, `git`, `imageclf`) with the test run's virtual environment."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests import synthetic

PROJECT = Path(__file__).resolve().parents[1]
STAGES = ("download", "preprocess", "augment", "train", "finetune", "evaluate", "export")
# what a repository needs of the project to run the pipeline
PIPELINE_FILES = ("dvc.yaml", "stages", "imageclf", ".dvc/plots", "pretrained")


def venv_env() -> dict[str, str]:
    return {
        **os.environ,
        # the venv running the tests provides python, dvc, imageclf and the libraries
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
    run(repo, "git", "init", "-q")
    run(repo, "git", "config", "user.email", "test@example.com")
    run(repo, "git", "config", "user.name", "test")
    run(repo, "dvc", "init", "-q")  # before the copy: it would replace .dvc/plots
    for name in PIPELINE_FILES:
        source_path = PROJECT / name
        if source_path.is_dir():
            shutil.copytree(
                source_path,
                repo / name,
                ignore=shutil.ignore_patterns("__pycache__"),
                dirs_exist_ok=True,
            )
        elif source_path.is_file():
            shutil.copy(source_path, repo / name)
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["data"].update(source=source, checksum=checksum, image_size=16)
    params["preprocess"]["val_fraction"] = 0.2
    params["augment"]["copies"] = 2
    params["model"]["widths"] = [4, 8, 8]
    # SGD: the default Muon, tuned for 256-wide convolutions, left these 4-8-wide ones unsure
    # of the synthetic colours after 2 epochs; tests/test_models.py covers Muon
    params["train"].update(epochs=2, batch_size=16, warmup_epochs=1.0, optimizer="sgd")
    params["finetune"]["epochs"] = 1
    params["evaluate"]["misclassified"] = 6
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_all(repo, "pipeline")
    return repo


def local_repo(root: Path) -> Path:
    """A repository whose data source is a tiny image-folder dataset on local disk."""
    synthetic.image_folders(root / "shapes", per_class=30, test_per_class=8)
    # relative to the repository, so that `copy_repo` copies stay self-contained
    return make_repo(root, "../shapes", None)


def copy_repo(repo: Path, root: Path) -> Path:
    """A copy of `repo` (work tree, git history, DVC cache) at `root/repo`, to change freely."""
    copy = root / "repo"
    shutil.copytree(repo, copy, symlinks=True)
    source = repo.parent / "shapes"  # the dataset of `local_repo`, at the same relative path
    if source.is_dir() and not (root / "shapes").exists():
        shutil.copytree(source, root / "shapes")
    return copy


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


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def commit_all(repo: Path, message: str) -> None:
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", message)
