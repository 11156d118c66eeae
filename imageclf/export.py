"""Export a trained Keras model for serving and for phones, and measure every format against it.

- SavedModel in TF Serving's layout (`<folder>/1/`), signature `serving_default`: "image"
  (uint8, N x H x W x 3, any size) -> "probabilities" (float32, N x C).
- TFLite, float32 or dynamic-range int8, with the same `serving_default` signature (dynamic
  input shape).
The class names and the side the model resizes images to travel inside both: the SavedModel
has `class_names` and `input_size` signatures without inputs that return them; the TFLite file
ends with a zip archive holding `labels.txt`, one name a line
(`zipfile.ZipFile("model.tflite").read("labels.txt")`), and `input_size.txt`.
`imageclf.predict.load_classifier` loads either.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from imageclf.errors import PipelineError
from imageclf.fileio import atomic_path
from imageclf.models import class_names, input_size
from imageclf.predict import (
    CLASS_NAMES_SIGNATURE,
    INPUT_SIZE_SIGNATURE,
    SERVING_SIGNATURE,
    TFLITE_INPUT_SIZE,
    TFLITE_LABELS,
    Classifier,
)

MIN_AGREEMENT = 0.995  # share of test images on which a float format must match Keras' class


def export_saved_model(model: keras.Model, folder: Path) -> Path:
    """Write `model` as a SavedModel to `folder/1`, replacing `folder` only once it is whole.
    Returns the version folder."""
    staging = folder.with_name(f".{folder.name}.partial")  # same file system: a rename
    shutil.rmtree(staging, ignore_errors=True)  # left over from an interrupted run
    try:
        _write_saved_model(model, lambda image: model(image, training=False), staging / "1")
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder / "1"


def export_tflite(model: keras.Model, path: Path, int8: bool = False) -> None:
    """Write `model` as a TFLite file at `path`, with TFLite's builtin ops only (LiteRT runs it
    as it is, no TensorFlow "flex" ops), and its class names appended as a zip member
    `labels.txt` (TFLite's convention for files that travel with a model).

    float32, or with `int8`: dynamic-range quantization (int8 weights; activations quantized
    on the fly, per batch): several times smaller and, under XNNPACK on a CPU, faster."""
    # Antialiased resizing (TensorFlow's ScaleAndTranslate op) has no TFLite builtin: the
    # "resize" layer is computed by `antialiased_resize` instead, the rest of the model as is.
    resize = model.get_layer("resize")
    after_resize = keras.Model(resize.output, model.output)

    def serve(image: tf.Tensor) -> tf.Tensor:
        resized = antialiased_resize(image, resize.height, resize.width)
        return after_resize(resized, training=False)

    with tempfile.TemporaryDirectory() as tmp:
        # One signature only: LiteRT's XNNPACK delegate (about 5x faster here) runs the first
        # subgraph alone, and signatures are ordered by name.
        _write_saved_model(model, serve, Path(tmp), with_metadata=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        if int8:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        flatbuffer = converter.convert()
    with atomic_path(path) as out:
        out.write_bytes(flatbuffer)
        with zipfile.ZipFile(out, "a") as archive:  # appended after the flatbuffer
            archive.writestr(TFLITE_LABELS, "".join(f"{name}\n" for name in class_names(model)))
            archive.writestr(TFLITE_INPUT_SIZE, f"{input_size(model)}\n")


def _write_saved_model(
    model: keras.Model, serve: Callable, folder: Path, with_metadata: bool = True
) -> None:
    """A SavedModel with `model`'s variables, serving `serve`, and (`with_metadata`)
    signatures returning `model`'s class names and input size."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name=SERVING_SIGNATURE,
        fn=lambda image: {"probabilities": serve(image)},
        input_signature=[keras.InputSpec(shape=(None, None, None, 3), dtype="uint8", name="image")],
    )
    if with_metadata:
        names = tf.constant(class_names(model))
        archive.add_endpoint(
            name=CLASS_NAMES_SIGNATURE,
            fn=lambda: {CLASS_NAMES_SIGNATURE: names},
            input_signature=[],
        )
        size = tf.constant(input_size(model), tf.int32)
        archive.add_endpoint(
            name=INPUT_SIZE_SIGNATURE,
            fn=lambda: {INPUT_SIZE_SIGNATURE: size},
            input_signature=[],
        )
    archive.write_out(str(folder), verbose=False)


