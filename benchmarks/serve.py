"""Requests per second and latency of `imageclf serve` under 1, 4, 16 and 64 concurrent clients,
side by side, in one run, with the model's offline batched throughput on decoded images (the
ceiling), `imageclf predict` on files of the same images (offline, decoding included), and a
naive Flask app that calls `model.predict` once per request (the original project's suggestion).

Each client sends one image per request to POST /predict, one request after another on a
keep-alive connection: a 32 x 32 PNG, then a 640 x 480 JPEG. The service runs with the Keras
model and with its TFLite export, each with dynamic batching (the defaults), with it in one
worker process per core (--workers N), and without batching (--max-batch 1). Then a fresh
service takes 10,000 requests, and its resident memory (RSS) after the first 100 and after all
of them is compared.

    pip install -r benchmarks/requirements.txt    # Flask, for the baseline
    python benchmarks/serve.py                    # about 10 minutes on 2 cores
    python benchmarks/serve.py --goal-repeats 3   # the issue's goal cell only, 3 times: 5 minutes

With --goal-repeats N, only the cell of the issue's 60% goal is measured (16 clients, the
32 x 32 PNG), N times per format, one process and one worker per core alternating, each
against the format's ceiling measured just before: one run's cell varies by 10-15%.

Without models/finetuned.keras (a full `dvc repro`), a stand-in of the same architecture and
size (fastnet [64, 256, 256], 10 classes, 32 x 32) is built with random weights: throughput,
not accuracy, is measured. Without export/model.tflite, the Keras model is exported to a
temporary file with the export stage's own function. Only 127.0.0.1 is used; every loop is
bounded in time and count.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from benchmarks.throughput import numpy_gemm_gflops  # noqa: E402

if TYPE_CHECKING:
    from imageclf.predict import Classifier

CONCURRENCY = (1, 4, 16, 64)
SECONDS = 4.0  # measured per cell, after a warm-up
MAX_REQUESTS = 20_000  # per cell, whatever the speed
BOUNDARY = "imageclf-benchmark"
INSTALL = "pip install -r benchmarks/requirements.txt"

FLASK_APP = """
# The naive baseline: a minimal Flask app, one model.predict call per request.
import sys
import numpy as np
from flask import Flask, jsonify, request
from imageclf.images import decode_image
from imageclf.models import class_names, load_model

model = load_model(sys.argv[1])
names = class_names(model)
app = Flask(__name__)


@app.post("/predict")
def predict():
    image = decode_image(request.files["file"].read())
    probabilities = model.predict(image[None], verbose=0)[0]
    best = np.argsort(-probabilities)[:5]
    top = [{"class": names[i], "probability": float(probabilities[i])} for i in best]
    return jsonify({"top": top})


app.run(host="127.0.0.1", port=int(sys.argv[2]), threaded=True)
"""


# --- Test images and the ceiling ------------------------------------------------------------


def test_images() -> dict[str, bytes]:
    """A 32 x 32 PNG and a 640 x 480 JPEG with photo-like content (smooth shapes, grain)."""
    rng = np.random.default_rng(0)
    files = {}
    for name, (width, height), format in (
        ("32x32 PNG", (32, 32), "PNG"),
        ("640x480 JPEG", (640, 480), "JPEG"),
    ):
        y, x = np.mgrid[0:height, 0:width] / max(width, height)
        image = np.stack([120 + 100 * np.sin(6 * x + c) * np.cos(4 * y - c) for c in (0, 1, 2)], -1)
        image += rng.normal(0, 12, image.shape)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, format, quality=90)
        files[name] = buffer.getvalue()
    return files


def ceiling(classifier: Classifier, files: dict[str, bytes]) -> dict[str, float]:
    """The model's offline batched throughput (images/s, batches of 64 decoded images), per
    test image: what a server could reach if HTTP, decoding and queueing cost nothing."""
    from imageclf.images import decode_image

    rates = {}
    for name, data in files.items():
        # decoded as the service decodes (a JPEG at a reduced scale, down to the model's size)
        batch = np.repeat(decode_image(data, size=classifier.input_size)[None], 64, axis=0)
        classifier.predict(batch)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            classifier.predict(batch)
            times.append(time.perf_counter() - start)
        rates[name] = 64 / statistics.median(times)
    return rates


def offline_predict(
    classifier: Classifier, files: dict[str, bytes], folder: Path
) -> dict[str, float]:
    """`imageclf predict`'s throughput (images/s) on a folder of 1,024 copies of each test image:
    the offline route from encoded files to classes, decoding included (median of 3)."""
    from imageclf.predict import predict_files

    rates = {}
    for name, data in files.items():
        paths = []
        for index in range(1024):
            paths.append(folder / f"{name.replace(' ', '_')}-{index}")
            paths[-1].write_bytes(data)
        list(predict_files(classifier, paths[:64]))  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            list(predict_files(classifier, paths))
            times.append(time.perf_counter() - start)
        rates[name] = len(paths) / statistics.median(times)
        for path in paths:
            path.unlink()
    return rates


def decode_ms(data: bytes, size: int | None = None) -> float:
    """Milliseconds of one core to decode `data` (median of 50); with `size`, as the service
    does for a model of that input size."""
    from imageclf.images import decode_image

    times = []
    for _ in range(50):
        start = time.perf_counter()
        decode_image(data, size=size)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def stand_in_model(folder: Path) -> Path:
    """A random-weight model of the default architecture at CIFAR-10's size."""
    from imageclf.models import build_model
    from imageclf.params import ModelParams

    meta = {
        "class_names": [f"class{i}" for i in range(10)],
        "image_size": 32,
        "mean": [125.3, 123.0, 113.9],
        "std": [63.0, 62.1, 66.7],
    }
    params = ModelParams(arch="fastnet", widths=[64, 256, 256], weights="none", input_size=None)
    path = folder / "stand-in.keras"
    build_model(params, meta).save(path)
    return path


