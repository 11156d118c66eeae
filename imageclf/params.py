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
)

from imageclf.errors import PipelineError

# Names of the architectures `imageclf.models` can build; kept here so that validating
# params does not need to import TensorFlow. Our own CNNs first, then Keras application
# backbones that can start from ImageNet weights.
OWN_ARCHITECTURES = ("fastnet", "baseline")
BACKBONES = ("mobilenet_v2", "efficientnet_b0", "resnet50")
ARCHITECTURES = OWN_ARCHITECTURES + BACKBONES

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]


class Section(BaseModel):
    # No defaults anywhere: params.yaml is the one place values live.
    # forbid: a misspelled key is an error, not a silently ignored value
    model_config = ConfigDict(extra="forbid")


class DataParams(Section):
    source: str = Field(min_length=1)
    checksum: str | None
    image_size: Annotated[int, Field(ge=8, le=1024)]


class PreprocessParams(Section):
    val_fraction: Fraction
    test_fraction: Fraction
    on_bad_image: Literal["fail", "skip"]


class AugmentParams(Section):
    copies: Annotated[int, Field(ge=1, le=100)]
    translate: Annotated[int, Field(ge=0, le=16)]
    flip: Literal["alternate", "random", "none"]
    cutout: Annotated[int, Field(ge=0)]


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
    def imagenet_needs_a_backbone(cls, value: str, info: ValidationInfo) -> str:
        arch = info.data.get("arch")
        if value == "imagenet" and arch in OWN_ARCHITECTURES:
            raise ValueError(
                f"needs a Keras application backbone as model.arch ({', '.join(BACKBONES)}), "
                f"not {arch!r}"
            )
        return value


class TrainParams(Section):
    epochs: Annotated[int, Field(ge=1)]
    batch_size: Annotated[int, Field(ge=1)]
    optimizer: Literal["sgd", "adamw"]
    lr: PositiveFloat
    momentum: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
    weight_decay: NonNegativeFloat
    warmup_epochs: NonNegativeFloat
    label_smoothing: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
    jit_compile: Literal["auto"] | bool
    precision: Literal["auto", "float32", "mixed_float16"]
    distribute: Literal["auto", "none", "mirrored"]

    @field_validator("jit_compile", mode="before")
    @classmethod
    def auto_or_bool(cls, value: object) -> object:
        if value != "auto" and not isinstance(value, bool):
            raise ValueError("must be auto, true or false")
        return value


class FinetuneParams(Section):
    epochs: Annotated[int, Field(ge=1)]
    lr: PositiveFloat
    # pretrained backbones: how many of the top layers to unfreeze, as a count of layers with
    # weights (an integer) or a fraction of them (a float in (0, 1])
    unfreeze: int | float

    @field_validator("unfreeze", mode="before")
    @classmethod
    def count_or_fraction(cls, value: object) -> object:
        is_count = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        if not is_count and not (isinstance(value, float) and 0 < value <= 1):
            raise ValueError("must be a count of layers (an integer >= 0) or a fraction in (0, 1]")
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
        problems = [_describe(error) for error in exc.errors()]
        raise PipelineError(
            f"{path}: {len(problems)} invalid value(s):\n" + "\n".join(problems)
        ) from None


def _describe(error: dict) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "missing":
        return f"  {key}: missing (required)"
    if error["type"] == "extra_forbidden":
        return f"  {key}: unknown key (check the spelling; see README for the keys)"
    message = error["msg"].removeprefix("Value error, ")
    return f"  {key} = {error.get('input')!r}: {message}"