def antialiased_resize(images: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """uint8 images resized as `tf.image.resize(..., "bilinear", antialias=True)` and rounded
    back to uint8, as the model's Keras resize layer does, by a weight matrix per axis.

    Every tensor's shape follows from the input's shape alone (no `tf.range` of a size read at
    run time), so that TFLite knows all shapes once the input is resized, and XNNPACK runs it.
    """
    x = tf.cast(images, tf.float32)
    ones = x[0, :, :, 0] * 0.0 + 1.0  # H x W
    rows = _triangle_weights(ones[:, 0], height)  # height x H
    columns = _triangle_weights(ones[0, :], width)  # width x W
    x = tf.transpose(x, [0, 3, 1, 2])  # N x C x H x W
    x = tf.matmul(tf.matmul(rows, x), columns, transpose_b=True)  # N x C x height x width
    x = tf.transpose(x, [0, 2, 3, 1])
    return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)


def _triangle_weights(ones: tf.Tensor, out_size: int) -> tf.Tensor:
    """ScaleAndTranslate's triangle kernel: output pixel `o` samples the input at
    `(o + 0.5) * in / out`, the kernel widened by `in / out` when shrinking (the antialiasing);
    each row normalized to sum to 1. `ones`: one per input pixel along the axis."""
    scale = tf.reduce_sum(ones) / out_size  # input pixels per output pixel
    source = tf.cumsum(ones) - 0.5  # input pixel centres
    sample = (np.arange(out_size, dtype=np.float32) + 0.5) * scale
    distance = tf.abs(source[None, :] - sample[:, None]) / tf.maximum(scale, 1.0)
    weights = tf.nn.relu(1.0 - distance)
    return weights / tf.reduce_sum(weights, axis=1, keepdims=True)


# --- Measuring ------------------------------------------------------------------------------


def measure(
    classifier: Classifier,
    images: np.ndarray,
    labels: np.ndarray,
    reference: np.ndarray,
    size_path: Path,
) -> dict:
    """Figures of one format on a test split: size of `size_path` in MB, accuracy, agreement
    (share of images whose top class is the `reference` class, the Keras model's), and the
    median milliseconds per image at batch 1 and batch 64."""
    predicted = classifier.predict(images).argmax(axis=1)
    return {
        "size_mb": round(_size(size_path) / 1e6, 3),
        "accuracy": round(float(np.mean(predicted == labels)), 4),
        "agreement": round(float(np.mean(predicted == reference)), 4),
        "ms_b1": _latency_ms(classifier, images, 1, repeats=50),
        "ms_b64": _latency_ms(classifier, images, 64, repeats=10),
    }


def check_agreement(name: str, figures: dict) -> None:
    """Refuse a float export that does not classify as the Keras model does."""
    if figures["agreement"] < MIN_AGREEMENT:
        raise PipelineError(
            f"export: the {name} model agrees with models/finetuned.keras on only "
            f"{figures['agreement']:.2%} of the test images (at least {MIN_AGREEMENT:.1%} "
            "expected): the conversion changed what the model computes. Use the .keras file."
        )


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())
    return path.stat().st_size


def _latency_ms(classifier: Classifier, images: np.ndarray, batch: int, repeats: int) -> float:
    inputs = images[np.arange(batch) % len(images)]  # the split may hold fewer than a batch
    classifier.predict(inputs)  # warm up: first calls trace, allocate, pick kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        classifier.predict(inputs)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000 / batch, 3)
