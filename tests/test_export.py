"""The export stage under a real `dvc repro` (the `finished_repo` fixture): its SavedModel and
TFLite files load without this package, with plain TensorFlow and plain LiteRT, carry the class
names, and classify as the Keras model does, on images of the model's size and of others."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.repos import run

FORMATS = ("keras", "saved_model", "tflite", "tflite_int8")
FIGURES = {"size_mb", "accuracy", "agreement", "ms_b1", "ms_b64"}


@pytest.fixture(scope="module")
def keras_model(tiny_model: Path):
    from imageclf.models import load_model

    return load_model(tiny_model)


@pytest.fixture(scope="module")
def samples(finished_repo: Path) -> list[np.ndarray]:
    """Batches of one shape each: the test split (the model's own 16 x 16), and colour images
    it resizes inside, larger and smaller, not square."""
    with np.load(finished_repo / "data" / "prepared" / "test.npz") as test:
        images = test["images"]
    rng = np.random.default_rng(0)
    others = []
    for height, width in ((23, 40), (64, 48), (9, 13)):
        batch = rng.integers(0, 90, (6, height, width, 3), dtype=np.uint8)
        batch[np.arange(6), :, :, np.arange(6) % 3] += 140
        others.append(batch)
    return [images, *others]


def test_metrics_per_format_in_dvc_metrics_show(repo: Path) -> None:
    shown = json.loads(run(repo, "dvc", "metrics", "show", "--json").stdout)
    figures = shown[""]["data"]["metrics/export.json"]["data"]
    assert figures == json.loads((repo / "metrics" / "export.json").read_text())
    assert set(figures) == set(FORMATS)
    for name in FORMATS:
        assert set(figures[name]) == FIGURES
        assert figures[name]["size_mb"] > 0
        assert figures[name]["ms_b1"] > 0 and figures[name]["ms_b64"] > 0
        assert 0 <= figures[name]["accuracy"] <= 1
    # measured, not assumed: the float formats classify the test split as Keras does
    assert figures["keras"]["agreement"] == 1.0
    assert figures["saved_model"]["agreement"] >= 0.995
    assert figures["tflite"]["agreement"] >= 0.995
    # the exported files are DVC outputs (cached), not git's
    lock = (repo / "dvc.lock").read_text()
    for out in ("saved_model", "model.tflite", "model_int8.tflite"):
        assert f"path: export/{out}\n" in lock
    ignored = (repo / "export" / ".gitignore").read_text().split()
    assert sorted(ignored) == ["/model.tflite", "/model_int8.tflite", "/saved_model"]


def test_saved_model_with_plain_tensorflow(
    finished_repo: Path, keras_model, samples: list[np.ndarray]
) -> None:
    import tensorflow as tf

    from imageclf.models import class_names

    # TF Serving's layout: a numbered version folder
    loaded = tf.saved_model.load(str(finished_repo / "export" / "saved_model" / "1"))
    names = loaded.signatures["class_names"]()["class_names"].numpy()
    assert [name.decode() for name in names] == class_names(keras_model)
    # the side it resizes to, for decoding large JPEGs at a reduced scale (repos.py: 16)
    assert loaded.signatures["input_size"]()["input_size"].numpy() == 16
    serve = loaded.signatures["serving_default"]
    for images in samples:
        probabilities = serve(image=tf.constant(images))["probabilities"].numpy()
        expected = keras_model.predict(images, verbose=0)
        np.testing.assert_allclose(probabilities, expected, atol=1e-5)


def test_tflite_with_plain_litert(
    finished_repo: Path, keras_model, samples: list[np.ndarray]
) -> None:
    from ai_edge_litert.interpreter import Interpreter

    from imageclf.models import class_names

    path = finished_repo / "export" / "model.tflite"
    with zipfile.ZipFile(path) as archive:  # the class names travel inside the file
        assert archive.read("labels.txt").decode().splitlines() == class_names(keras_model)
        assert archive.read("input_size.txt") == b"16\n"  # and the side it resizes to
    serve = Interpreter(model_path=str(path)).get_signature_runner()  # any input size
    test_split, *resized = samples
    probabilities = serve(image=test_split)["probabilities"]
    np.testing.assert_allclose(probabilities, keras_model.predict(test_split, verbose=0), atol=1e-5)
    for images in resized:
        probabilities = serve(image=images)["probabilities"]
        expected = keras_model.predict(images, verbose=0)
        # TFLite resizes by matrix products: a resized pixel halfway between two levels may
        # round the other way, which moves a probability of this tiny model by up to ~0.5%
        np.testing.assert_allclose(probabilities, expected, atol=0.01)
        top_two = np.sort(expected, axis=1)[:, -2:]
        clear = top_two[:, 1] - top_two[:, 0] > 0.02
        np.testing.assert_array_equal(
            probabilities.argmax(axis=1)[clear], expected.argmax(axis=1)[clear]
        )


def test_int8_tflite_with_plain_litert_close_to_keras(
    finished_repo: Path, keras_model, samples: list[np.ndarray]
) -> None:
    from ai_edge_litert.interpreter import Interpreter

    from imageclf.models import class_names

    export = finished_repo / "export"
    with zipfile.ZipFile(export / "model_int8.tflite") as archive:
        assert archive.read("labels.txt").decode().splitlines() == class_names(keras_model)
    serve = Interpreter(model_path=str(export / "model_int8.tflite")).get_signature_runner()
    for images in samples:
        probabilities = serve(image=images)["probabilities"]
        np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
        # int8 weights: close to the float model, not equal (its agreement is in the metrics)
        np.testing.assert_allclose(probabilities, keras_model.predict(images, verbose=0), atol=0.05)


def test_predict_with_the_tflite_file_gives_the_keras_classes(
    finished_repo: Path, keras_model, samples: list[np.ndarray], tmp_path: Path
) -> None:
    from imageclf.models import class_names

    names = class_names(keras_model)
    test_split = samples[0]
    expected = {}
    for i, label in enumerate(keras_model.predict(test_split, verbose=0).argmax(axis=1)):
        path = tmp_path / f"{i:02d}.png"
        Image.fromarray(test_split[i]).save(path)
        expected[str(path)] = names[label]
    model = finished_repo / "export" / "model.tflite"
    out = run(finished_repo, "imageclf", "predict", str(tmp_path), "--model", str(model), "--json")
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert {row["file"]: row["top"][0]["class"] for row in rows} == expected
