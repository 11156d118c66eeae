"""The options of `imageclf serve` and the settings they make, apart from the service itself,
so that building the `imageclf` command's parser does not import the web framework."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imageclf.images import DEFAULT_MAX_PIXELS
from imageclf.paths import FINETUNED


@dataclass(frozen=True)
class Settings:
    """What `imageclf serve`'s options set (see `add_arguments` for their meaning)."""

    name: str = "imageclf"
    max_batch: int = 64
    batch_wait_ms: float = 5.0
    max_body_mb: float = 32.0
    max_images: int = 64
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `imageclf serve`."""
    defaults = Settings()
    parser.add_argument(
        "--model",
        type=Path,
        default=FINETUNED,
        help="a .keras file, an exported SavedModel folder or a .tflite file "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    parser.add_argument("--port", type=_port, default=8000, help="default: %(default)s")
    parser.add_argument(
        "--name",
        type=_model_name,
        default=defaults.name,
        help="the model's name in the URLs (default: %(default)s)",
    )
    tuning = (
        ("--max-batch", int, "most images in one model call; 1 turns dynamic batching off"),
        ("--batch-wait-ms", float, "the longest a queued image waits for requests still being "
         "read to join its batch; 0: never"),
        ("--max-body-mb", float, "largest request body, in MiB"),
        ("--max-images", int, "most images in one request"),
        ("--max-pixels", int, "most pixels of one request's images together, as decoded (a "
         "large JPEG at its reduced scale); larger images are refused before they are decoded"),
        ("--workers", int, "server processes, each with its own copy of the model, whose "
         "threads get an equal share of the cores; pays under heavy load (README: Speed)"),
    )  # fmt: skip
    for option, kind, text in tuning:
        default = getattr(defaults, option.removeprefix("--").replace("-", "_"))
        parser.add_argument(
            option,
            type=positive_number(kind, zero=option == "--batch-wait-ms"),
            default=default,
            help=f"{text} (default: %(default)s)",
        )


def positive_number(kind: type, zero: bool = False) -> Callable[[str], Any]:
    """An argparse type: a number of `kind` (int or float) above 0, or from 0 with `zero`."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            number = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"not {number}: {text!r}") from None
        if value < 0 or (value == 0 and not zero) or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if zero else '> 0'}: {text}")
        return value

    return parse


def _port(text: str) -> int:
    port = positive_number(int)(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port (1 to 65535)")
    return port


# a name in URL paths (/v2/models/<name>/infer, /v1/models/<name>:predict) as KServe and TF
# Serving write them: no "/" or ":", which would split the route
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _model_name(text: str) -> str:
    if not _MODEL_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: a model name in URLs is letters, digits, '_', '.' and '-', starting "
            "with a letter or digit"
        )
    return text