def tflite_of(model: Path, folder: Path) -> Path:
    from imageclf.export import export_tflite
    from imageclf.models import load_model

    path = folder / "model.tflite"
    export_tflite(load_model(model), path)
    return path


# --- A bounded HTTP load generator (asyncio, keep-alive, raw HTTP/1.1) -----------------------


def upload_request(path: str, filename: str, data: bytes) -> bytes:
    body = (
        (
            f"--{BOUNDARY}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _exchange(port: int, request: bytes, connection: list) -> None:
    """Send `request` on the kept-alive connection (opening one when needed), read the reply."""
    if not connection:
        connection.extend(await asyncio.open_connection("127.0.0.1", port))
    reader, writer = connection
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line)
    headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
    await reader.readexactly(int(headers[b"content-length"]))
    if status != 200:
        raise RuntimeError(f"HTTP {status}")
    if headers.get(b"connection", b"").lower() == b"close":
        writer.close()
        connection.clear()


@dataclass
class Cell:
    requests_per_second: float
    p50_ms: float
    p99_ms: float


async def _load(port: int, request: bytes, clients: int, seconds: float, limit: int) -> list:
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def client() -> None:
        connection: list = []
        while time.perf_counter() < stop_at and len(latencies) < limit:
            start = time.perf_counter()
            await _exchange(port, request, connection)
            latencies.append(time.perf_counter() - start)
        if connection:
            connection[1].close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies


def measure(port: int, request: bytes, clients: int) -> Cell:
    asyncio.run(_load(port, request, clients, 0.5, 200))  # warm-up: connections, graph traces
    start = time.perf_counter()
    latencies = asyncio.run(_load(port, request, clients, SECONDS, MAX_REQUESTS))
    elapsed = time.perf_counter() - start
    milliseconds = np.array(latencies) * 1000
    return Cell(
        len(latencies) / elapsed,
        float(np.percentile(milliseconds, 50)),
        float(np.percentile(milliseconds, 99)),
    )


def send(port: int, requests: list[bytes], count: int, clients: int = 16) -> None:
    """Exactly `count` requests, cycling through `requests`, from `clients` clients."""

    async def run() -> None:
        left = iter(range(count))

        async def client() -> None:
            connection: list = []
            for index in left:
                await _exchange(port, requests[index % len(requests)], connection)
            if connection:
                connection[1].close()

        await asyncio.gather(*(client() for _ in range(clients)))

    asyncio.run(run())


# --- Servers --------------------------------------------------------------------------------


class Process:
    """A server subprocess on a free port of 127.0.0.1, stopped with SIGTERM."""

    def __init__(self, command: list[str], log: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        with log.open("w") as output:
            self.process = subprocess.Popen(
                [*command, str(self.port)], env=env, stdout=output, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{command[:3]} exited:\n{log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.25)
        raise SystemExit(f"{command[:3]} did not start:\n{log.read_text()[-3000:]}")

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        kilobytes = next(
            line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")
        )
        return int(kilobytes) / 1024

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def imageclf_serve(model: Path, log: Path, *options: str) -> Process:
    imageclf = Path(sys.executable).parent / "imageclf"  # the console command of this venv
    command = [str(imageclf), "serve", "--model", str(model), *options]
    server = Process([*command, "--port"], log)
    # the port takes connections before every worker has loaded its model: wait for all
    workers = int(options[options.index("--workers") + 1]) if "--workers" in options else 1
    deadline = time.monotonic() + 180
    while log.read_text().count("Application startup complete") < workers:
        if time.monotonic() > deadline or server.process.poll() is not None:
            server.stop()
            raise SystemExit(f"imageclf serve did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.25)
    return server


# --- The run --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=PROJECT / "models" / "finetuned.keras")
    parser.add_argument("--tflite", type=Path, default=PROJECT / "export" / "model.tflite")
    parser.add_argument("--goal-repeats", type=int, default=0, metavar="N")
    args = parser.parse_args()
    if not args.goal_repeats and importlib.util.find_spec("flask") is None:
        # found out before the 20 minutes of measuring that come before the baseline's turn
        raise SystemExit("Flask, for the naive baseline, is missing: " + INSTALL)
    with tempfile.TemporaryDirectory(prefix="imageclf-bench-") as tmp:
        model, tflite = models_to_serve(args.model, args.tflite, Path(tmp))
        if args.goal_repeats:
            goal_cell(model, tflite, Path(tmp), args.goal_repeats)
        else:
            run(model, tflite, Path(tmp))


def models_to_serve(model: Path, tflite: Path, tmp: Path) -> tuple[Path, Path]:
    """The Keras model and its TFLite export, or stand-ins written to `tmp`."""
    if not model.is_file():
        print(
            f"{model}: missing; using a random-weight stand-in (fastnet [64, 256, 256], 10 "
            "classes, 32 x 32): throughput, not accuracy, is measured"
        )
        model = stand_in_model(tmp)
    if not tflite.is_file():
        print(f"{tflite}: missing; exporting {model.name} to a temporary TFLite file")
        tflite = tflite_of(model, tmp)
    return model, tflite


def goal_cell(model: Path, tflite: Path, tmp: Path, repeats: int) -> None:
    """The 16-client 32 x 32 PNG cell, `repeats` times per format and server setup."""
    from imageclf.predict import load_classifier

    gemm, _ = numpy_gemm_gflops()
    print(f"numpy float32 GEMM 4096^2: {gemm:.0f} GFLOP/s")
    png = {"32x32 PNG": test_images()["32x32 PNG"]}
    request = upload_request("/predict", "image", png["32x32 PNG"])
    cores = str(len(os.sched_getaffinity(0)))
    for kind, path in (("Keras", model), ("TFLite", tflite)):
        top = ceiling(load_classifier(path), png)["32x32 PNG"]
        shares: dict[str, list[float]] = {"one process": [], f"{cores} workers": []}
        for _ in range(repeats):
            for setup, options in zip(shares, ((), ("--workers", cores))):
                server = imageclf_serve(path, tmp / "serve.log", *options)
                try:
                    shares[setup].append(measure(server.port, request, 16).requests_per_second)
                finally:
                    server.stop()
        for setup, rates in shares.items():
            print(
                f"{kind}, {setup}: 16 clients, 32x32 PNG: "
                + ", ".join(f"{rate:.0f}/s ({rate / top:.0%})" for rate in rates)
                + f"; median {statistics.median(rates) / top:.0%} of the ceiling, {top:.0f} img/s"
            )


def run(model: Path, tflite: Path, tmp: Path) -> None:
    """The whole benchmark; logs go to `tmp`."""
    gemm, blas = numpy_gemm_gflops()
    print(
        f"numpy float32 GEMM 4096^2: {gemm:.0f} GFLOP/s ({blas}); load average at start: "
        f"{os.getloadavg()[0]:.1f}"
    )
    from imageclf.predict import load_classifier

    files = test_images()
    size = load_classifier(model).input_size
    print(
        ", ".join(
            f"{name}: {len(data):,} bytes, decoded in {decode_ms(data):.2f} ms "
            f"({decode_ms(data, size):.2f} ms for the model's {size} x {size} input)"
            for name, data in files.items()
        )
    )
    requests = {name: upload_request("/predict", "image", data) for name, data in files.items()}

    ceilings: dict[str, dict[str, float]] = {}
    offline: dict[str, dict[str, float]] = {}
    rows: dict[tuple[str, str], dict[int, Cell]] = {}
    cores = len(os.sched_getaffinity(0))
    setups = []
    for kind, path in (("Keras", model), ("TFLite", tflite)):
        setups.append((f"{kind}, batching", path, ()))
        if cores > 1:  # one worker process per core, each with its batching queue
            setups.append((f"{kind}, batching, {cores} workers", path, ("--workers", str(cores))))
        setups.append((f"{kind}, no batching", path, ("--max-batch", "1")))
    for label, path, options in setups:
        kind = label.split(",")[0]
        if kind not in ceilings:  # measured just before the servers of its format
            classifier = load_classifier(path)
            ceilings[kind] = ceiling(classifier, files)
            offline[kind] = offline_predict(classifier, files, tmp)
            print(
                f"{kind} ceiling: "
                + ", ".join(f"{k} {v:.0f} img/s" for k, v in ceilings[kind].items())
                + "; imageclf predict on files (decoding included): "
                + ", ".join(f"{k} {v:.0f} img/s" for k, v in offline[kind].items())
            )
        server = imageclf_serve(path, tmp / "serve.log", *options)
        try:
            for name, request in requests.items():
                rows[label, name] = {c: measure(server.port, request, c) for c in CONCURRENCY}
                report_row(label, name, rows[label, name])
        finally:
            server.stop()
    (tmp / "flask_app.py").write_text(textwrap.dedent(FLASK_APP))
    flask = Process([sys.executable, str(tmp / "flask_app.py"), str(model)], tmp / "flask.log")
    try:
        for name, request in requests.items():
            label = "Flask + model.predict (naive)"
            rows[label, name] = {c: measure(flask.port, request, c) for c in CONCURRENCY}
            report_row(label, name, rows[label, name])
    finally:
        flask.stop()

    server = imageclf_serve(model, tmp / "serve.log")
    try:
        mixed = list(requests.values())
        send(server.port, mixed, 100)
        rss_100 = server.rss_mib()
        send(server.port, mixed, 9_900)
        rss_10000 = server.rss_mib()
    finally:
        server.stop()
    summary(rows, ceilings, offline, files, rss_100, rss_10000)


def report_row(label: str, image: str, cells: dict[int, Cell]) -> None:
    figures = "  ".join(
        f"{c:>2}: {cell.requests_per_second:6.0f}/s p50 {cell.p50_ms:6.1f} p99 {cell.p99_ms:6.1f}"
        for c, cell in cells.items()
    )
    print(f"{label:30} {image:13} {figures}", flush=True)


def summary(
    rows: dict, ceilings: dict, offline: dict, files: dict, rss_100: float, rss_10000: float
) -> None:
    print("\n| server | image | " + " | ".join(f"{c} clients" for c in CONCURRENCY) + " |")
    print("|---|---|" + "---|" * len(CONCURRENCY))
    for (label, image), cells in rows.items():
        figures = " | ".join(
            f"{cell.requests_per_second:.0f}/s, {cell.p50_ms:.1f} / {cell.p99_ms:.1f} ms"
            for cell in cells.values()
        )
        print(f"| {label} | {image} | {figures} |")
    print("\n(requests per second, p50 / p99 latency; one image per request)\n")
    naive = "Flask + model.predict (naive)"
    for image in files:
        for label, cells in rows.items():
            model = label[0].split(",")[0]
            if label[1] != image or ", batching" not in label[0]:  # the batching rows
                continue
            served = cells[16].requests_per_second
            top = ceilings[model][image]
            baseline = rows[naive, image][16].requests_per_second
            print(
                f"{label[0]:26} {image:13} ceiling {top:5.0f} img/s; at 16 clients the "
                f"service reaches {served / top:4.0%} of it, {served / offline[model][image]:4.0%} "
                f"of imageclf predict on files and {served / baseline:5.1f}x the naive Flask app"
            )
    p50 = rows["Keras, batching", "32x32 PNG"][1].p50_ms
    print(f"single-client p50, 32x32 PNG, Keras: {p50:.1f} ms")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other work on this machine)")
    change = rss_10000 / rss_100 - 1
    print(
        f"RSS after 100 requests {rss_100:.0f} MiB, after 10,000 {rss_10000:.0f} MiB "
        f"({change:+.1%})"
    )


if __name__ == "__main__":
    main()
