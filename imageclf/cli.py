"""The `imageclf` command: `imageclf predict PATH...` classifies image files with a trained model.

Each subcommand is a function below that adds its parser to the `COMMANDS` list and sets the
`run(args) -> int` that does the work; heavy imports (TensorFlow) happen inside `run`, so that
`imageclf --help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from imageclf import paths
from imageclf.errors import PipelineError
from imageclf.images import DEFAULT_MAX_PIXELS
from imageclf.serve_options import add_arguments as add_serve_arguments
from imageclf.serve_options import positive_number


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: `sys.argv[1:]`); returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="imageclf", description="Use a model trained by the imageclf pipeline."
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subcommands)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader of the output went away (`imageclf predict ... | head`): as for any
        # command in a pipe, no error of ours. Python's flush at exit would raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


# --- imageclf predict -----------------------------------------------------------------------


def add_predict(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "predict",
        help="classify image files",
        description=(
            "Classify image files (any format Pillow reads: JPEG, PNG, WebP, BMP, GIF, TIFF, "
            "...; any size; grayscale, RGBA and palette images too) and print each file's top "
            "classes. A file that does not decode gets one line on stderr; the others are "
            "still classified, and the exit status is 1 unless --on-bad-image skip."
        ),
    )
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="image files, folders (walked recursively) or glob patterns ('photos/**/*.jpg')",
    )
    parser.add_argument(
        "--model",
        default=str(paths.FINETUNED),
        help="a .keras file, an exported SavedModel folder or a .tflite file "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--top-k",
        type=positive_number(int),
        default=3,
        help="classes shown per image (default: %(default)s)",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON object per line per image")
    output.add_argument("--csv", action="store_true", help="CSV with a header row")
    parser.add_argument(
        "--batch-size",
        type=positive_number(int),
        default=64,
        help="images per model call (default: 64)",
    )
    parser.add_argument(
        "--max-pixels",
        type=positive_number(int),
        default=DEFAULT_MAX_PIXELS,
        help="refuse images that would decode to more pixels than this (a large JPEG decodes "
        "at a reduced scale), a guard against decompression bombs (default: %(default)s)",
    )
    parser.add_argument(
        "--on-bad-image",
        choices=("fail", "skip"),
        default="fail",
        help="fail: exit status 1 when a file does not decode (the others are still "
        "classified); skip: exit status 0 (default: %(default)s)",
    )
    parser.set_defaults(run=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from imageclf.predict import find_images, load_classifier, native_stderr_muted, predict_files

    left_out: list[Path] = []
    files = find_images(args.paths, left_out)  # before loading the model: a typo fails at once
    if left_out:
        names = ", ".join(path.name for path in left_out[:3])
        print(
            f"note: {len(left_out)} file(s) in the folders are of formats Pillow does not read, "
            f"left out: {names}{', ...' if len(left_out) > 3 else ''}",
            file=sys.stderr,
        )
    with native_stderr_muted():
        classifier = load_classifier(args.model)
    style = "json" if args.json else "csv" if args.csv else "table"
    width = max(_display_width(_printable(str(f))) for f in files)
    output = _Output(style, classifier.class_names, args.top_k, width)
    failed = 0
    # the bar goes to stderr, and only on a terminal (disable=None); bar.write keeps the
    # printed lines clear of it
    with tqdm(total=len(files), unit="img", disable=None, file=sys.stderr) as bar:
        if output.header:
            bar.write(output.header, file=sys.stdout)
        for prediction in predict_files(classifier, files, args.batch_size, args.max_pixels):
            bar.update()
            if prediction.error is None:
                bar.write(output.line(prediction.path, prediction.probabilities), file=sys.stdout)
            else:
                failed += 1
                label = "skipped" if args.on_bad_image == "skip" else "error"
                bar.write(f"{label}: {prediction.error}", file=sys.stderr)
    if failed and args.on_bad_image == "fail":
        print(f"error: {failed} of {len(files)} files could not be classified", file=sys.stderr)
        return 1
    return 0


class _Output:
    """Lines of `imageclf predict`: an aligned table, JSON lines, or CSV."""

    def __init__(self, style: str, class_names: list[str], top_k: int, file_width: int) -> None:
        self.style = style
        self.class_names = class_names
        self.top_k = min(top_k, len(class_names))
        self.file_width = max(file_width, len("file"))
        self.class_width = max(map(_display_width, class_names))
        ranks = range(1, self.top_k + 1)
        if style == "csv":
            self.header = _csv(["file", *(f"{k}_{i}" for i in ranks for k in ("class", "p"))])
        elif style == "table":
            columns = "  ".join(f"{f'top {i}':{self.class_width + 8}}" for i in ranks)
            self.header = f"{'file':{self.file_width}}  {columns}".rstrip()
        else:
            self.header = None

    def line(self, path: Path, probabilities: np.ndarray) -> str:
        best = np.argsort(-probabilities, kind="stable")[: self.top_k]
        top = [(self.class_names[i], float(probabilities[i])) for i in best]
        if self.style == "json":
            classes = [{"class": name, "probability": round(p, 6)} for name, p in top]
            return json.dumps({"file": str(path), "top": classes})
        if self.style == "csv":
            return _csv([str(path), *(v for name, p in top for v in (name, f"{p:.6f}"))])
        columns = "  ".join(f"{_pad(name, self.class_width)} {p:7.2%}" for name, p in top)
        return f"{_pad(_printable(str(path)), self.file_width)}  {columns}"


def _display_width(text: str) -> int:
    """Columns `text` takes in a terminal: two for CJK characters and emoji (a flag or a
    family joined by zero-width joiners is one), none for combining accents."""
    from rich.cells import cell_len  # rich comes with Keras and DVC; imported when printing

    return cell_len(text)


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _display_width(text))


def _printable(text: str) -> str:
    """`text` with control characters (a newline in a file name) as escapes, as Python
    writes them: one table row per file."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _csv(values: list[str]) -> str:
    """One CSV record, without its line end. The csv module quotes a field that holds a
    character of its line terminator, so a newline in a file name stays inside quotes."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow(values)
    return buffer.getvalue().removesuffix("\r\n")


# --- imageclf serve -------------------------------------------------------------------------


def add_serve(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "serve",
        help="serve the model: a web page, KServe v2 and TF Serving REST APIs",
        description=(
            "Serve a model over HTTP: a page for people (/), the Open Inference Protocol "
            "(/v2/...), TF Serving's REST predict API (/v1/...), uploads (/predict), "
            "Prometheus metrics (/metrics) and the OpenAPI docs (/docs). SIGTERM answers "
            "the requests in flight, then exits."
        ),
    )
    add_serve_arguments(parser)
    parser.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from imageclf import serve  # the web framework: imported only to serve

    return serve.run(args)


# Each entry adds one subcommand to the `imageclf` parser.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_predict, add_serve]
