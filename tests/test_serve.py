"""`imageclf serve` as users meet it: the real command in a subprocess on a free port, real HTTP
on 127.0.0.1, the tiny model of the session's finished pipeline repository."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests import serve_page, synthetic
from tests.repos import run, sha256, venv_env

NAME = "imageclf"
INFER = f"/v2/models/{NAME}/infer"
TF_PREDICT = f"/v1/models/{NAME}:predict"
MAX_BODY_MB = 2
MAX_IMAGES = 4


class Server:
    """An `imageclf serve` subprocess, and plain HTTP requests to it."""

    def __init__(self, model: Path, log: Path, *options: str) -> None:
        with socket.socket() as probe:  # a free port: bind to 0, read it, let it go
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.log = log
        command = ["imageclf", "serve", "--model", str(model), "--port", str(self.port)]
        with log.open("w") as output:
            self.process = subprocess.Popen(
                [*command, *options], env=venv_env(), stdout=output, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"imageclf serve exited:\n{log.read_text()[-4000:]}")
            with contextlib.suppress(OSError):
                if self.request("GET", "/v2/health/ready")[0] == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"imageclf serve did not get ready:\n{log.read_text()[-4000:]}")

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def json(self, method: str, path: str, payload: object = None, **headers: str) -> tuple:
        body = None if payload is None else json.dumps(payload).encode()
        if body is not None:
            headers.setdefault("Content-Type", "application/json")
        status, response_headers, content = self.request(method, path, body, headers)
        return status, json.loads(content)

    def upload(self, *files: tuple[str, bytes], top_k: int = 5) -> tuple[int, dict]:
        body, content_type = multipart(files)
        status, _, content = self.request(
            "POST", f"/predict?top_k={top_k}", body, {"Content-Type": content_type}
        )
        return status, json.loads(content)

    def metrics(self) -> str:
        return self.request("GET", "/metrics")[2].decode()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)


def multipart(files: tuple[tuple[str, bytes], ...]) -> tuple[bytes, str]:
    boundary = "imageclf-test-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in files
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), (
        f"multipart/form-data; boundary={boundary}"
    )


def encoded(image: np.ndarray, format: str = "PNG") -> bytes:  # noqa: A002
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=format)
    return buffer.getvalue()


def v2_tensor(images: np.ndarray, **extra: object) -> dict:
    return {
        "inputs": [
            {
                "name": "image",
                "shape": list(images.shape),
                "datatype": "UINT8",
                "data": images.ravel().tolist(),
            }
        ],
        **extra,
    }


def binary_request(images: np.ndarray, binary_output: bool) -> tuple[bytes, dict[str, str]]:
    """A request in the binary tensor data extension: JSON header, then the tensor's bytes."""
    header = {
        "inputs": [
            {
                "name": "image",
                "shape": list(images.shape),
                "datatype": "UINT8",
                "parameters": {"binary_data_size": images.nbytes},
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": binary_output}}],
    }
    head = json.dumps(header).encode()
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(head)),
    }
    return head + images.tobytes(), headers


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The service with the default host, name, batching and pixel limit."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    options = ["--max-body-mb", str(MAX_BODY_MB), "--max-images", str(MAX_IMAGES)]
    started = Server(tiny_model, log, *options)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def class_names(server: Server) -> list[str]:
    return [c.strip() for c in re.findall(r'id="classes">([^<]*)<', page(server))[0].split(",")]


@pytest.fixture(scope="module")
def red_image() -> np.ndarray:
    """A 24 x 20 image of the tiny model's first class (red), not its training size."""
    return synthetic.class_images(0, 1, 24, seed=7)[0][:, :20]


