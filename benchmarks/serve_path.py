"""Where the time of `imageclf serve` goes, for POST /predict with a 32 x 32 PNG.

1. The event loop's CPU per request: the whole ASGI app (middleware, routing, multipart
   parsing, decoding, batching queue, JSON answer) called in-process, one request at a time,
   with the model replaced by a function that returns at once, so that only the service's
   own work is counted; with small uploads decoded in the loop (the service's way) and with
   every upload handed to a worker thread (`INLINE_DECODE_PIXELS = 0`).
2. Under 16 concurrent clients (benchmarks/serve.py's load generator, in a subprocess), with the
   real model: requests/s, the share of the time the model is busy, its mean batch and cost
   per image, and the mean gap between two model calls.

    python benchmarks/serve_path.py --model export/model.tflite    # about 1 minute
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import uvicorn

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from benchmarks import serve as load  # noqa: E402
from imageclf import serve  # noqa: E402
from imageclf.predict import Classifier, load_classifier  # noqa: E402
from imageclf.serve_options import Settings  # noqa: E402


def app_cpu_per_request(classifier: Classifier, requests: int = 3000) -> float:
    """Microseconds of CPU (all threads of this process) per POST /predict through the app."""
    raw = load.upload_request("/predict", "image", load.test_images()["32x32 PNG"])
    head, body = raw.split(b"\r\n\r\n", 1)
    headers = [tuple(line.split(b": ", 1)) for line in head.split(b"\r\n")[1:]]
    headers = [(key.lower(), value) for key, value in headers]
    app = serve.create_app(classifier, Settings(batch_wait_ms=0))

    async def one() -> None:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/predict", "raw_path": b"/predict",
            "query_string": b"", "root_path": "", "headers": headers,
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000), "state": {},
        }  # fmt: skip
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        await app(scope, receive, send)
        if sent[0]["status"] != 200:
            raise SystemExit(f"POST /predict answered {sent[0]['status']}: {sent[-1]}")

    async def run() -> float:
        async with app.router.lifespan_context(app):
            for _ in range(200):  # warm-up
                await one()
            start = time.process_time()
            for _ in range(requests):
                await one()
            return (time.process_time() - start) / requests * 1e6

    return asyncio.run(run())


def model_busy(model: Path, clients: int = 16, port: int = 8137) -> str:
    """Serve `model` in this process with its calls timed, under `clients` concurrent clients."""
    classifier = load_classifier(model)
    classifier.predict(np.zeros((1, 32, 32, 3), np.uint8))
    calls: list[tuple[float, float, int]] = []
    run = classifier.run

    def timed(images: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        result = run(images)
        calls.append((start, time.perf_counter(), len(images)))
        return result

    classifier.run = timed
    app = serve.create_app(classifier, Settings())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    report: list[str] = []

    def clients_then_stop() -> None:
        while not server.started:
            time.sleep(0.1)
        code = (
            f"import sys; sys.path.insert(0, {str(PROJECT)!r}); from benchmarks import serve as b; "
            "r = b.upload_request('/predict', 'image', b.test_images()['32x32 PNG']); "
            f"open(sys.argv[1], 'w').write(repr(b.measure({port}, r, {clients})))"
        )
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "cell.txt"
            subprocess.run([sys.executable, "-c", code, str(out)], check=True)  # warm-up
            calls.clear()
            subprocess.run([sys.executable, "-c", code, str(out)], check=True)
            cell = out.read_text()
        span = calls[-1][1] - calls[0][0]
        busy = sum(end - start for start, end, _ in calls)
        images = sum(size for *_, size in calls)
        gaps = [calls[i + 1][0] - calls[i][1] for i in range(len(calls) - 1)]
        report.append(
            f"{cell}\nmodel busy {100 * busy / span:.0f}% of {span:.1f} s: "
            f"{len(calls)} calls, mean batch {images / len(calls):.1f}, "
            f"{1e3 * busy / images:.3f} ms per image, mean gap between calls "
            f"{1e3 * float(np.mean(gaps)):.2f} ms"
        )
        server.should_exit = True

    threading.Thread(target=clients_then_stop, daemon=True).start()
    server.run()
    return report[0] if report else "(no measurement)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=PROJECT / "export" / "model.tflite")
    args = parser.parse_args()
    real = load_classifier(args.model)
    instant = Classifier(
        real.path,
        real.format,
        real.class_names,
        lambda images: np.full((len(images), len(real.class_names)), 0.1, np.float32),
    )
    inline = app_cpu_per_request(instant)
    small = serve.INLINE_DECODE_PIXELS
    serve.INLINE_DECODE_PIXELS = 0
    threaded = app_cpu_per_request(instant)
    serve.INLINE_DECODE_PIXELS = small
    print(
        f"app CPU per request (model stand-in): {inline:.0f} us decoding in the loop, "
        f"{threaded:.0f} us decoding in a worker thread"
    )
    print(f"16 clients, {args.model}:", model_busy(args.model))


if __name__ == "__main__":
    main()
