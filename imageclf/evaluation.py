"""Test-set evaluation: predictions (with optional mirror and shift test-time augmentation),
scikit-learn metrics, and the data behind the confusion and per-class plots."""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from imageclf.augment import shift


def predict(
    model: keras.Model,
    images: np.ndarray,
    batch_size: int,
    tta: str = "none",
    mirror: bool = True,
) -> np.ndarray:
    """Class probabilities of `images`, with test-time augmentation `tta` (airbench's levels):
    "none"; "flip": the mean over each image and its horizontal mirror; "translate": half that,
    half the same mean over copies shifted by one pixel up-left and down-right.

    `mirror`: whether a mirror image shows the same class. A model trained without flips
    (augment.flip: none, as for classes that differ by left and right) gets no mirror views:
    "flip" is then "none", and "translate" averages the shifts alone."""

    def with_mirror(views: np.ndarray) -> np.ndarray:
        plain = model.predict(views, batch_size=batch_size, verbose=0)
        if tta == "none" or not mirror:
            return plain
        return (plain + model.predict(views[:, :, ::-1], batch_size=batch_size, verbose=0)) / 2

    probabilities = with_mirror(images)
    if tta == "translate":
        shifted = [with_mirror(shift(images, d, d)) for d in (-1, 1)]
        probabilities = (probabilities + (shifted[0] + shifted[1]) / 2) / 2
    return probabilities


def accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    """The share of correct predictions, rounded as every figure of metrics/eval.json."""
    return round(float(accuracy_score(labels, predicted)), 4)


def summarize(labels: np.ndarray, predicted: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy and macro precision, recall, F1, plus the same per class, rounded for diffs."""
    classes = np.arange(len(class_names))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=classes, zero_division=0
    )
    macro = precision_recall_fscore_support(
        labels, predicted, labels=classes, average="macro", zero_division=0
    )
    return {
        "accuracy": accuracy(labels, predicted),
        "precision": round(float(macro[0]), 4),
        "recall": round(float(macro[1]), 4),
        "f1": round(float(macro[2]), 4),
        "per_class": {
            name: {
                "precision": round(float(p), 4),
                "recall": round(float(r), 4),
                "f1": round(float(f), 4),
                "support": int(s),
            }
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support)
        },
    }


def per_class_table(summary: dict) -> pd.DataFrame:
    table = pd.DataFrame.from_dict(summary["per_class"], orient="index")
    table.index.name = "class"
    return table


def confusion_pairs(
    labels: np.ndarray, predicted: np.ndarray, class_names: list[str]
) -> pd.DataFrame:
    """One row per test image, as DVC's confusion template reads it."""
    names = np.asarray(class_names)
    return pd.DataFrame({"actual": names[labels], "predicted": names[predicted]})


def confusion_counts(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    return confusion_matrix(labels, predicted, labels=np.arange(num_classes))


def most_confident_mistakes(
    labels: np.ndarray, probabilities: np.ndarray, count: int
) -> np.ndarray:
    """Indices of the misclassified images with the highest predicted probability, best first."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probabilities[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:count]
