"""`imageclf predict` throughput on a folder of image files, per model format, side by side with
the model's raw batched throughput on the same images already decoded in memory (the ceiling).

The .keras model is exported first (to a temporary folder, by the export stage's code) as a
SavedModel and as float32 and int8 TFLite files. Then for each format:
- ceiling: `Classifier.predict` on all images as one uint8 array, in batches of 64;
- folder: the command's path with the model loaded: walk the folder, decode in the background
  thread, batch by shape, predict, top-3 per file;
- command: the whole `imageclf predict FOLDER --csv` as a subprocess (Python and TensorFlow
  start-up and the model load included), once.
Ceiling and folder runs alternate, --repeats times each (medians), so that both see the same
machine; before timing, every file is read once (a warm page cache). Also printed: the decoding
rate alone (one thread) and numpy's float32 GEMM rate, measured in the same run.

    tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp       # 10,000 test JPEGs, 32 x 32
    python benchmarks/predict.py --images /tmp/cifar10-jpeg/test --model models/finetuned.keras
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from benchmarks.throughput import numpy_gemm_gflops  # noqa: E402
from imageclf.export import export_saved_model, export_tflite  # noqa: E402
from imageclf.images import decode_image  # noqa: E402
from imageclf.models import load_model  # noqa: E402
from imageclf.predict import find_images, load_classifier, predict_files  # noqa: E402


def seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def folder_pass(classifier, folder: Path, batch_size: int) -> None:
    for prediction in predict_files(classifier, find_images([folder]), batch_size):
        np.argsort(-prediction.probabilities)[:3]  # the top-k the command prints


def command_seconds(folder: Path, model: Path, batch_size: int) -> float:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = ["imageclf", "predict", str(folder), "--model", str(model), "--csv"]
    command += ["--batch-size", str(batch_size)]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="a folder of image files")
    parser.add_argument("--model", type=Path, default=PROJECT / "models" / "finetuned.keras")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    gemm, blas = numpy_gemm_gflops()
    print(f"numpy float32 GEMM 4096^2: {gemm:.0f} GFLOP/s ({blas})")
    files = find_images([args.images])
    for path in files:  # warm the page cache: every timed run reads from memory
        path.read_bytes()
    start = time.perf_counter()
    images = [decode_image(path) for path in files]
    decode_rate = len(files) / (time.perf_counter() - start)
    shapes = {image.shape for image in images}
    print(
        f"{len(files)} files in {args.images}, shapes {sorted(shapes)[:3]}; "
        f"decoding alone, one thread: {decode_rate:,.0f} images/s"
    )
    if len(shapes) != 1:
        sys.exit("the ceiling needs images of one shape (such as CIFAR-10's 32 x 32)")
    array = np.stack(images)

    print(
        f"{'format':12} {'ceiling img/s':>14} {'folder img/s':>13} {'folder/ceiling':>15} "
        f"{'command s':>10} {'command img/s':>14}"
    )
    with tempfile.TemporaryDirectory() as export_dir:
        model = load_model(args.model)
        models = {
            "keras": args.model,
            "saved_model": export_saved_model(model, Path(export_dir) / "saved_model"),
            "tflite": Path(export_dir) / "model.tflite",
            "tflite_int8": Path(export_dir) / "model_int8.tflite",
        }
        export_tflite(model, models["tflite"])
        export_tflite(model, models["tflite_int8"], int8=True)
        for name, path in models.items():
            classifier = load_classifier(path)
            classifier.batch_size = args.batch_size
            classifier.predict(array[: args.batch_size])  # warm up: tracing, allocation
            ceiling, folder = [], []
            for _ in range(args.repeats):
                ceiling.append(seconds(lambda c=classifier: c.predict(array)))
                folder.append(
                    seconds(lambda c=classifier: folder_pass(c, args.images, args.batch_size))
                )
            ceiling_rate = len(array) / statistics.median(ceiling)
            folder_rate = len(files) / statistics.median(folder)
            wall = command_seconds(args.images, path, args.batch_size)
            print(
                f"{name:12} {ceiling_rate:14,.0f} {folder_rate:13,.0f} "
                f"{folder_rate / ceiling_rate:15.0%} {wall:10.1f} {len(files) / wall:14,.0f}"
            )


if __name__ == "__main__":
    main()
