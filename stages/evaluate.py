"""Stage evaluate: score models/finetuned.keras on the test split and write metrics/eval.json
(accuracy, macro precision/recall/F1, per class; and the validation accuracy, scored the same
way, to choose settings by) and the plots: confusion matrix (DVC data and
heatmap), per-class scores, and the most confidently misclassified test images."""

from imageclf import evaluation, paths
from imageclf.datasets import load_split
from imageclf.errors import run_stage
from imageclf.fileio import write_json, write_text
from imageclf.models import class_names, load_model
from imageclf.params import load_params
from imageclf.plots import confusion_heatmap, image_grid, per_class_bars


def main() -> None:
    params = load_params()
    model = load_model(paths.FINETUNED)
    names = class_names(model)
    test, val = load_split(paths.PREPARED, "test"), load_split(paths.PREPARED, "val")

    # a model trained without mirror images may tell left from right: no mirrors at test time
    mirror = params.augment.flip != "none"
    if not mirror and params.evaluate.tta != "none":
        print("augment.flip is none: test-time augmentation leaves out mirror images")

    def score(images):
        return evaluation.predict(
            model, images, params.evaluate.batch_size, params.evaluate.tta, mirror
        )

    probabilities = score(test.images)
    predicted = probabilities.argmax(axis=1)
    summary = evaluation.summarize(test.labels, predicted, names)
    # settings are chosen by this figure, never by the test split's (README: Results): the
    # validation split with the same test-time augmentation as the test figures beside it
    per_class = summary.pop("per_class")
    summary["val_accuracy"] = evaluation.accuracy(val.labels, score(val.images).argmax(axis=1))
    summary["per_class"] = per_class
    write_json(paths.EVAL_METRICS, summary)
    print({key: summary[key] for key in ("accuracy", "precision", "recall", "f1", "val_accuracy")})

    plots = paths.PLOTS
    pairs = evaluation.confusion_pairs(test.labels, predicted, names)
    write_text(plots / "confusion.csv", pairs.to_csv(index=False))
    counts = evaluation.confusion_counts(test.labels, predicted, len(names))
    confusion_heatmap(counts, names, plots / "confusion.png")
    table = evaluation.per_class_table(summary)
    write_text(plots / "per_class.csv", table.to_csv())
    per_class_bars(table, plots / "per_class.png")

    mistakes = evaluation.most_confident_mistakes(
        test.labels, probabilities, params.evaluate.misclassified
    )
    image_grid(
        test.images[mistakes],
        [
            f"true: {names[test.labels[i]]}\n"
            f"pred: {names[predicted[i]]} {probabilities[i].max():.0%}"
            for i in mistakes
        ],
        plots / "misclassified.png",
        "Most confidently misclassified test images",
    )


if __name__ == "__main__":
    run_stage(main)