@pytest.fixture(scope="module")
def photos(
    red_image: np.ndarray, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[Path, dict[str, float]]:
    """Two image files and what `imageclf predict --json` says of them: {file: {class: p}}."""
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(red_image).save(folder / "red.png")
    Image.fromarray(synthetic.class_images(2, 1, 40, seed=11)[0]).save(folder / "blue photo.jpg")
    cli = run(
        folder, "imageclf", "predict", ".", "--json", "--top-k", "3", "--model", str(tiny_model)
    )
    lines = [json.loads(line) for line in cli.stdout.splitlines()]
    return {
        folder / line["file"]: {c["class"]: c["probability"] for c in line["top"]} for line in lines
    }


def page(server: Server) -> str:
    status, headers, content = server.request("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    return content.decode()


# --- Routes ---------------------------------------------------------------------------------


def test_health_and_metadata_follow_the_open_inference_protocol(
    server: Server, tiny_model: Path
) -> None:
    assert server.json("GET", "/v2/health/live") == (200, {"live": True})
    assert server.json("GET", "/v2/health/ready") == (200, {"ready": True})
    assert server.json("GET", f"/v2/models/{NAME}/ready") == (200, {"name": NAME, "ready": True})
    status, metadata = server.json("GET", "/v2")
    assert status == 200 and "binary_tensor_data" in metadata["extensions"]
    status, metadata = server.json("GET", f"/v2/models/{NAME}")
    assert status == 200
    assert metadata["name"] == NAME
    assert metadata["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}]
    assert metadata["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(synthetic.CLASSES)]}
    ]
    # listens on 127.0.0.1 unless told otherwise
    assert f"on http://127.0.0.1:{server.port}" in server.log.read_text()


def test_page_shows_the_model_and_loads_only_local_assets(
    server: Server, tiny_model: Path, class_names: list[str]
) -> None:
    html = page(server)
    assert class_names == sorted(synthetic.CLASSES)
    accuracy = json.loads((tiny_model.parents[1] / "metrics" / "eval.json").read_text())
    assert f"{accuracy['accuracy']:.2%}" in html
    assert sha256(tiny_model).removeprefix("sha256:") in html
    assets = re.findall(r'(?:src|href)="(static/[^"]+)"', html)
    assert {"static/app.js", "static/style.css"} <= set(assets)
    for asset in assets:
        status, _, content = server.request("GET", "/" + asset)
        assert status == 200 and b"https://" not in content, asset
    assert "https://" not in html and 'name="viewport"' in html


def test_openapi_describes_every_route_and_its_docs_page_is_local(server: Server) -> None:
    status, schema = server.json("GET", "/openapi.json")
    assert status == 200
    routes = {
        f"{method.upper()} {path}" for path, item in schema["paths"].items() for method in item
    }
    assert routes >= {
        "GET /v2",
        "GET /v2/health/live",
        "GET /v2/health/ready",
        "GET /v2/models/{model}",
        "GET /v2/models/{model}/ready",
        "POST /v2/models/{model}/infer",
        "POST /v1/models/{model}:predict",
        "POST /predict",
        "GET /metrics",
    }
    infer_body = schema["paths"]["/v2/models/{model}/infer"]["post"]["requestBody"]
    assert infer_body["content"]["application/json"]["schema"]["$ref"].endswith("InferenceRequest")
    assert "InferenceRequest" in schema["components"]["schemas"]
    status, _, docs = server.request("GET", "/docs")
    assert status == 200
    scripts = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", docs.decode())
    assert scripts and all(url.startswith("/") for url in scripts), scripts
    for url in scripts:
        assert server.request("GET", url)[0] == 200, url


# --- One image, every API, the same answer --------------------------------------------------


def test_every_api_gives_the_same_probabilities_as_imageclf_predict(
    server: Server, class_names: list[str], photos: dict[Path, dict[str, float]]
) -> None:
    path = next(path for path in photos if path.name == "red.png")
    expected = photos[path]
    assert max(expected, key=expected.get) == "red"
    png = path.read_bytes()
    red_image = np.asarray(Image.open(path))
    images = red_image[None]

    status, uploaded = server.upload(("red.png", png), top_k=3)
    assert status == 200 and uploaded["predictions"][0]["file"] == "red.png"
    answers = {
        "/predict": {c["class"]: c["probability"] for c in uploaded["predictions"][0]["top"]}
    }

    status, v2 = server.json("POST", INFER, v2_tensor(images, id="42"))
    assert status == 200 and v2["id"] == "42" and v2["model_name"] == NAME
    assert v2["outputs"][0]["shape"] == [1, 3] and v2["outputs"][0]["datatype"] == "FP32"
    answers["v2 JSON"] = dict(zip(class_names, v2["outputs"][0]["data"]))

    for binary_output in (False, True):
        body, headers = binary_request(images, binary_output)
        status, response_headers, content = server.request("POST", INFER, body, headers)
        assert status == 200, content
        if binary_output:
            length = int(response_headers["inference-header-content-length"])
            header = json.loads(content[:length])
            assert header["outputs"][0]["parameters"]["binary_data_size"] == 12
            values = np.frombuffer(content[length:], "<f4").tolist()
        else:
            values = json.loads(content)["outputs"][0]["data"]
        answers[f"v2 binary in, binary out {binary_output}"] = dict(zip(class_names, values))

    instances = [red_image.tolist(), {"b64": base64.b64encode(png).decode()}]
    status, v1 = server.json("POST", TF_PREDICT, {"instances": instances})
    assert status == 200 and len(v1["predictions"]) == 2
    answers["v1 nested list"] = dict(zip(class_names, v1["predictions"][0]))
    answers["v1 b64"] = dict(zip(class_names, v1["predictions"][1]))

    for api, probabilities in answers.items():
        assert probabilities.keys() == expected.keys(), api
        for name, probability in probabilities.items():
            assert probability == pytest.approx(expected[name], abs=1e-5), (api, name)


def test_a_triton_client_works_unchanged(server: Server, red_image: np.ndarray) -> None:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(NAME)
    assert client.get_model_metadata(NAME)["inputs"][0]["datatype"] == "UINT8"
    images = np.stack([red_image, synthetic.class_images(2, 1, 24, seed=7)[0][:, :20]])
    # the versioned routes too: what a client given a model_version calls
    assert client.get_model_metadata(NAME)["versions"] == ["1"]
    assert client.is_model_ready(NAME, model_version="1")
    assert client.get_model_metadata(NAME, model_version="1")["name"] == NAME
    answers = []
    for binary, version in ((False, ""), (True, ""), (True, "1")):
        tensor = httpclient.InferInput("image", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images, binary_data=binary)
        output = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
        result = client.infer(NAME, [tensor], model_version=version, outputs=[output])
        answers.append(result.as_numpy("probabilities"))
    with pytest.raises(InferenceServerException, match="no version '2'"):
        client.infer(NAME, [tensor], model_version="2")
    status, tf_serving = server.json("POST", TF_PREDICT, {"instances": images.tolist()})
    assert status == 200
    versioned = f"/v1/models/{NAME}/versions/1:predict"
    assert server.json("POST", versioned, {"instances": images.tolist()}) == (200, tf_serving)
    for answer in answers:
        np.testing.assert_allclose(answer, tf_serving["predictions"], atol=1e-6)
    # TF Serving's model status, as its clients poll it
    status, state = server.json("GET", f"/v1/models/{NAME}")
    assert status == 200
    assert state["model_version_status"][0]["version"] == "1"
    assert state["model_version_status"][0]["state"] == "AVAILABLE"
    assert server.json("GET", f"/v1/models/{NAME}/versions/1") == (200, state)
    assert server.json("GET", f"/v1/models/{NAME}/versions/3")[0] == 404
    with pytest.raises(InferenceServerException, match="UINT8"):
        bad = httpclient.InferInput("image", [1, 2, 2, 3], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 2, 2, 3), np.float32))
        client.infer(NAME, [bad])


# --- Bad requests ---------------------------------------------------------------------------

JSON = {"Content-Type": "application/json"}
SMALL = np.full((1, 2, 2, 3), 7, np.uint8)


def _bad_requests() -> list[tuple[str, str, bytes, dict, int, str]]:
    """(what, path, body, headers, status, words of the error); a path is POSTed to unless it
    starts with another method ("GET /v2/...")."""
    jpeg = encoded(synthetic.class_images(1, 1, 64, seed=3)[0], "JPEG")
    upload = lambda *files: multipart(files)  # noqa: E731
    cases = []

    def case(what, path, body, headers, status, words):
        cases.append((what, path, body, headers, status, words))

    body, content_type = upload(("notes.txt", b"not an image at all"))
    case("not an image", "/predict", body, {"Content-Type": content_type}, 400, "notes.txt")
    body, content_type = upload(("empty.png", b""))
    case("empty upload", "/predict", body, {"Content-Type": content_type}, 400, "empty")
    body, content_type = upload(("cut.jpg", jpeg[: len(jpeg) // 2]))
    case("truncated JPEG", "/predict", body, {"Content-Type": content_type}, 400, "cut.jpg")
    body, content_type = upload(*[(f"{i}.jpg", jpeg) for i in range(MAX_IMAGES + 1)])
    case("too many files", "/predict", body, {"Content-Type": content_type}, 413, "--max-images")
    body, content_type = upload()
    case("no file", "/predict", body, {"Content-Type": content_type}, 400, "no file")
    case("JSON to /predict", "/predict", b"{}", JSON, 415, "multipart/form-data")
    body, content_type = upload(("a.jpg", jpeg))
    headers = {"Content-Type": "multipart/form-data"}
    case("multipart without boundary", "/predict", body, headers, 400, "boundary")
    headers = {"Content-Type": content_type}
    case("multipart cut short", "/predict", body[:-30], headers, 400, "closing boundary")
    case("not multipart at all", "/predict", b"%PDF-1.4", headers, 400, "multipart/form-data")
    body, content_type = multipart((("a.jpg", jpeg),))
    case("top_k 0", "/predict?top_k=0", body, {"Content-Type": content_type}, 400, "top_k")

    def infer(payload: object, **headers: str) -> tuple[bytes, dict]:
        return json.dumps(payload).encode(), {**JSON, **headers}

    case("malformed JSON", INFER, b'{"inputs": [', JSON, 400, "JSON")
    case("JSON of the wrong kind", INFER, b"[1, 2, 3]", JSON, 400, "object")
    case("form content type", INFER, b"a=1", {"Content-Type": "text/plain"}, 415, "Content-Type")
    case("wrong shape", INFER, *infer(v2_tensor(SMALL[0])), 400, "shape")
    wrong_type = v2_tensor(SMALL.astype(np.float32))
    wrong_type["inputs"][0]["datatype"] = "FP32"
    case("wrong datatype", INFER, *infer(wrong_type), 400, "UINT8")
    short = v2_tensor(SMALL)
    short["inputs"][0]["data"] = short["inputs"][0]["data"][:-1]
    case("wrong length", INFER, *infer(short), 400, "needs 12")
    above = v2_tensor(SMALL)
    above["inputs"][0]["data"][0] = 256
    case("value above 255", INFER, *infer(above), 400, "0..255")
    ragged = v2_tensor(SMALL)
    ragged["inputs"][0]["data"] = [[1, 2, 3], [4, 5]]
    case("ragged data", INFER, *infer(ragged), 400, "regular")
    unknown = v2_tensor(SMALL)
    unknown["inputs"][0]["name"] = "pixels"
    case("unknown input", INFER, *infer(unknown), 400, "'image'")
    case("unknown output", INFER, *infer(v2_tensor(SMALL, outputs=[{"name": "x"}])), 400, "'x'")
    many = np.zeros((MAX_IMAGES + 1, 1, 1, 3), np.uint8)
    case("too many images", INFER, *infer(v2_tensor(many)), 413, "--max-images")
    huge = {"inputs": [{"name": "image", "shape": [1, 10**5, 10**5, 3], "datatype": "UINT8"}]}
    case("huge declared shape", INFER, *infer(huge), 400, "--max-pixels")
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    case("deeply nested JSON", INFER, deep, JSON, 400, "")
    body, headers = binary_request(SMALL, False)
    case("binary data cut short", INFER, body[:-1], headers, 400, "binary_data_size")
    case("binary data too long", INFER, body + b"\0", headers, 400, "binary_data_size")
    bad_length = {**headers, "Inference-Header-Content-Length": "99999"}
    case("header length past the body", INFER, body, bad_length, 400, "Inference-Header")
    bad_length = {**headers, "Inference-Header-Content-Length": "-5"}
    case("negative header length", INFER, body, bad_length, 400, "Inference-Header")
    short_length = {**headers, "Inference-Header-Content-Length": str(len(body) // 2)}
    case("header length inside the tensor", INFER, body, short_length, 400, "Inference-Header")
    no_length = {"Content-Type": "application/octet-stream"}
    case("binary without its header length", INFER, body, no_length, 415, "Inference-Header")
    case("unknown model (v2)", "/v2/models/other/infer", *infer(v2_tensor(SMALL)), 404, "other")
    case("unknown model metadata", "GET /v2/models/other", b"", {}, 404, "other")
    case("unknown model ready", "GET /v2/models/other/ready", b"", {}, 404, "other")
    case("unknown route", "GET /v3/models", b"", {}, 404, "/v3/models")
    case("wrong method", "GET /predict", b"", {}, 405, "Method Not Allowed")

    png = encoded(SMALL[0])
    case("TF Serving: malformed JSON", TF_PREDICT, b'{"instances": [[', JSON, 400, "JSON")
    case("TF Serving: no instances", TF_PREDICT, b"{}", JSON, 400, "instances")
    case("TF Serving: empty instances", TF_PREDICT, b'{"instances": []}', JSON, 400, "instances")
    case("TF Serving: bad base64", TF_PREDICT, b'{"instances": [{"b64": "%%"}]}', JSON, 400, "b64")
    not_image = base64.b64encode(b"hello")
    body = b'{"instances": [{"b64": "' + not_image + b'"}]}'
    case("TF Serving: b64 of a non-image", TF_PREDICT, body, JSON, 400, "not a readable image")
    case("TF Serving: wrong shape", TF_PREDICT, b'{"instances": [[1, 2, 3]]}', JSON, 400, "shape")
    body = json.dumps({"instances": [{"b64": base64.b64encode(png).decode()}] * 5}).encode()
    case("TF Serving: too many", TF_PREDICT, body, JSON, 413, "--max-images")
    body = json.dumps({"instances": [SMALL[0].tolist()]}).encode()
    case("TF Serving: unknown model", "/v1/models/other:predict", body, JSON, 404, "other")
    case("TF Serving: form", TF_PREDICT, body, {"Content-Type": "text/plain"}, 415, "JSON")
    return cases


BAD_REQUESTS = _bad_requests()


@pytest.mark.parametrize(
    "path, body, headers, status, words", [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)  # fmt: skip
def test_a_bad_request_gets_a_4xx_json_error_saying_what_is_wrong(
    server: Server, path: str, body: bytes, headers: dict, status: int, words: str
) -> None:
    method, path = path.split(" ") if " " in path else ("POST", path)
    got, response_headers, content = server.request(method, path, body or None, headers)
    assert got == status, content
    assert response_headers["content-type"] == "application/json"
    error = json.loads(content)["error"]
    assert isinstance(error, str) and words in error


def test_a_50_megapixel_png_is_refused_before_decoding(server: Server) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (10_000, 5_000), (200, 30, 30)).save(buffer, format="PNG")
    body, content_type = multipart((("huge.png", buffer.getvalue()),))
    assert len(body) < MAX_BODY_MB * 2**20  # small on the wire: only the pixel limit stops it
    status, _, content = server.request("POST", "/predict", body, {"Content-Type": content_type})
    assert status == 400
    assert "50,000,000 pixels" in json.loads(content)["error"]


def test_a_body_over_the_limit_gets_413_before_or_while_it_is_read(server: Server) -> None:
    # declared too large: answered without reading the body
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("POST", INFER)
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(MAX_BODY_MB * 2**20 + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "--max-body-mb" in json.loads(response.read())["error"]
    connection.close()
    # chunked, no length given: stopped once the bytes received pass the limit
    chunks = (b"[" + b"0," * 2**16 for _ in range(MAX_BODY_MB * 16))
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    # the server may answer and close before the client has sent everything
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        connection.request("POST", TF_PREDICT, body=chunks, headers=JSON, encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413 and "--max-body-mb" in json.loads(response.read())["error"]
    # counted under the routes they were sent to, though answered before routing
    metrics = server.metrics()
    assert 'route="/v2/models/{model}/infer",status="413"' in metrics
    assert 'route="/v1/models/{model}:predict",status="413"' in metrics
    assert 'route="unmatched",status="413"' not in metrics


def test_no_mangled_request_gets_a_5xx(server: Server, red_image: np.ndarray) -> None:
    """Good requests of every API, cut, spliced, byte-flipped and with headers swapped: every
    answer is a 2xx or a 4xx with a JSON error (a seeded fuzz, the same every run)."""
    png = encoded(red_image)
    upload, content_type = multipart((("red.png", png),))
    binary, binary_headers = binary_request(red_image[None], True)
    originals = [
        ("/predict", upload, {"Content-Type": content_type}),
        (INFER, json.dumps(v2_tensor(red_image[None])).encode(), JSON),
        (INFER, binary, binary_headers),
        (
            TF_PREDICT,
            json.dumps({"instances": [{"b64": base64.b64encode(png).decode()}]}).encode(),
            JSON,
        ),
        (TF_PREDICT, json.dumps({"instances": [red_image.tolist()]}).encode(), JSON),
    ]
    rng = np.random.default_rng(14)
    headers_seen = [headers for _, _, headers in originals]
    statuses = []
    for _ in range(150):
        path, body, headers = originals[rng.integers(len(originals))]
        data = bytearray(body)
        for _ in range(rng.integers(1, 4)):
            at = int(rng.integers(len(data) + 1))
            mutation = rng.integers(4)
            if mutation == 0:  # cut
                data = data[:at]
            elif mutation == 1:  # flip bytes
                for i in rng.integers(0, max(len(data), 1), 8):
                    if i < len(data):
                        data[i] = int(rng.integers(256))
            elif mutation == 2:  # splice in a piece of itself
                data[at:at] = data[int(rng.integers(len(data) + 1)) :][:64]
            else:  # another request's headers
                headers = headers_seen[rng.integers(len(headers_seen))]
        status, response_headers, content = server.request("POST", path, bytes(data), headers)
        statuses.append(status)
        assert status < 500, (path, bytes(data[:300]), headers, content)
        if status >= 400:
            assert isinstance(json.loads(content)["error"], str)
    assert any(status >= 400 for status in statuses)


def test_after_every_bad_request_the_server_still_answers_and_never_gave_a_5xx(
    server: Server, red_image: np.ndarray
) -> None:
    # runs after the bad-request tests above (pytest keeps file order)
    status, answer = server.upload(("red.png", encoded(red_image)))
    assert status == 200 and answer["predictions"][0]["top"][0]["class"] == "red"
    assert server.process.poll() is None
    statuses = re.findall(r'imageclf_requests_total\{[^}]*status="(\d+)"\}', server.metrics())
    assert statuses and not [s for s in statuses if s.startswith("5")]


def test_metrics_count_requests_by_route_and_status_with_latency_and_batch_sizes(
    server: Server, red_image: np.ndarray
) -> None:
    def count(text: str, pattern: str) -> float:
        found = re.search(pattern + r" ([0-9.e+]+)", text)
        return float(found.group(1)) if found else 0.0

    ok = r'imageclf_requests_total\{method="POST",route="/predict",status="200"\}'
    batches = r"imageclf_batch_size_count"
    before = server.metrics()
    png = encoded(red_image)
    assert server.upload(("a.png", png), ("b.png", png))[0] == 200
    assert server.upload(("notes.txt", b"text"))[0] == 400
    after = server.metrics()
    assert count(after, ok) == count(before, ok) + 1
    assert count(after, r'route="/predict",status="400"\}') >= 1
    assert count(after, batches) == count(before, batches) + 1  # one call, two images
    assert count(after, r"imageclf_batch_size_sum") == count(before, r"imageclf_batch_size_sum") + 2
    assert "imageclf_request_duration_seconds_bucket" in after


# --- Batching, shutdown and the exported formats ---------------------------------------------


def test_concurrent_requests_share_a_model_call_and_sigterm_answers_those_in_flight(
    finished_repo: Path, red_image: np.ndarray, tmp_path: Path
) -> None:
    """With the exported TFLite model: four requests uploading at once go through the model as
    one batch; SIGTERM while a request is still uploading answers it, then exits."""
    tflite = finished_repo / "export" / "model.tflite"
    log = tmp_path / "log"
    batching = Server(tflite, log, "--batch-wait-ms", "2000", "--max-batch", "4")
    try:
        # the page quotes the accuracy the export stage measured for this format
        figures = json.loads((finished_repo / "metrics" / "export.json").read_text())
        assert f"{figures['tflite']['accuracy']:.2%}" in page(batching)
        body, content_type = multipart((("red.png", encoded(red_image)),))
        head = (
            f"POST /predict?top_k=3 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        request = head.encode() + body

        def start_upload() -> socket.socket:
            """A request sent but for its last byte: the server is reading it."""
            connection = socket.create_connection(("127.0.0.1", batching.port), timeout=60)
            connection.sendall(request[:-1])
            return connection

        def answer_of(connection: socket.socket) -> tuple[int, dict]:
            response = http.client.HTTPResponse(connection)
            response.begin()
            answer = json.loads(response.read())
            connection.close()
            return response.status, answer

        def wait_for(condition, what: str) -> None:
            deadline = time.monotonic() + 30
            while not condition():
                assert time.monotonic() < deadline, what
                time.sleep(0.05)

        uploads = [start_upload() for _ in range(4)]
        in_progress = "imageclf_inference_requests_in_progress {:.1f}"
        wait_for(lambda: in_progress.format(4) in batching.metrics(), "4 requests reading")
        for connection in uploads:
            connection.sendall(request[-1:])
        answers = [answer_of(connection) for connection in uploads]
        assert [status for status, _ in answers] == [200] * 4
        assert {answer["predictions"][0]["top"][0]["class"] for _, answer in answers} == {"red"}
        metrics = batching.metrics()
        assert "imageclf_batch_size_count 1.0" in metrics  # one model call ...
        assert "imageclf_batch_size_sum 4.0" in metrics  # ... for the four images

        late = start_upload()
        wait_for(lambda: in_progress.format(1) in batching.metrics(), "a request reading")
        batching.process.send_signal(signal.SIGTERM)
        wait_for(lambda: "Shutting down" in log.read_text(), "shutdown begun")
        late.sendall(request[-1:])
        status, answer = answer_of(late)
        assert status == 200 and answer["predictions"][0]["top"][0]["class"] == "red"
        # uvicorn re-raises the signal once done, for the process manager to see
        assert batching.process.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Finished server process" in log.read_text()
    finally:
        batching.stop()


def test_two_worker_processes_answer_alike_count_together_and_stop_on_sigterm(
    server: Server, tiny_model: Path, red_image: np.ndarray, tmp_path: Path
) -> None:
    """`--workers 2`: two worker processes, answering as the one-process service does;
    /metrics counts the requests of both; SIGTERM stops them all."""
    log = tmp_path / "log"
    workers = Server(tiny_model, log, "--workers", "2")
    try:
        # ready once the first worker is; the second follows
        _wait_for_startups(log, 2, seconds=60)
        children = _children(workers.process.pid)
        png = encoded(red_image)
        expected = server.upload(("red.png", png))[1]["predictions"]
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: workers.upload(("red.png", png)), range(12)))
        for status, answer in answers:
            assert status == 200
            for got, want in zip(answer["predictions"][0]["top"], expected[0]["top"]):
                assert got["class"] == want["class"]
                assert got["probability"] == pytest.approx(want["probability"], abs=1e-6)
        ok = 'imageclf_requests_total{method="POST",route="/predict",status="200"} 12.0'
        assert ok in workers.metrics()  # both workers' requests, from either
        # 16 clients that connect at once are handed to the workers in turn: 8 each, not all
        # to the first worker to wake (a shared socket) nor 10 and 6 (a socket each)
        clients = [socket.create_connection(("127.0.0.1", workers.port)) for _ in range(16)]
        try:
            deadline = time.monotonic() + 30
            servers = [pid for pid in children if "resource_tracker" not in _command_line(pid)]
            while sum(held := [_connections(pid, workers.port) for pid in servers]) < 16:
                assert time.monotonic() < deadline, held
                time.sleep(0.1)
            assert held == [8, 8], held
        finally:
            for client in clients:
                client.close()
        # a worker that stops taking connections gets no more than its queue holds (about
        # 10), and the other serves the rest; once it goes on, it answers those too
        os.kill(servers[0], signal.SIGSTOP)
        try:
            probes = [_probe(workers.port) for _ in range(40)]
            answered = _answered(probes, seconds=20, least=28)
            assert len(answered) >= 28, len(answered)
        finally:
            os.kill(servers[0], signal.SIGCONT)
        assert len(_answered(probes, seconds=30, least=40, before=frozenset(answered))) == 40
        for probe in probes:
            probe.close()
        workers.process.send_signal(signal.SIGTERM)
        assert workers.process.wait(timeout=60) in (0, -signal.SIGTERM)
        assert log.read_text().count("Finished server process") == 2
        deadline = time.monotonic() + 10  # multiprocessing's resource tracker ends last
        while [pid for pid in children if _running(pid)] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if _running(pid)]
    finally:
        workers.stop()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_ends_in_one_clear_error(tiny_model: Path, workers: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = ["imageclf", "serve", "--model", str(tiny_model), "--workers", workers]
        result = subprocess.run(
            [*command, "--port", str(port)],
            env=venv_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode != 0
    assert f"127.0.0.1:{port}: cannot listen there" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--port", "70000", "not a TCP port"),
        ("--name", "a/b", "letters, digits"),
        ("--name", "", "letters, digits"),
        ("--max-images", "1.5", "not a whole number"),
    ],
)
def test_options_out_of_range_are_refused_before_serving(
    option: str, value: str, words: str
) -> None:
    result = subprocess.run(
        ["imageclf", "serve", option, value],
        env=venv_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2  # argparse's usage error, before any model loads
    assert option in result.stderr and words in result.stderr
    assert "Traceback" not in result.stderr


def test_a_worker_restarted_after_a_crash_drops_the_dead_ones_requests_from_the_metrics(
    tiny_model: Path, red_image: np.ndarray, tmp_path: Path
) -> None:
    """`--workers 2`: workers killed while a request is in progress are restarted,
    and /metrics stops counting that request as in progress (a dead worker's live gauges)."""
    log = tmp_path / "log"
    workers = Server(tiny_model, log, "--workers", "2")
    in_progress = re.compile(r"^imageclf_inference_requests_in_progress (\S+)$", re.M)

    def requests_in_progress() -> float:
        return float(in_progress.search(workers.metrics()).group(1))

    try:
        _wait_for_startups(log, 2, seconds=60)
        with socket.create_connection(("127.0.0.1", workers.port)) as stalled:
            # an upload whose body never arrives: in progress until its worker dies
            stalled.sendall(
                b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n"
                b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
            )
            deadline = time.monotonic() + 30
            while requests_in_progress() != 1.0:
                assert time.monotonic() < deadline, workers.metrics()
                time.sleep(0.1)
            children = [
                pid
                for pid in _children(workers.process.pid)
                if "multiprocessing.resource_tracker" not in _command_line(pid)
            ]
            assert len(children) == 2
            for pid in children:
                os.kill(pid, signal.SIGKILL)
            _wait_for_startups(log, 4, seconds=120)  # both restarted
        assert requests_in_progress() == 0.0
        assert workers.upload(("red.png", encoded(red_image)))[0] == 200
        # the supervisor killed outright: its workers end too, and leave the port free
        restarted = _children(workers.process.pid)
        workers.process.kill()
        workers.process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while [pid for pid in restarted if _running(pid)]:
            assert time.monotonic() < deadline, [_command_line(pid) for pid in restarted]
            time.sleep(0.1)
        with socket.socket() as again:  # as a server binds: not held back by TIME_WAIT
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            again.bind(("127.0.0.1", workers.port))
    finally:
        workers.stop()


def _probe(port: int) -> socket.socket:
    """A connection that has sent one cheap request."""
    probe = socket.create_connection(("127.0.0.1", port), timeout=30)
    probe.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return probe


def _answered(
    probes: list[socket.socket], seconds: float, least: int, before: frozenset = frozenset()
) -> set[socket.socket]:
    """The probes answered (200): `before`, and those whose answer arrives within `seconds`,
    waiting no longer once `least` have been."""
    deadline = time.monotonic() + seconds
    answered = set(before)
    while len(answered) < least and time.monotonic() < deadline:
        pending = [probe for probe in probes if probe not in answered]
        ready, _, _ = select.select(pending, [], [], max(0.0, deadline - time.monotonic()))
        for probe in ready:
            assert probe.recv(4096).startswith(b"HTTP/1.1 200")
            answered.add(probe)
    return answered


def _wait_for_startups(log: Path, count: int, seconds: float) -> None:
    """Until uvicorn's log says `count` worker processes have started (restarts included)."""
    deadline = time.monotonic() + seconds
    while log.read_text().count("Application startup complete") < count:
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def _connections(pid: int, port: int) -> int:
    """Connections that process `pid` has accepted on `port`."""
    return sum(
        connection.laddr.port == port and connection.status == psutil.CONN_ESTABLISHED
        for connection in psutil.Process(pid).net_connections(kind="tcp")
    )


def _children(pid: int) -> list[int]:
    """The child processes of `pid` (the server's workers and multiprocessing's helpers)."""
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").glob("*/children")
        for child in task.read_text().split()
    ]


def _command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (ended, waiting for its parent to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_an_exported_saved_model_serves_what_the_keras_model_does(
    server: Server, finished_repo: Path, red_image: np.ndarray, tmp_path: Path
) -> None:
    # TF Serving's layout, export/saved_model/1/, as a team would deploy a later version
    saved_model = tmp_path / "saved_model"
    shutil.copytree(finished_repo / "export" / "saved_model" / "1", saved_model / "7")
    exported = Server(saved_model, tmp_path / "log")
    try:
        status, metadata = exported.json("GET", f"/v2/models/{NAME}")
        assert status == 200 and metadata["platform"] == "tensorflow_savedmodel"
        assert metadata["versions"] == ["7"]  # the version folder served
        assert exported.json("GET", f"/v1/models/{NAME}/versions/7")[0] == 200
        request = v2_tensor(red_image[None])
        answers = [s.json("POST", INFER, request) for s in (server, exported)]
        assert [status for status, _ in answers] == [200, 200]
        keras, saved = (answer["outputs"][0]["data"] for _, answer in answers)
        np.testing.assert_allclose(saved, keras, atol=1e-5)
    finally:
        exported.stop()


# --- The page in a real browser -------------------------------------------------------------


@pytest.mark.skipif(serve_page.missing_tools() is not None, reason=str(serve_page.missing_tools()))
def test_the_page_in_chromium_shows_the_top_class_of_imageclf_predict(
    server: Server, photos: dict[Path, dict[str, float]]
) -> None:
    image = next(path for path in photos if path.suffix == ".jpg")
    expected = max(photos[image], key=photos[image].get)
    # a phone's width
    with serve_page.open_page(f"http://127.0.0.1:{server.port}/", width=390) as page:
        [card] = serve_page.upload(page, [image])
        assert card["error"] is None and card["file"] == image.name
        assert len(card["labels"]) == len(synthetic.CLASSES)  # the top 5 of 3 classes
        assert card["labels"][0] == card["top"] == expected
        assert card["widths"] == sorted(card["widths"], reverse=True) and card["widths"][0] > 0
        assert card["preview"] == 40  # the image itself, shown
        # nothing wider than the phone's screen
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
