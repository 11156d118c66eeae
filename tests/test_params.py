"""params.yaml validation: every problem at once, with key, value and rule."""

import re
from pathlib import Path

import pytest
import yaml

from imageclf.errors import PipelineError
from imageclf.params import load_params

PROJECT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, params: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def committed() -> dict:
    return yaml.safe_load((PROJECT / "params.yaml").read_text())


def refused(tmp_path: Path, params: dict) -> str:
    """The error that loading `params` gives."""
    with pytest.raises(PipelineError) as error:
        load_params(write(tmp_path, params))
    return str(error.value)


def test_committed_params_are_valid() -> None:
    params = load_params(PROJECT / "params.yaml")
    assert params.data.source.startswith("https://www.cs.toronto.edu/")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    params = committed()
    params["train"]["epochs"] = 0
    params["train"]["lr"] = -1
    params["train"]["weight_decay"] = float("nan")
    params["preprocess"]["val_fraction"] = 1.0
    params["model"]["arch"] = "resnet9000"
    params["augment"]["flipp"] = "random"
    params["train"]["batch_size"] = "big"
    params["train"]["threads"] = 0
    params["train"]["schedule"] = "linear"
    params["train"]["distribute"] = "workers"
    params["train"]["muon_momentum"] = 1
    del params["evaluate"]
    message = refused(tmp_path, params)
    for expected in (
        "train.epochs = 0",
        "train.lr = -1",
        "train.weight_decay = nan",
        "preprocess.val_fraction = 1.0",
        "model.arch = 'resnet9000': must be one of fastnet, baseline",
        "augment.flipp: unknown key",
        "train.batch_size = 'big'",
        "train.threads = 0: must be auto (all cores) or a number of threads >= 1",
        "train.schedule = 'linear'",
        "train.distribute = 'workers'",
        "train.muon_momentum = 1",
        "evaluate: missing",
    ):
        assert expected in message
    assert message.startswith(str(tmp_path / "params.yaml"))


def test_values_of_another_type_are_refused_not_converted(tmp_path: Path) -> None:
    """A bool where a number goes, or a quoted number, is a slip to report: converted, `seed:
    true` silently meant seed 1."""
    params = committed()
    params["seed"] = True
    params["train"]["epochs"] = "3"
    params["train"]["lookahead"] = 1
    params["data"]["image_size"] = 32.0
    message = refused(tmp_path, params)
    for expected in (
        "seed = True: Input should be a valid integer",
        "train.epochs = '3': Input should be a valid integer",
        "train.lookahead = 1: Input should be a valid boolean",
        "data.image_size = 32.0: Input should be a valid integer",
    ):
        assert expected in message
    params = committed()
    params["train"]["lr"] = 1  # an integer where a float goes means the same number
    assert load_params(write(tmp_path, params)).train.lr == 1.0


def test_scientific_notation_means_the_same_number(tmp_path: Path) -> None:
    text = (PROJECT / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    path.write_text(re.sub(r"weight_decay: \S+", "weight_decay: 5e-4", text))
    assert "weight_decay: 5e-4" in path.read_text()
    assert load_params(path).train.weight_decay == 0.0005


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("seed: 1\ntrain: {epochs: 3\n")
    with pytest.raises(PipelineError, match="params.yaml: not valid YAML"):
        load_params(path)


def test_transfer_learning_params(tmp_path: Path) -> None:
    params = committed()
    params["model"].update(arch="mobilenet_v2", weights="imagenet", input_size=96)
    params["finetune"]["unfreeze"] = 20
    loaded = load_params(write(tmp_path, params))
    assert (loaded.model.weights, loaded.model.input_size, loaded.finetune.unfreeze) == (
        "imagenet",
        96,
        20,
    )
    params["finetune"]["unfreeze"] = "30%"
    assert load_params(write(tmp_path, params)).finetune.unfreeze == "30%"

    params["model"]["arch"] = "fastnet"
    params["finetune"]["unfreeze"] = 1.0  # once "all layers", next to 1 for "one layer"
    with pytest.raises(PipelineError) as error:
        load_params(write(tmp_path, params))
    assert "model.weights = 'imagenet': needs a Keras application backbone" in str(error.value)
    assert "finetune.unfreeze = 1.0: must be all, a number of layers" in str(error.value)
    assert "for the share 1, write 100%" in str(error.value)


@pytest.mark.parametrize("spelling", [0.3, "30", "0%", "101%", -1, True, "some"])
def test_unfreeze_spellings_that_could_be_misread_are_refused(
    tmp_path: Path, spelling: object
) -> None:
    params = committed()
    params["finetune"]["unfreeze"] = spelling
    with pytest.raises(PipelineError, match="finetune.unfreeze = .*must be all, a number"):
        load_params(write(tmp_path, params))


def test_rules_across_keys_are_reported_with_the_rest(tmp_path: Path) -> None:
    params = committed()
    params["train"].update(epochs=2, warmup_epochs=2.0)  # all warmup, no decay
    params["data"]["checksum"] = "md5:1234"
    params["augment"]["cutout"] = 2000
    with pytest.raises(PipelineError) as error:
        load_params(write(tmp_path, params))
    message = str(error.value)
    assert "train.warmup_epochs = 2.0: must be less than train.epochs (2)" in message
    assert "data.checksum = 'md5:1234': expected 'md5:<32 hex digits>'" in message
    assert "augment.cutout = 2000" in message
    params["augment"]["cutout"] = 40  # valid alone, larger than the 32-pixel images
    params["train"]["warmup_epochs"] = 0.5
    params["data"]["checksum"] = None
    with pytest.raises(PipelineError, match=r"augment.cutout = 40: must be at most data.image_"):
        load_params(write(tmp_path, params))


def test_fastnet_input_side_has_a_minimum(tmp_path: Path) -> None:
    params = committed()
    params["data"]["image_size"] = 8  # in range alone; fastnet's pools leave nothing of it
    params["augment"]["cutout"] = 12
    with pytest.raises(PipelineError) as error:
        load_params(write(tmp_path, params))
    message = str(error.value)
    assert "params.yaml: 2 invalid value(s)" in message
    assert "data.image_size = 8: model.arch fastnet needs an input side of at least 9" in message
    assert "augment.cutout = 12: must be at most data.image_size (8)" in message  # both at once
    params["augment"]["cutout"] = 0
    params["model"]["input_size"] = 8
    params["data"]["image_size"] = 32
    with pytest.raises(PipelineError, match="model.input_size = 8: model.arch fastnet needs"):
        load_params(write(tmp_path, params))
    # the smallest size that works; an input side of the model's own that resizes up; baseline,
    # which resizes to 32 inside
    for changes in (
        {"input_size": 9},
        {"input_size": 16, "image_size": 8},
        {"input_size": None, "image_size": 8, "arch": "baseline"},
    ):
        params["data"]["image_size"] = changes.pop("image_size", 32)
        params["model"].update(changes)
        load_params(write(tmp_path, params))
