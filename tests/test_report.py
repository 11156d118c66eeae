"""What users look at: the `dvc plots show` / `dvc plots diff` page, rendered in headless
Chromium, with every plot drawn and every image loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests import browser
from tests.test_faults import local_repo
from tests.test_pipeline import commit_all, run

PLOTS = {
    "Loss": "Loss per epoch (train and validation), train then finetune",
    "Accuracy": "Accuracy per epoch (train and validation), train then finetune",
    "Learning-rate": "Learning rate at the end of each epoch",
    "plots_train_tsv": "Validation accuracy per epoch, train stage",
    "plots_finetune_tsv": "Validation accuracy per epoch, finetune stage",
    "plots_confusion_csv": "Confusion matrix, test split",
    "plots_per_class_csv": "F1 per class, test split",
}
IMAGES = ("augment_samples", "confusion", "misclassified", "per_class")


@pytest.mark.skipif(browser.missing_tools() is not None, reason=str(browser.missing_tools()))
def test_plots_page_draws_every_plot_in_chromium(tmp_path: Path) -> None:
    repo = local_repo(tmp_path)
    run(repo, "dvc", "repro")
    commit_all(repo, "first run")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["tta"] = "none"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(repo, "dvc", "repro")

    for command, page in (("show", "shown"), ("diff", "diffed")):
        run(repo, "dvc", "plots", command, "-o", page)
        html = (repo / page / "index.html").read_text()
        for title in PLOTS.values():
            assert title in html, title
        rendered = browser.render(repo / page / "index.html")
        assert rendered["plots"] == dict.fromkeys(PLOTS, True)
        drawn_images = [src for src, ok in rendered["images"].items() if ok]
        assert len(drawn_images) == len(rendered["images"])
        for name in IMAGES:
            assert any(name in src for src in drawn_images), name

    # the diff page compares the committed run with the workspace
    html = (repo / "diffed" / "index.html").read_text()
    spec = html.split("vegaEmbed('#plots_confusion_csv'")[0].rsplit("var spec = ", 1)[1]
    revisions = {point["rev"] for point in json.loads(spec.strip().rstrip(";"))["data"]["values"]}
    assert revisions == {"HEAD", "workspace"}
