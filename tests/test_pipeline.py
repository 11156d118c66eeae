"""The real pipeline: `dvc repro` in a temporary git repository on a tiny synthetic dataset,
then what a user's next commands rerun (the dataset moved to an HTTP server, a param changed,
an experiment)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import yaml

from tests import synthetic
from tests.repos import commit_all, ran_stages, run, set_params, sha256


def test_first_run_gives_every_output_and_reruns_run_only_what_changed(
    repo: Path, tmp_path: Path, http_server
) -> None:
    # `repo` is a copy of `finished_repo`, where one `dvc repro` ran every stage
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

    # nothing changed: nothing runs
    assert ran_stages(run(repo, "dvc", "repro").stdout) == []

    # the same dataset, now an image-folder archive on an HTTP server: download runs again, and
    # preprocess (the archive unpacks under its top folder, `shapes/`); their splits are the
    # same as before, so nothing after them runs
    served = tmp_path / "served"
    served.mkdir()
    archive = synthetic.tar_gz(repo.parent / "shapes", served / "shapes.tar.gz")
    set_params(
        repo,
        **{"data.source": f"{http_server(served)}/shapes.tar.gz", "data.checksum": sha256(archive)},
    )
    assert ran_stages(run(repo, "dvc", "repro").stdout) == ["download", "preprocess"]
    assert (repo / "data" / "raw" / "shapes" / "train" / "red").is_dir()
    commit_all(repo, "the dataset from a server")

    # a param only evaluate reads: only evaluate runs
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["tta"] = "none"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran_stages(run(repo, "dvc", "repro").stdout) == ["evaluate"]
    committed_accuracy = json.loads((repo / "metrics" / "eval.json").read_text())["accuracy"]
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
        "Train stage at its last epoch",
    ):
        assert title in page, title
    commit_all(repo, "no tta")

    # training without mirror images also takes them out of evaluate's test-time augmentation
    set_params(repo, **{"augment.flip": "none"})
    status = yaml.safe_load(run(repo, "dvc", "status", "--json").stdout)
    assert "augment.flip" in str(status["evaluate"]), status["evaluate"]
    run(repo, "git", "checkout", "params.yaml")

    # an experiment on a training param reruns training and what follows it, nothing before
    experiment = run(repo, "dvc", "exp", "run", "-n", "three-epochs", "-S", "train.epochs=3")
    assert ran_stages(experiment.stdout) == ["train", "finetune", "evaluate", "export"]
    table = run(repo, "dvc", "exp", "show", "--no-pager", "--csv").stdout
    rows = {row["Experiment"] or row["rev"]: row for row in csv.DictReader(io.StringIO(table))}
    accuracy = json.loads((repo / "metrics" / "eval.json").read_text())["accuracy"]
    # the workspace holds the experiment's results; the commit before it, the first run's
    commit = next(
        row
        for row in rows.values()
        if row["typ"] == "baseline" and row is not rows.get("workspace")
    )
    assert rows["three-epochs"]["train.epochs"] == rows["workspace"]["train.epochs"] == "3"
    assert rows["three-epochs"]["metrics/eval.json:accuracy"] == str(accuracy)
    assert commit["train.epochs"] == "2"
    assert commit["metrics/eval.json:accuracy"] == str(committed_accuracy)
