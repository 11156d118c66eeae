"""Load and validate params.yaml: every problem is reported at once, before any work starts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from imageclf.errors import PipelineError

# Names of the architectures `imageclf.models` can build; kept here so that validating
# params does not need to import TensorFlow. Our own CNNs first, then Keras application
# backbones that can start from ImageNet weights.
OWN_ARCHITECTURES = ("fastnet", "baseline")
BACKBONES = ("mobilenet_v2", "efficientnet_b0", "resnet50")
ARCHITECTURES = OWN_ARCHITECTURES + BACKBONES
# Weights files named in model.weights live here: the train stage depends on this folder in
# dvc.yaml, so DVC reruns training when a weights file in it changes.
PRETRAINED_DIR = "pretrained"
# fastnet's smallest input side: its 2x2 stem (unpadded) and three 2x2 max-pools leave
# (side - 1) // 8 pixels, and Keras refuses a pool whose output would be empty. baseline
# resizes to 32 inside; the Keras backbones check their own minimum when they are built.
FASTNET_MIN_INPUT = 9
CHECKSUM_LENGTHS = {"md5": 32, "sha256": 64}  # hex digits of each supported digest

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]


class Section(BaseModel):
    # No defaults anywhere: params.yaml is the one place values live.
    # forbid: a misspelled key is an error, not a silently ignored value. strict: a value of
    # another type is an error, not converted (`seed: true` meant seed 1, `epochs: "3"` 3);
    # an integer where a float goes still means that number
    model_config = ConfigDict(extra="forbid", strict=True)


class DataParams(Section):
    source: str = Field(min_length=1)
    checksum: str | None
    image_size: Annotated[int, Field(ge=8, le=1024)]

    @field_validator("checksum")
    @classmethod
    def algorithm_and_hex_digest(cls, value: str | None) -> str | None:
        if value is None:
            return value
        algorithm, _, digest = value.partition(":")
        length = CHECKSUM_LENGTHS.get(algorithm)
        if length is None or len(digest) != length or not re.fullmatch(r"[0-9a-fA-F]+", digest):
            raise ValueError("expected 'md5:<32 hex digits>', 'sha256:<64 hex digits>' or null")
        return value


class PreprocessParams(Section):
    val_fraction: Fraction
    test_fraction: Fraction
    on_bad_image: Literal["fail", "skip"]
    max_pixels: Annotated[int, Field(ge=1)]


class AugmentParams(Section):
    copies: Annotated[int, Field(ge=1, le=100)]
    translate: Annotated[int, Field(ge=0, le=16)]
    flip: Literal["alternate", "random", "none"]
    cutout: Annotated[int, Field(ge=0, le=1024)]  # at most data.image_size, checked in Params


class ModelParams(Section):
    arch: str
    widths: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=3, max_length=3)]
    # "none" (random init), "imagenet" (Keras application backbones) or the path of a `.keras`
    # model of an earlier run or of a weights file
    weights: str = Field(min_length=1)
    input_size: Annotated[int, Field(ge=8, le=1024)] | None

    @field_validator("arch")
    @classmethod
    def known_arch(cls, value: str) -> str:
        if value not in ARCHITECTURES:
            raise ValueError(f"must be one of {', '.join(ARCHITECTURES)}")
        return value

    @field_validator("weights")
    @classmethod
    def known_source_of_weights(cls, value: str, info: ValidationInfo) -> str:
        arch = info.data.get("arch")
        if value == "imagenet" and arch in OWN_ARCHITECTURES:
            raise ValueError(
                f"needs a Keras application backbone as model.arch ({', '.join(BACKBONES)}), "
                f"not {arch!r}"
            )
        path = Path(value)
        if value not in ("none", "imagenet") and (
            path.is_absolute() or path.parts[:1] != (PRETRAINED_DIR,) or ".." in path.parts
        ):
            raise ValueError(
                f"a weights file must be inside {PRETRAINED_DIR}/, so that DVC notices when it "
                f"changes: copy it there and write {PRETRAINED_DIR}/{path.name}"
            )
        return value


class TrainParams(Section):
    epochs: Annotated[int, Field(ge=1)]
    batch_size: Annotated[int, Field(ge=1)]
    optimizer: Literal["sgd", "adamw", "muon"]
    lr: PositiveFloat
    momentum: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
    muon_lr: PositiveFloat
    muon_momentum: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
    weight_decay: NonNegativeFloat
    warmup_epochs: NonNegativeFloat
    schedule: Literal["cosine", "triangular"]
    bias_lr_scale: PositiveFloat
    lookahead: bool
    label_smoothing: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
    jit_compile: Literal["auto"] | bool
    precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"]
    distribute: Literal["auto", "none", "mirrored", "multi_worker"]
    threads: Literal["auto"] | int

    @field_validator("threads", mode="before")
    @classmethod
    def auto_or_count(cls, value: object) -> object:
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError("must be auto (all cores) or a number of threads >= 1")
        return value

    @field_validator("jit_compile", mode="before")
    @classmethod
    def auto_or_bool(cls, value: object) -> object:
        if value != "auto" and not isinstance(value, bool):
            raise ValueError("must be auto, true or false")
        return value

    @field_validator("warmup_epochs")
    @classmethod
    def warmup_ends_before_training(cls, value: float, info: ValidationInfo) -> float:
        epochs = info.data.get("epochs")
        if value and epochs is not None and value >= epochs:
            raise ValueError(
                f"must be less than train.epochs ({epochs}): the learning rate would never "
                "decay. Lower it, or set 0 for no warmup"
            )
        return value


class FinetuneParams(Section):
    epochs: Annotated[int, Field(ge=0)]  # 0: the train stage's model, unchanged
    lr: PositiveFloat
    # pretrained backbones: which of the backbone's top layers with weights to unfreeze: "all",
    # a count of layers (an integer), or a share of them as a percentage string ("30%")
    unfreeze: int | str

    @field_validator("unfreeze", mode="before")
    @classmethod
    def all_count_or_percentage(cls, value: object) -> object:
        rule = 'must be all, a number of layers (an integer >= 0) or a percentage such as "30%"'
        if isinstance(value, float):
            # 1 and 1.0 meant one layer and all layers: a float is refused, with what to write
            raise ValueError(f"{rule}; for the share {value:g}, write {value * 100:g}%")
        if isinstance(value, bool) or (isinstance(value, int) and value < 0):
            raise ValueError(rule)
        if isinstance(value, str) and value != "all":
            match = re.fullmatch(r"(\d+(?:\.\d+)?)%", value)
            if not match or not 0 < float(match.group(1)) <= 100:
                raise ValueError(rule)
        return value


class EvaluateParams(Section):
    tta: Literal["none", "flip", "translate"]
    batch_size: Annotated[int, Field(ge=1)]
    misclassified: Annotated[int, Field(ge=0, le=400)]


class Params(Section):
    seed: Annotated[int, Field(ge=0, lt=2**32)]
    data: DataParams
    preprocess: PreprocessParams
    augment: AugmentParams
    model: ModelParams
    train: TrainParams
    finetune: FinetuneParams
    evaluate: EvaluateParams

    @model_validator(mode="after")
    def rules_across_sections(self) -> Params:
        problems = []  # all of them in one error, so that every one is reported at once
        if self.augment.cutout > self.data.image_size:
            problems.append(
                f"augment.cutout = {self.augment.cutout}: must be at most data.image_size "
                f"({self.data.image_size}); a larger square blanks the whole image"
            )
        if self.model.arch == "fastnet":
            key, side = "model.input_size", self.model.input_size
            if side is None:
                key, side = "data.image_size", self.data.image_size
            if side < FASTNET_MIN_INPUT:
                problems.append(
                    f"{key} = {side}: model.arch fastnet needs an input side of at least "
                    f"{FASTNET_MIN_INPUT} (its three max-pools leave nothing of smaller "
                    f"images); set {key} to {FASTNET_MIN_INPUT} or more"
                )
        if problems:
            raise ValueError("\n  ".join(problems))
        return self


# YAML 1.1 (PyYAML) reads 1e-3 as a string, because it lacks a dot; users mean 0.001.
_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _parse_floats(node: object) -> object:
    """Turn strings in scientific notation such as "1e-3" into floats, anywhere in `node`."""
    if isinstance(node, dict):
        return {key: _parse_floats(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_parse_floats(value) for value in node]
    if isinstance(node, str) and _SCIENTIFIC.match(node):
        return float(node)
    return node


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate the params file.

    Raises:
        PipelineError: naming the file and, for each problem, its key, value and rule.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found; run from the project's root") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: expected a mapping of sections, found {type(raw).__name__}")
    try:
        return Params.model_validate(_parse_floats(raw))
    except ValidationError as exc:
        # one problem a line: the rules across sections report theirs in a single error
        problems = "\n".join(_describe(error) for error in exc.errors()).splitlines()
        raise PipelineError(
            f"{path}: {len(problems)} invalid value(s):\n" + "\n".join(problems)
        ) from None


def _describe(error: dict) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if not key:  # a rule across sections names its keys itself
        return "  " + error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"  {key}: missing (required)"
    if error["type"] == "extra_forbidden":
        return f"  {key}: unknown key (check the spelling; see README for the keys)"
    message = error["msg"].removeprefix("Value error, ")
    return f"  {key} = {error.get('input')!r}: {message}"
