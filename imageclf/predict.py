"""Classify images with a trained model, in whichever format the pipeline wrote it: the `.keras`
file of the finetune stage, or the export stage's SavedModel folder or `.tflite` file. And run a
model over many image files: decoded in a background thread while the model works, batched by
image shape, results in the order of the files.

    classifier = load_classifier("models/finetuned.keras")   # or export/model.tflite, ...
    probabilities = classifier.predict(images)  # N x H x W x 3 uint8 -> N x C float32

Images go to the model at their decoded size: its own resize and normalization layers are the
one place where that happens, in every format, so one photo gives one answer everywhere.
"""

from __future__ import annotations

import contextlib
import glob
import os
import queue
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imageclf.errors import PipelineError
from imageclf.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    BadImage,
    broken_link,
    decode_image,
)

# Names inside the exported formats (see imageclf/export.py): the serving signature maps
# "image" (uint8, N x H x W x 3) to "probabilities" (float32, N x C). The class names travel
# inside the files: a SavedModel signature without inputs returns "class_names" (strings); a
# TFLite file ends with a zip archive holding "labels.txt".
SERVING_SIGNATURE = "serving_default"
CLASS_NAMES_SIGNATURE = "class_names"
TFLITE_LABELS = "labels.txt"
TFLITE_INPUT_SIZE = "input_size.txt"  # the side the model resizes images to, as a number
INPUT_SIZE_SIGNATURE = "input_size"
MODEL_FORMATS = "a .keras file, an exported SavedModel folder or a .tflite file"
EXPORT_IT = "export the model with this project's export stage (`dvc repro export`)"


