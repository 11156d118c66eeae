"""Test-time augmentation: which views of a test image are averaged, and with what weights;
and the validation accuracy that the evaluate stage reports beside the test figures."""

import json
from pathlib import Path

import keras
import numpy as np

from imageclf.augment import shift
from imageclf.datasets import load_split
from imageclf.evaluation import predict
from imageclf.models import load_model
from imageclf.params import load_params
from tests import synthetic
from tests.repos import run


def column_model(width: int) -> keras.Model:
    """Two classes: evidence for class 0 is the brightness of the leftmost column, for class 1
    that of the next one; nothing else counts, so a mirror or a shift changes the prediction."""
    inputs = keras.Input((width, width, 1))
    logits = keras.layers.Dense(2, use_bias=False)(keras.layers.Flatten()(inputs))
    kernel = np.zeros((width, width, 2), np.float32)
    kernel[:, 0, 0] = kernel[:, 1, 1] = 1.0
    model = keras.Model(inputs, keras.layers.Softmax()(logits))
    model.layers[2].kernel.assign(kernel.reshape(-1, 2))
    return model


def test_shift_moves_content_and_fills_the_edge_by_reflection() -> None:
    images = np.arange(16, dtype=np.uint8).reshape(1, 4, 4, 1)
    up_left = shift(images, -1, -1)[0, :, :, 0]
    assert up_left.shape == (4, 4) and up_left.dtype == np.uint8
    assert up_left[0, 0] == images[0, 1, 1, 0]
    down_right = shift(images, 1, 1)[0, :, :, 0]
    assert down_right[1, 1] == images[0, 0, 0, 0]
    # reflection: the new first row mirrors the second original row about the first
    np.testing.assert_array_equal(down_right[0, 1:], images[0, 1, :3, 0])


def test_flip_averages_each_image_with_its_mirror() -> None:
    model = column_model(6)
    images = np.zeros((1, 6, 6, 1), np.float32)
    images[0, :, 0] = 1  # bright left column: class 0; its mirror shows no evidence at all
    plain = predict(model, images, batch_size=1, tta="none")
    assert plain[0, 0] > 0.99
    flipped = predict(model, images, batch_size=1, tta="flip")
    np.testing.assert_allclose(flipped, (plain + 0.5) / 2, atol=1e-6)


def test_translate_weighs_plain_and_shifted_views_half_and_half() -> None:
    model = column_model(6)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 6, 6, 1)).astype(np.float32) / 255

    def mirrored_mean(views: np.ndarray) -> np.ndarray:
        return (model.predict(views, verbose=0) + model.predict(views[:, :, ::-1], verbose=0)) / 2

    expected = (
        mirrored_mean(images) / 2
        + (mirrored_mean(shift(images, -1, -1)) + mirrored_mean(shift(images, 1, 1))) / 4
    )
    translated = predict(model, images, batch_size=2, tta="translate")
    np.testing.assert_allclose(translated, expected, atol=1e-6)
    assert not np.allclose(translated, predict(model, images, batch_size=2, tta="flip"))


def test_a_model_trained_without_mirrors_gets_no_mirror_views() -> None:
    model = column_model(6)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 6, 6, 1)).astype(np.float32) / 255
    plain = predict(model, images, batch_size=2, tta="none")
    np.testing.assert_allclose(predict(model, images, 2, tta="flip", mirror=False), plain)
    shifted = [model.predict(shift(images, d, d), verbose=0) for d in (-1, 1)]
    np.testing.assert_allclose(
        predict(model, images, 2, tta="translate", mirror=False),
        plain / 2 + (shifted[0] + shifted[1]) / 4,
        atol=1e-6,
    )


def test_evaluate_scores_the_validation_split_as_it_scores_the_test_split(repo: Path) -> None:
    # `repo`'s model gets both splits right; with the validation labels moved one class on,
    # eval.json's val_accuracy must fall near 0, to what the same TTA gives, and test stay
    val_path = repo / "data" / "prepared" / "val.npz"
    val = load_split(val_path.parent, "val")
    wrong_labels = (val.labels + 1) % len(synthetic.CLASSES)
    val_path.unlink()  # a DVC output: replaced, never written through to the cache
    np.savez(val_path, images=val.images, labels=wrong_labels)
    run(repo, "python", "-m", "stages.evaluate")

    metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    model = load_model(repo / "models" / "finetuned.keras")
    tta = load_params(repo / "params.yaml").evaluate.tta
    predicted = predict(model, val.images, batch_size=64, tta=tta).argmax(axis=1)
    assert metrics["val_accuracy"] == round(float(np.mean(predicted == wrong_labels)), 4)
    assert metrics["val_accuracy"] < 0.5 < metrics["accuracy"]
