"""What users look at: the `dvc plots show` / `dvc plots diff` page, rendered in headless
Chromium. Every plot is drawn and every image loaded, and the curves can be read at a glance: a
colour per stage and field, a dash pattern per revision, integer epochs."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from tests import browser
from tests.repos import commit_all, run, set_params

PLOTS = {
    "Loss": "Loss per epoch (train and validation), train then finetune",
    "Accuracy": "Accuracy per epoch (train and validation), train then finetune",
    "Learning-rate": "Learning rate at the end of each epoch",
    "plots_train_tsv": "Train stage at its last epoch",
    "plots_finetune_tsv": "Finetune stage at its last epoch",
    "plots_confusion_csv": "Confusion matrix, test split",
    "plots_per_class_csv": "F1 per class, test split",
}
OVERLAYS = ("Loss", "Accuracy")  # train and validation, of the train and finetune stages
CURVES = (*OVERLAYS, "Learning-rate")
IMAGES = ("augment_samples", "confusion", "misclassified", "per_class")


def render_page(repo: Path, *command: str) -> dict:
    """`dvc plots <command>` rendered in Chromium, once checked that everything on it drew."""
    out = f"{command[0]}_page"
    run(repo, "dvc", "plots", *command, "-o", out)
    page = repo / out / "index.html"
    html = page.read_text()
    for title in PLOTS.values():
        assert title in html, title
    rendered = browser.render(page)
    assert rendered["plots"] == dict.fromkeys(PLOTS, True)
    drawn_images = [src for src, ok in rendered["images"].items() if ok]
    assert len(drawn_images) == len(rendered["images"])
    for name in IMAGES:
        assert any(name in src for src in drawn_images), name
    # curves only where both stages show: the per-stage plots are numbers, not 1-2 points
    assert {plot for plot, lines in rendered["lines"].items() if lines} == set(CURVES)
    return rendered


def epoch_labels(rendered: dict, plot: str) -> list[str]:
    (labels,) = [
        a["labels"] for a in rendered["axes"][plot] if a["orient"] == "bottom" and a["labels"]
    ]
    return labels


@pytest.mark.skipif(browser.missing_tools() is not None, reason=str(browser.missing_tools()))
def test_plots_page_draws_runs_apart_in_chromium(repo: Path) -> None:
    # a second revision of the curves: one more train epoch (train and finetune rerun; the
    # stages after them draw no curves)
    set_params(repo, **{"train.epochs": 3})
    run(repo, "dvc", "repro", "finetune")
    commit_all(repo, "one more train epoch")

    shown = render_page(repo, "show")
    for plot in OVERLAYS:
        lines = shown["lines"][plot]
        assert len({line["stroke"] for line in lines}) >= 4, lines
    # both stages' learning-rate schedules, though finetune's is 20x below train's
    assert len({line["stroke"] for line in shown["lines"]["Learning-rate"]}) == 2
    for plot in CURVES:
        labels = epoch_labels(shown, plot)
        # with fractional ticks, integer labels would repeat (0, 0, 1, 1, ...)
        assert all(label.isdigit() for label in labels), labels
        assert len(set(labels)) == len(labels) > 1, labels

    # the committed run against the one before it: both drawn, told apart by dash pattern
    diffed = render_page(repo, "diff", "HEAD~1")
    for plot in CURVES:
        by_rev: dict[str, list[dict]] = defaultdict(list)
        for line in diffed["lines"][plot]:
            (rev,) = line["revs"]
            by_rev[rev].append(line)
        assert set(by_rev) == {"HEAD~1", "workspace"}, plot
        dashes = {rev: {line["dash"] for line in lines} for rev, lines in by_rev.items()}
        assert all(len(dash) == 1 for dash in dashes.values()), dashes
        assert dashes["HEAD~1"] != dashes["workspace"]
        colours = {rev: {line["stroke"] for line in lines} for rev, lines in by_rev.items()}
        assert colours["HEAD~1"] == colours["workspace"]
        # each revision's own curves: the later run has one more train epoch
        points = {rev: sum(line["points"] for line in lines) for rev, lines in by_rev.items()}
        assert points["workspace"] > points["HEAD~1"], points
    for plot in ("plots_train_tsv", "plots_finetune_tsv"):
        (columns,) = [a["labels"] for a in diffed["axes"][plot] if a["orient"] == "top"]
        assert sorted(columns) == ["HEAD~1", "workspace"], columns