@dataclass
class Classifier:
    """A loaded model. `predict` maps uint8 RGB images of one shape (N x H x W x 3, any H and W)
    to class probabilities (N x C float32), columns in the order of `class_names`."""

    path: Path
    format: str  # "keras", "saved_model" or "tflite"
    class_names: list[str]
    run: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    batch_size: int = 64  # larger inputs run in chunks of this many images
    # the side the model resizes images to (None: unknown, an export older than 2026-11-30),
    # so that large JPEGs can be decoded at a reduced scale (`decode_image`'s `size`)
    input_size: int | None = None

    def predict(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise PipelineError(
                f"{self.path}: expects uint8 RGB images, N x H x W x 3; got {images.dtype} "
                f"{images.shape}"
            )
        if len(images) == 0:
            return np.zeros((0, len(self.class_names)), np.float32)
        chunks = [
            np.asarray(self.run(images[start : start + self.batch_size]), np.float32)
            for start in range(0, len(images), self.batch_size)
        ]
        return np.concatenate(chunks)


def load_classifier(path: str | Path) -> Classifier:
    """Load a model of any supported format: a `.keras` file, an exported SavedModel (the
    folder holding `saved_model.pb`, or a TF Serving folder of numbered versions: the highest
    is used), or a `.tflite` file.

    Raises:
        PipelineError: the path does not exist or holds no model this project can run.
    """
    path = Path(path)
    if not path.exists():
        raise PipelineError(
            f"{path}: no model here; train one with `dvc repro`, or name {MODEL_FORMATS}"
        )
    try:
        if path.is_dir():
            return _load_saved_model(path)
        if path.suffix == ".tflite":
            return _load_tflite(path)
        return _load_keras(path)
    except PipelineError:
        raise
    except Exception as exc:  # each loader has its own exceptions for a file it cannot read
        reason = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise PipelineError(
            f"{path}: cannot load this model ({reason}); expected {MODEL_FORMATS} written by "
            "this project's pipeline"
        ) from None


@contextlib.contextmanager
def native_stderr_muted() -> Iterator[None]:
    """Silence what TensorFlow and LiteRT print from C++ while they start and load a model (CPU
    features, CUDA drivers, delegates): it comes before their log level applies. Python errors
    still surface as exceptions, printed after the block."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _load_keras(path: Path) -> Classifier:
    if not zipfile.is_zipfile(path):  # Keras' own message would say "File not found"
        raise PipelineError(
            f"{path}: not a .keras model file (those are zip archives); name {MODEL_FORMATS}"
        )
    from imageclf.models import class_names, input_size, load_model

    model = load_model(path)
    try:
        names = class_names(model)
    except ValueError:
        raise PipelineError(
            f"{path}: a Keras model without the 'probabilities' layer that carries the class "
            "names; use a model trained by this project's pipeline"
        ) from None
    # predict_on_batch: one compiled call per batch, without model.predict's per-call setup
    return Classifier(path, "keras", names, model.predict_on_batch, input_size=input_size(model))


def _load_saved_model(path: Path) -> Classifier:
    import tensorflow as tf

    folder = saved_model_version(path)
    loaded = tf.saved_model.load(str(folder))
    signatures = loaded.signatures
    missing = {SERVING_SIGNATURE, CLASS_NAMES_SIGNATURE} - set(signatures)
    if missing:
        raise PipelineError(f"{folder}: no signature {' or '.join(sorted(missing))}; {EXPORT_IT}")
    names = signatures[CLASS_NAMES_SIGNATURE]()[CLASS_NAMES_SIGNATURE].numpy()
    names = [name.decode() for name in names]
    serve = signatures[SERVING_SIGNATURE]
    size = None
    if INPUT_SIZE_SIGNATURE in signatures:
        size = int(signatures[INPUT_SIZE_SIGNATURE]()[INPUT_SIZE_SIGNATURE].numpy())

    # `keep`: the signature does not keep its loaded object alive, and with it go the variables
    def run(images: np.ndarray, keep: object = loaded) -> np.ndarray:
        return serve(image=tf.constant(images))["probabilities"].numpy()

    return Classifier(folder, "saved_model", names, run, input_size=size)


def saved_model_version(path: Path) -> Path:
    """The folder holding `saved_model.pb`: `path` itself, or its highest numbered version."""
    if (path / "saved_model.pb").is_file():
        return path
    versions = [p for p in path.iterdir() if p.name.isdigit() and (p / "saved_model.pb").is_file()]
    if not versions:
        raise PipelineError(
            f"{path}: a folder without saved_model.pb, in itself or in a numbered version "
            f"folder (such as {path}/1); name {MODEL_FORMATS}"
        )
    return max(versions, key=lambda p: int(p.name))


def _load_tflite(path: Path) -> Classifier:
    try:  # LiteRT, TensorFlow Lite's successor package; TensorFlow's own copy otherwise
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from tensorflow.lite import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=len(os.sched_getaffinity(0)))
    interpreter.allocate_tensors()  # applies the XNNPACK delegate now, not at the first call
    if SERVING_SIGNATURE not in interpreter.get_signature_list():
        raise PipelineError(f"{path}: no signature {SERVING_SIGNATURE!r}; {EXPORT_IT}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.read(TFLITE_LABELS).decode().splitlines()
            members = archive.namelist()
            size = int(archive.read(TFLITE_INPUT_SIZE)) if TFLITE_INPUT_SIZE in members else None
    except (zipfile.BadZipFile, KeyError):
        message = f"{path}: no {TFLITE_LABELS} (class names) in it; {EXPORT_IT}"
        raise PipelineError(message) from None
    runner = interpreter.get_signature_runner(SERVING_SIGNATURE)
    lock = threading.Lock()  # an interpreter runs one call at a time

    def run(images: np.ndarray) -> np.ndarray:
        with lock:  # the runner resizes the input tensor to each batch's shape
            return runner(image=np.ascontiguousarray(images))["probabilities"]

    return Classifier(path, "tflite", names, run, input_size=size)


# --- Many files -----------------------------------------------------------------------------

# pixels held in one batch: photos of many megapixels run a few at a time, not 64
BATCH_PIXELS = 1 << 25
# Decoding threads. Small files cost Pillow mostly Python (header parsing): with a fast model
# (TFLite, CIFAR-sized images) a second thread kept the model fed where one did not (measured
# with benchmarks/predict.py); with a slower one it changes nothing.
READERS = 2


def find_images(paths: Sequence[str | Path], left_out: list[Path] | None = None) -> list[Path]:
    """The files named by `paths`: files as given, folders walked recursively for image files
    (hidden ones left out), glob patterns expanded (`**` included). Each file once, in order.
    Other files in the folders walked (formats Pillow does not read, such as HEIC photos
    without its plugin) are added to `left_out`, when given, for the caller to mention.

    Raises:
        PipelineError: a path that does not exist, a folder without image files, a pattern
            that matches nothing.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files, others = [], []
            for p in sorted(path.rglob("*")):
                if any(part.startswith(".") for part in p.relative_to(path).parts):
                    continue
                # a broken link too: decoding names it, rather than the image going missing
                if p.suffix.lower() in IMAGE_SUFFIXES and (
                    p.is_file() or (p.is_symlink() and not p.exists())
                ):
                    files.append(p)
                elif p.is_file():
                    others.append(p)
            if not files:
                other_formats = (
                    f" ({len(others)} file(s) of formats Pillow does not read, such as "
                    f"{others[0].name})"
                    if others
                    else ""
                )
                raise PipelineError(
                    f"{path}: no image files in this folder or below it{other_formats}"
                )
            found += files
            if left_out is not None:
                left_out += others
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(str(raw)):
            matches = sorted(glob.glob(str(raw), recursive=True))
            if not matches:
                raise PipelineError(f"{raw}: no files match this pattern")
            found += find_images(matches, left_out)
        elif path.is_symlink():
            raise PipelineError(f"{raw}: {broken_link(path)}")
        else:
            raise PipelineError(f"{raw}: no such file or folder")
    return list(dict.fromkeys(found))


@dataclass
class Prediction:
    """The result for one file: its probabilities, or why it could not be classified."""

    path: Path
    probabilities: np.ndarray | None = None
    error: BadImage | None = None


def predict_files(
    classifier: Classifier,
    files: Sequence[Path],
    batch_size: int = 64,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[Prediction]:
    """Classify `files`, yielding one `Prediction` per file in their order.

    Background threads (READERS, each taking every READERS-th file) read and decode the files
    while the model runs, and group the images into batches of one shape (up to `batch_size`
    images, fewer for large ones). A file that does not decode, or has more than `max_pixels`
    pixels, yields a Prediction with its `error`; the others are classified all the same.
    """
    # bounded: the readers stay a few batches ahead, holding little memory
    batches: queue.Queue = queue.Queue(maxsize=4 * READERS)
    stop = threading.Event()
    for first in range(READERS):
        threading.Thread(
            target=_read_batches,
            args=(
                files,
                range(first, len(files), READERS),
                batch_size,
                max_pixels,
                classifier.input_size,
                batches,
                stop,
            ),
            name=f"imageclf-reader-{first}",
            daemon=True,
        ).start()
    done: dict[int, Prediction] = {}
    next_index = 0
    try:
        while next_index < len(files):
            item = batches.get()
            if isinstance(item, BaseException):
                raise item
            indices, payload = item
            if isinstance(payload, BadImage):
                done[indices[0]] = Prediction(files[indices[0]], error=payload)
            else:
                for index, row in zip(indices, classifier.predict(payload)):
                    done[index] = Prediction(files[index], probabilities=row)
            # batches complete out of order (grouped by shape): yield what is next in line
            while next_index in done:
                yield done.pop(next_index)
                next_index += 1
    finally:
        stop.set()


def _read_batches(
    files: Sequence[Path],
    indices: range,
    batch_size: int,
    max_pixels: int,
    size: int | None,
    batches: queue.Queue,
    stop: threading.Event,
) -> None:
    """Decode `files[indices]` into batches of one shape and put them on `batches` as
    (indices, images), or ([index], BadImage) for a file that does not decode; an unexpected
    exception is put there too, for the consumer to raise."""

    def put(item: object) -> None:
        while not stop.is_set():  # the consumer may stop early: never block forever
            try:
                batches.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    pending: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}

    def flush(shape: tuple[int, ...]) -> None:
        group = pending.pop(shape)
        put(([index for index, _ in group], np.stack([image for _, image in group])))

    try:
        for index in indices:
            if stop.is_set():
                return
            try:
                image = decode_image(files[index], max_pixels=max_pixels, size=size)
            except BadImage as exc:
                put(([index], exc))
                continue
            group = pending.setdefault(image.shape, [])
            group.append((index, image))
            if len(group) >= batch_size or len(group) * image.size // 3 >= BATCH_PIXELS:
                flush(image.shape)
            # many shapes, each waiting for a full batch: run the largest waiting group
            held = sum(len(g) * g[0][1].size // 3 for g in pending.values())
            if held > BATCH_PIXELS:
                flush(max(pending, key=lambda s: len(pending[s]) * np.prod(s)))
        for shape in list(pending):
            flush(shape)
    except BaseException as exc:  # noqa: BLE001 - handed over to the consumer, which raises it
        put(exc)
