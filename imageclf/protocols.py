"""The wire formats of `imageclf serve`: the Open Inference Protocol (KServe v2) REST API with
its binary tensor data extension, TF Serving's REST predict API, and the image uploads of
`/predict`. Request bodies are read into uint8 images here and checked against the model's
input and the service's limits; whatever is wrong raises `RequestError` with a message that
says what, and the HTTP status to answer with.

The model's one input is `image`, UINT8, N x H x W x 3 of any H and W; its one output is
`probabilities`, FP32, N x C.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import (
    BaseModel,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from imageclf.images import decode_image

INPUT, OUTPUT = "image", "probabilities"  # tensor names, as in the Keras model


class RequestError(Exception):
    """A bad request: answered with `status` and `{"error": message}`."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


# --- Request and response bodies (validated with pydantic, described in OpenAPI) -------------

Parameter = StrictBool | StrictInt | StrictFloat | StrictStr


class TensorInput(BaseModel):
    name: str
    shape: list[StrictInt]
    datatype: str
    parameters: dict[str, Parameter] = {}
    data: list[Any] | None = Field(None, description="row-major values, flat or nested")


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Parameter] = {}


class InferenceRequest(BaseModel):
    """An Open Inference Protocol request: one input `image`, UINT8, shape [N, H, W, 3]."""

    id: str | None = None
    parameters: dict[str, Parameter] = {}
    inputs: list[TensorInput]
    outputs: list[RequestedOutput] | None = None


class TensorOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Parameter] | None = None
    data: list[float] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    id: str | None = None
    outputs: list[TensorOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TFServingRequest(BaseModel):
    """TF Serving's row format: each instance an H x W x 3 nested list of 0..255, or an
    encoded image `{"b64": "..."}`, or either under the input's name, `{"image": ...}`."""

    signature_name: str | None = None
    instances: list[Any]


class TFServingResponse(BaseModel):
    predictions: list[list[float]]


class ClassProbability(BaseModel):
    class_name: str = Field(alias="class")
    probability: float


class FilePrediction(BaseModel):
    file: str
    top: list[ClassProbability]


class PredictResponse(BaseModel):
    model: str
    predictions: list[FilePrediction]


class ErrorResponse(BaseModel):
    error: str


def parse(model: type[BaseModel], body: bytes, what: str = "request body") -> Any:
    """`body` as `model`; `what` names the body in the error of one that is not."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise RequestError(f"{what}: {validation_message(exc)}") from None


def validation_message(exc: ValidationError | RequestValidationError) -> str:
    problems = [
        ".".join(str(part) for part in error["loc"]) + ": " + error["msg"]
        if error["loc"]
        else error["msg"]
        for error in exc.errors()[:5]
    ]
    return "; ".join(problems)


# --- Images and limits -------------------------------------------------------------------


def decode_files(
    files: list[tuple[str, bytes]], max_pixels: int, size: int | None = None
) -> list[np.ndarray]:
    """Decode uploaded image files; their pixels together may not exceed `max_pixels`
    (a request of many small "decompression bombs" is refused like one big one). `size`: the
    model's input side (`decode_image`)."""
    images = []
    for name, data in files:
        images.append(decode_image(data, max_pixels=max_pixels, name=name, size=size))
        check_pixels(sum(image.shape[0] * image.shape[1] for image in images), max_pixels)
    return images


def header_pixels(data: bytes) -> int | None:
    """Width x height of an image file as its header says, without decoding it; None when
    Pillow cannot read the header (decoding the file will say what is wrong)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            return width * height
    except Exception:  # any unreadable header: the decode that follows reports it
        return None


def check_pixels(pixels: int, max_pixels: int) -> None:
    """Refuse a request whose images hold more than `max_pixels` pixels together."""
    if pixels > max_pixels:
        raise RequestError(
            f"the images of this request have more than {max_pixels:,} pixels together, over "
            "the limit (--max-pixels); send fewer or smaller images per request"
        )


def uint8_images(values: Any, what: str) -> np.ndarray:
    """A nested list of integers 0..255 as a uint8 array (a ragged list is an error)."""
    try:
        array = np.asarray(values)
    except ValueError:
        raise RequestError(f"{what}: not a regular nested array (rows of unequal length)") from None
    if array.size and (array.dtype.kind not in "iu" or array.min() < 0 or array.max() > 255):
        raise RequestError(f"{what}: values must be integers 0..255 (UINT8)")
    return array.astype(np.uint8)


def check_count(count: int, max_images: int) -> None:
    if count > max_images:
        raise RequestError(
            f"{count} images in one request, over the limit of {max_images} (--max-images); "
            "split the request",
            413,
        )


def content_type(headers: Mapping[str, str]) -> str:
    """The media type of a request, lower case, without parameters."""
    return headers.get("content-type", "").split(";")[0].strip().lower()


def require_json(media_type: str) -> None:
    # no Content-Type is fine: Triton's client sends none with JSON
    if media_type and media_type != "application/json" and not media_type.endswith("+json"):
        raise RequestError(
            f"Content-Type {media_type} is not supported here; send JSON "
            "with Content-Type: application/json",
            415,
        )


# --- Open Inference Protocol (KServe v2) ----------------------------------------------------


def split_binary(
    body: bytes, header_length: str | None, content_type: str
) -> tuple[bytes, bytes | None]:
    """The JSON header and the binary tensor data after it (binary tensor data extension, the
    header's length in `header_length`), or the whole body and None for a plain JSON request."""
    length = header_length
    if length is None:
        if content_type == "application/octet-stream":
            raise RequestError(
                "Content-Type application/octet-stream without an Inference-Header-Content-"
                "Length header: with binary tensor data, that header gives the byte length of "
                "the JSON header at the start of the body; or send JSON with Content-Type: "
                "application/json",
                415,
            )
        require_json(content_type)
        return body, None
    if content_type not in ("", "application/octet-stream", "application/json"):
        raise RequestError(
            f"Content-Type {content_type} is not supported with binary tensor data; "
            "use application/octet-stream",
            415,
        )
    if not length.isdigit() or int(length) > len(body):
        raise RequestError(
            f"Inference-Header-Content-Length: {length!r} is not a byte count within the "
            f"body of {len(body)} bytes"
        )
    return body[: int(length)], body[int(length) :]


def v2_images(
    request: InferenceRequest, binary: bytes | None, max_images: int, max_pixels: int
) -> np.ndarray:
    """The N x H x W x 3 uint8 tensor of a v2 request (checked against the model's input)."""
    if len(request.inputs) != 1 or request.inputs[0].name != INPUT:
        names = [tensor.name for tensor in request.inputs]
        raise RequestError(
            f"inputs {names}: this model takes one input, {INPUT!r} (UINT8, shape [N, H, W, 3])"
        )
    tensor = request.inputs[0]
    what = f"input {INPUT!r}"
    if tensor.datatype != "UINT8":
        raise RequestError(f"{what}: datatype {tensor.datatype!r}; this model takes UINT8")
    shape = tensor.shape
    if len(shape) != 4 or shape[3] != 3 or min(shape) < 1:
        raise RequestError(f"{what}: shape {shape}; this model takes [N, H, W, 3], each >= 1")
    check_count(shape[0], max_images)
    check_pixels(shape[0] * shape[1] * shape[2], max_pixels)
    size = math.prod(shape)
    binary_size = tensor.parameters.get("binary_data_size")
    if binary_size is not None:
        if binary is None:
            raise RequestError(
                f"{what}: binary_data_size given, but the request has no "
                "Inference-Header-Content-Length header"
            )
        if tensor.data is not None:
            raise RequestError(f"{what}: give either data or binary_data_size, not both")
        if binary_size != size or len(binary) != size:
            raise RequestError(
                f"{what}: shape {shape} needs {size} bytes; binary_data_size says "
                f"{binary_size!r} and the body holds {len(binary)} after the JSON header"
            )
        return np.frombuffer(binary, np.uint8).reshape(shape)
    if binary:
        raise RequestError(f"{len(binary)} bytes of binary data that no input claims")
    if tensor.data is None:
        raise RequestError(f"{what}: no data; give data, or binary_data_size with the bytes")
    array = uint8_images(tensor.data, what)
    if array.size != size:
        raise RequestError(f"{what}: {array.size} values; shape {shape} needs {size}")
    return array.reshape(shape)


def binary_output(request: InferenceRequest) -> bool:
    """Whether the client asked for the output as binary data."""
    wanted = request.parameters.get("binary_data_output", False)
    for output in request.outputs or []:
        if output.name != OUTPUT:
            raise RequestError(f"unknown output {output.name!r}; this model has {OUTPUT!r}")
        wanted = output.parameters.get("binary_data", wanted)
    return wanted is True


def v2_response(
    name: str, request: InferenceRequest, probabilities: np.ndarray, binary: bool
) -> Response:
    output: dict[str, Any] = {
        "name": OUTPUT,
        "datatype": "FP32",
        "shape": list(probabilities.shape),
    }
    header: dict[str, Any] = {"model_name": name}
    if request.id is not None:
        header["id"] = request.id
    header["outputs"] = [output]
    if not binary:
        output["data"] = probabilities.ravel().tolist()
        return JSONResponse(header)
    data = probabilities.astype("<f4").tobytes()
    output["parameters"] = {"binary_data_size": len(data)}
    head = json.dumps(header).encode()
    return Response(
        head + data,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )


# --- TF Serving REST ------------------------------------------------------------------------


def tf_serving_instances(request: TFServingRequest) -> list[Any]:
    """The instances of a predict request, one image each."""
    if request.signature_name not in (None, "serving_default"):
        raise RequestError(
            f"signature_name {request.signature_name!r}: this model has one, 'serving_default'"
        )
    if not request.instances:
        raise RequestError("instances: empty; give one image per instance")
    return request.instances


def tf_serving_image(
    instance: Any, index: int, max_pixels: int, size: int | None = None
) -> np.ndarray:
    """One instance: an H x W x 3 nested list, {"b64": encoded image} or {"image": either}."""
    what = f"instances[{index}]"
    if isinstance(instance, dict) and set(instance) == {INPUT}:
        instance, what = instance[INPUT], f"{what}.{INPUT}"
    if isinstance(instance, dict):
        if set(instance) != {"b64"} or not isinstance(instance["b64"], str):
            raise RequestError(
                f"{what}: an object must be {{'b64': '<base64 of an image file>'}} "
                f"or {{'{INPUT}': ...}}; got keys {sorted(instance)}"
            )
        try:  # line breaks allowed (`base64` wraps its output), nothing else outside base64
            data = base64.b64decode("".join(instance["b64"].split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestError(f"{what}.b64: not base64 ({exc})") from None
        return decode_files([(what, data)], max_pixels, size)[0]
    if not isinstance(instance, list):
        raise RequestError(f"{what}: give an H x W x 3 nested list of 0..255 or {{'b64': ...}}")
    image = uint8_images(instance, what)
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape) < 1:
        raise RequestError(f"{what}: shape {list(image.shape)}; this model takes [H, W, 3]")
    return image


def tf_serving_images(
    instances: list[Any], max_pixels: int, size: int | None = None
) -> list[np.ndarray]:
    """The images of a predict request's instances (in a worker thread: decoding is work)."""
    images = []
    for index, instance in enumerate(instances):  # checked as they come: memory stays bounded
        images.append(tf_serving_image(instance, index, max_pixels, size))
        check_pixels(sum(image.shape[0] * image.shape[1] for image in images), max_pixels)
    return images


# --- Uploads (multipart/form-data) ----------------------------------------------------------


def multipart_files(body: bytes, content_type: str, max_files: int) -> list[tuple[str, bytes]]:
    """The uploaded files of a multipart/form-data body, as (file name, content), in order;
    parts without a file name (plain form fields) are left out.

    python-multipart parses the body straight into memory, as it is bounded already
    (--max-body-mb). Starlette's `request.form()` spools every file through a temporary-file
    object and several awaits: with it the app took 376 us of CPU per request, 359 with this
    together with the batching queue's fewer wake-ups (benchmarks/serve_path.py)."""
    _, options = parse_options_header(content_type)
    if not options.get(b"boundary"):
        raise RequestError(
            "Content-Type multipart/form-data without its boundary parameter; let the client "
            "build the body (curl -F file=@cat.jpg)"
        )
    parts = _FileParts(max_files)
    parser = MultipartParser(options[b"boundary"], parts.callbacks())
    try:
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise RequestError(f"not a valid multipart/form-data body ({exc})") from None
    if body and not parts.ended:
        raise RequestError("the multipart/form-data body ends before its closing boundary")
    return [(name, b"".join(chunks)) for name, chunks in parts.files]


class _FileParts:
    """python-multipart's callbacks, collecting the parts that are files."""

    def __init__(self, max_files: int) -> None:
        self.max_files = max_files
        self.files: list[tuple[str, list[bytes]]] = []
        self.fields = 0
        self._header = [b"", b""]  # name and value of the part's header being read
        self._disposition = b""
        self._chunks: list[bytes] | None = None  # the current part's content, if a file
        self.ended = False  # the closing boundary was read: the body is whole

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_end": self.on_end,
        }

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header[0] += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header[1] += data[start:end]

    def on_header_end(self) -> None:
        if self._header[0].lower() == b"content-disposition":
            self._disposition = self._header[1]
        self._header = [b"", b""]

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._disposition = b""
        if b"filename" not in options:
            # a plain field: not an image; bounded like files, so many tiny ones cost little
            self.fields += 1
            if self.fields > self.max_files:
                raise RequestError(f"more than {self.max_files} form fields in one request")
            self._chunks = None
            return
        if len(self.files) == self.max_files:
            raise RequestError(
                f"more than {self.max_files} files in one request, over the limit "
                "(--max-images); split the request",
                413,
            )
        name = options[b"filename"].decode(errors="replace") or f"file {len(self.files) + 1}"
        self._chunks = []
        self.files.append((name, self._chunks))

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._chunks is not None:
            self._chunks.append(data[start:end])

    def on_end(self) -> None:
        self.ended = True
