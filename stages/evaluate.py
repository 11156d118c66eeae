"""Stage evaluate: score models/finetuned.keras on the test split and write metrics/eval.json
(accuracy, macro precision/recall/F1, per class) and the plots: confusion matrix (DVC data and
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
    test = load_split(paths.PREPARED, "test")

    # a model trained without mirror images may tell left from right: no mirrors at test time
    mirror = params.augment.flip != "none"
    if not mirror and params.evaluate.tta != "none":
        print("augment.flip is none: test-time augmentation leaves out mirror images")
    probabilities = evaluation.predict(
        model, test.images, params.evaluate.batch_size, params.evaluate.tta, mirror
    )
    predicted = probabilities.argmax(axis=1)
    summary = evaluation.summarize(test.labels, predicted, names)
    write_json(paths.EVAL_METRICS, summary)
    print({key: summary[key] for key in ("accuracy", "precision", "recall", "f1")})

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
