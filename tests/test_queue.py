"""Experiment grids through DVC's queue, as README shows them: a 2x2 grid of params queued with
`dvc exp run --queue`, run by two workers (`dvc queue start -j 2`), then compared with
`dvc exp show --only-changed` and `dvc plots diff`. Queued experiments run in temporary copies
of the repository (`.dvc/tmp/exps/`), which see only what git and DVC track."""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import time
from pathlib import Path

import yaml

from tests import synthetic
from tests.repos import run

# The grid: finetune.lr reruns finetune and evaluate, evaluate.tta evaluate only. A grid over
# train.lr and augment.copies (README) works the same way, with a TensorFlow start or two more
# per experiment.
FINETUNE_LRS = ("0.01", "0.05")
TTAS = ("none", "flip")
PENDING = ("Queued", "Running")  # statuses of `dvc queue status` before an experiment is done


def queue_states(repo: Path) -> dict[str, str]:
    """Each queued experiment's name and status (Queued, Running, Success, Failed), from
    `dvc queue status`."""
    states: dict[str, str] = {}
    for line in run(repo, "dvc", "queue", "status").stdout.splitlines()[1:]:
        fields = line.split()
        # rows: task id, name, creation time (one or more words), status
        if len(fields) >= 4 and not line.startswith("Worker status"):
            states[fields[1]] = fields[-1]
    return states


def run_queue(repo: Path, jobs: int, timeout: float = 900) -> dict[str, str]:
    """`dvc queue start -j jobs`, then wait until nothing is queued or running; returns each
    experiment's final status. On a timeout (or any error while waiting) the workers and their
    experiments are killed, so that nothing keeps running after the test."""
    run(repo, "dvc", "queue", "start", "-j", str(jobs))
    deadline = time.monotonic() + timeout
    try:
        while True:
            time.sleep(3)
            states = queue_states(repo)
            if not any(state in PENDING for state in states.values()):
                return states
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue not done after {timeout:.0f} s: {states}")
    except BaseException:
        run(repo, "dvc", "queue", "stop", "--kill", check=False)
        raise


def exp_table(repo: Path, *options: str) -> list[dict[str, str]]:
    table = run(repo, "dvc", "exp", "show", "--no-pager", "--csv", *options).stdout
    return list(csv.DictReader(io.StringIO(table)))


def plot_data(page: str, plot: str) -> list[dict[str, str]]:
    """The rows DVC drew in one plot of a `dvc plots` page (its Vega-Lite spec's data)."""
    spec = re.search(rf"var spec = (\{{.*\}});\s*vegaEmbed\('#{plot}'", page)
    assert spec, f"no plot {plot} on the page"
    return json.loads(spec.group(1))["data"]["values"]


def test_grid_runs_in_parallel_and_compares(repo: Path) -> None:
    committed = yaml.safe_load((repo / "params.yaml").read_text())
    assert str(committed["finetune"]["lr"]) in FINETUNE_LRS  # half the grid keeps its model
    assert committed["evaluate"]["tta"] not in TTAS  # every experiment differs from the commit
    # up to evaluate: export is not compared here, and it would add a TensorFlow start and a
    # TFLite conversion to each run with a new model
    run(repo, "dvc", "exp", "run", "--queue", "-S", f"finetune.lr={','.join(FINETUNE_LRS)}",
        "-S", f"evaluate.tta={','.join(TTAS)}", "evaluate")  # fmt: skip
    states = run_queue(repo, jobs=2)
    assert len(states) == 4 and set(states.values()) == {"Success"}, states

    # --only-changed leaves out what every row shares: params, and metrics when the tiny
    # dataset gives every run the same accuracy, so the metrics come from the whole table
    assert "train.lr" not in exp_table(repo, "--only-changed")[0]
    rows = exp_table(repo)
    commit = next(row for row in rows if row["typ"] == "baseline" and row["rev"] != "workspace")
    experiments = {row["Experiment"]: row for row in rows if row["Experiment"] in states}
    # each combination of the grid ran once, and the table shows what it ran with
    ran = [(row["finetune.lr"], row["evaluate.tta"]) for row in experiments.values()]
    assert sorted(ran) == sorted(itertools.product(FINETUNE_LRS, TTAS))
    for name, row in experiments.items():
        # with the metrics the run wrote
        metrics = json.loads(run(repo, "git", "show", f"{row['rev']}:metrics/eval.json").stdout)
        assert float(row["metrics/eval.json:accuracy"]) == metrics["accuracy"]
        # Only the stages whose params changed ran. The dataset (../shapes) is outside the
        # repository, out of the temporary copy's reach: download did not need to rerun, and
        # the data came from the DVC cache.
        log = run(repo, "dvc", "queue", "logs", name).stdout
        for stage in ("download", "preprocess", "augment", "train"):
            assert f"Stage '{stage}' didn't change, skipping" in log, (name, log)
        same_lr = row["finetune.lr"] == str(committed["finetune"]["lr"])
        kept_model = "Stage 'finetune' didn't change, skipping" in log
        assert kept_model == same_lr, (name, log)
        finetune_loss = row["metrics/finetune.json:loss"]
        assert (finetune_loss == commit["metrics/finetune.json:loss"]) == same_lr, name
        assert "Running stage 'evaluate'" in log, (name, log)

    # one page with the curves of all four experiments, each run's own numbers
    run(repo, "dvc", "plots", "diff", *experiments, "-o", "grid_page")
    page = (repo / "grid_page" / "index.html").read_text()
    loss = plot_data(page, "Loss")
    for name, row in experiments.items():
        curves = run(repo, "git", "show", f"{row['rev']}:plots/finetune.tsv").stdout
        val_loss = [
            epoch["val_loss"] for epoch in csv.DictReader(io.StringIO(curves), delimiter="\t")
        ]
        drawn = [
            point["dvc_inferred_y_value"]
            for point in loss
            if point["rev"] == name
            and point["filename"] == "finetune.tsv"
            and point["field"] == "val_loss"
        ]
        assert drawn == val_loss, name
        assert (repo / "grid_page" / "static" / f"{name}_plots_confusion.png").is_file()


def test_queued_experiment_needs_an_absolute_path_to_data_outside_the_repository(
    repo: Path,
) -> None:
    """A queued experiment runs in `.dvc/tmp/exps/<run>/`: a data.source relative to the
    repository that points outside it is not there; an absolute path is (README)."""
    synthetic.image_folders(repo.parent / "more", per_class=4, test_per_class=2)
    absolute = str((repo.parent / "more").resolve())
    for name, source in (("relative", "../more"), ("absolute", absolute)):
        run(repo, "dvc", "exp", "run", "--queue", "-n", name, "-S", f"data.source={source}",
            "download")  # fmt: skip
    states = run_queue(repo, jobs=2)
    assert states == {"relative": "Failed", "absolute": "Success"}
    log = run(repo, "dvc", "queue", "logs", "relative").stdout
    assert "error: data.source: ../more" in log, log  # the stage's message, naming the source
    assert "Running stage 'download'" in run(repo, "dvc", "queue", "logs", "absolute").stdout
