"""Transfer learning: Keras application backbones, weights from local files or earlier runs,
what is frozen in the train stage and what the finetune stage unfreezes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from imageclf.errors import PipelineError
from imageclf.models import build_model, class_names, load_model, unfreeze_top
from imageclf.params import BACKBONES, ModelParams
from tests.repos import run, set_params

PROJECT = Path(__file__).resolve().parents[1]
META = {"image_size": 16, "mean": [120.0] * 3, "std": [50.0] * 3, "class_names": ["a", "b", "c"]}


@pytest.fixture
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in `tmp_path`, with a `pretrained/` folder as in the project."""
    (tmp_path / "pretrained").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def model_params(arch: str, **changes: object) -> ModelParams:
    defaults = {"widths": [4, 8, 8], "weights": "none", "input_size": 32}
    return ModelParams(arch=arch, **{**defaults, **changes})


def tiny_data(classes: int = 3, count: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, 16, 16, 3), dtype=np.uint8)
    labels = np.eye(classes, dtype=np.float32)[np.arange(count) % classes]
    return images, labels


def train_briefly(model: keras.Model) -> None:
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
    images, labels = tiny_data(model.output_shape[-1])
    model.fit(images, labels, epochs=1, batch_size=4, verbose=0)


def weights_of(layer: keras.layers.Layer) -> list[np.ndarray]:
    return [np.array(w) for w in layer.weights]


def batchnorm_layers(backbone: keras.Model) -> list[keras.layers.Layer]:
    return [
        layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)
    ]


@pytest.mark.parametrize("arch", BACKBONES)
def test_backbone_trains_from_scratch_and_round_trips(arch: str, tmp_path: Path) -> None:
    model = build_model(model_params(arch), META)
    backbone = model.get_layer("backbone")
    assert backbone.trainable  # random init: everything trains
    before = weights_of(backbone)
    train_briefly(model)
    assert any(not np.array_equal(a, b) for a, b in zip(before, weights_of(backbone)))
    model.save(tmp_path / "model.keras")
    loaded = load_model(tmp_path / "model.keras")
    assert class_names(loaded) == META["class_names"]
    images = tiny_data()[0][:2]
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0))
    assert unfreeze_top(loaded, "all") is None


@pytest.mark.parametrize("arch", BACKBONES)
def test_weights_file_fills_a_frozen_backbone_and_finetune_unfreezes_its_top(
    arch: str, in_tmp_path: Path
) -> None:
    # a "pretrained" no-top backbone saved to a local file, as ImageNet weights would be
    donor = build_model(model_params(arch), META).get_layer("backbone")
    for variable in donor.weights:
        variable.assign(np.random.default_rng(1).normal(0, 0.05, variable.shape))
    donor.save_weights("pretrained/backbone.weights.h5")

    model = build_model(model_params(arch, weights="pretrained/backbone.weights.h5"), META)
    backbone = model.get_layer("backbone")
    for got, expected in zip(weights_of(backbone), weights_of(donor)):
        np.testing.assert_array_equal(got, expected)
    # train stage: the backbone is frozen, only the head trains
    assert not backbone.trainable
    assert {w.path.split("/")[0] for w in model.trainable_weights} == {"logits"}
    frozen = weights_of(backbone)
    train_briefly(model)
    for got, expected in zip(weights_of(backbone), frozen):
        np.testing.assert_array_equal(got, expected)

    # finetune stage: the top quarter of the layers with weights trains, BatchNorm never
    model.save(in_tmp_path / "model.keras")
    model = load_model(in_tmp_path / "model.keras")
    backbone = model.get_layer("backbone")
    candidates = [
        layer
        for layer in backbone.layers
        if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)
    ]
    unfrozen = unfreeze_top(model, "25%")
    assert unfrozen == round(0.25 * len(candidates))
    assert [layer.trainable for layer in candidates] == [False] * (len(candidates) - unfrozen) + [
        True
    ] * unfrozen
    assert not any(layer.trainable for layer in batchnorm_layers(backbone))
    statistics = [weights_of(layer) for layer in batchnorm_layers(backbone)]
    bottom = weights_of(candidates[0])
    top = weights_of(candidates[-1])
    train_briefly(model)
    assert any(not np.array_equal(a, b) for a, b in zip(top, weights_of(candidates[-1])))
    for got, expected in zip(weights_of(candidates[0]), bottom):
        np.testing.assert_array_equal(got, expected)
    for layer, expected in zip(batchnorm_layers(backbone), statistics):
        for got, want in zip(weights_of(layer), expected):
            np.testing.assert_array_equal(got, want)


def test_pretrained_kernels_keep_their_scale_with_the_default_optimizer(in_tmp_path: Path) -> None:
    # Muon (train.optimizer's default) would set every kernel it trains to norm sqrt(out
    # channels); a pretrained kernel ahead of a frozen BatchNorm must keep its own scale
    from imageclf.params import load_params
    from imageclf.training import compile_model

    donor = build_model(model_params("mobilenet_v2"), META).get_layer("backbone")
    for variable in donor.weights:
        if len(variable.shape) == 4:  # kernels; BatchNorm's variances stay positive
            variable.assign(np.random.default_rng(1).normal(0, 0.05, variable.shape))
    donor.save_weights("pretrained/backbone.weights.h5")
    model = build_model(
        model_params("mobilenet_v2", weights="pretrained/backbone.weights.h5"), META
    )
    unfreeze_top(model, "all")
    kernels = [w for w in model.trainable_weights if len(w.shape) == 4 and w.shape[-1] > 1]
    before = [float(np.linalg.norm(w)) for w in kernels]
    train = load_params(PROJECT / "params.yaml").train
    assert train.optimizer == "muon"
    compile_model(model, train, 1e-6, total_steps=3, warmup_steps=0, pretrained=True)
    images, labels = tiny_data()
    model.fit(images, labels, epochs=1, batch_size=4, verbose=0)
    after = [float(np.linalg.norm(w)) for w in kernels]
    np.testing.assert_allclose(after, before, rtol=1e-3)
    assert any(abs(b - np.sqrt(w.shape[-1])) > 0.1 * b for b, w in zip(before, kernels))


def test_unfreeze_takes_a_count_of_layers(in_tmp_path: Path) -> None:
    donor = build_model(model_params("fastnet", input_size=None), META)
    donor.save("pretrained/donor.keras")
    model = build_model(
        model_params("fastnet", input_size=None, weights="pretrained/donor.keras"), META
    )
    assert unfreeze_top(model, 2) == 2
    trainable = [layer.name for layer in model.get_layer("backbone").layers if layer.trainable]
    assert trainable == ["block3a_conv", "block3b_conv"]


def test_earlier_run_transfers_its_backbone_and_the_head_only_when_classes_match(
    in_tmp_path: Path,
) -> None:
    earlier = build_model(model_params("fastnet", input_size=None), META, tiny_data()[0])
    train_briefly(earlier)
    weights = "pretrained/earlier.keras"
    earlier.save(weights)

    other_classes = {**META, "class_names": ["x", "y"]}
    model = build_model(model_params("fastnet", input_size=None, weights=weights), other_classes)
    for got, expected in zip(
        weights_of(model.get_layer("backbone")), weights_of(earlier.get_layer("backbone"))
    ):
        np.testing.assert_array_equal(got, expected)
    assert model.output_shape == (None, 2) and class_names(model) == ["x", "y"]

    same_count = build_model(model_params("fastnet", input_size=None, weights=weights), META)
    for got, expected in zip(
        weights_of(same_count.get_layer("logits")), weights_of(earlier.get_layer("logits"))
    ):
        np.testing.assert_array_equal(got, expected)


def test_weights_that_do_not_fit_are_clear_errors(in_tmp_path: Path) -> None:
    earlier = build_model(model_params("fastnet", input_size=None), META)
    earlier.save("pretrained/earlier.keras")
    with pytest.raises(PipelineError, match="does not match"):
        build_model(
            model_params("fastnet", widths=[8, 8, 8], weights="pretrained/earlier.keras"), META
        )
    missing = "pretrained/nowhere.weights.h5"
    with pytest.raises(PipelineError, match=f"model.weights: {missing} does not exist"):
        build_model(model_params("mobilenet_v2", weights=missing), META)


OFFLINE_IMAGENET = """
from imageclf.errors import PipelineError
from imageclf.models import build_model
from imageclf.params import ModelParams
meta = {"image_size": 32, "mean": [0.0] * 3, "std": [1.0] * 3, "class_names": ["a", "b"]}
try:
    build_model(ModelParams(arch="mobilenet_v2", widths=[4, 4, 4], weights="imagenet",
                            input_size=96), meta)
except PipelineError as exc:
    print(exc)
"""


def test_imagenet_weights_offline_say_where_keras_caches_them(tmp_path: Path) -> None:
    # no internet: every HTTPS request goes to a closed local port
    env = {
        **os.environ,
        "PYTHONPATH": str(PROJECT),
        "KERAS_HOME": str(tmp_path / "keras"),
        "https_proxy": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_IMAGENET], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "could not download the ImageNet weights of mobilenet_v2" in result.stdout
    assert str(tmp_path / "keras" / "models") in result.stdout
    assert "set model.weights to its path" in result.stdout


def test_pipeline_trains_the_head_then_finetunes_a_model_from_an_earlier_run(
    repo: Path,
) -> None:
    earlier = repo / "pretrained" / "earlier.keras"
    earlier.write_bytes((repo / "models" / "finetuned.keras").read_bytes())
    set_params(repo, **{"model.weights": "pretrained/earlier.keras", "finetune.unfreeze": 2})
    result = run(repo, "dvc", "repro")
    assert "Backbone from pretrained/earlier.keras, frozen: training the head only" in result.stdout
    assert "fine-tuning its top 2 layers with weights" in result.stdout

    source = load_model(earlier).get_layer("backbone")
    trained = load_model(repo / "models" / "model.keras").get_layer("backbone")
    finetuned = load_model(repo / "models" / "finetuned.keras").get_layer("backbone")
    for layer in source.layers:
        kept = weights_of(layer)
        for got, expected in zip(weights_of(trained.get_layer(layer.name)), kept):
            np.testing.assert_array_equal(got, expected)  # train: backbone frozen
        changed = any(
            not np.array_equal(a, b)
            for a, b in zip(weights_of(finetuned.get_layer(layer.name)), kept)
        )
        assert changed == (layer.name in ("block3a_conv", "block3b_conv")), layer.name

    # the weights file is a dependency: replaced, DVC sees it and retrains on `dvc repro`
    earlier.write_bytes((repo / "models" / "model.keras").read_bytes())
    status = yaml.safe_load(run(repo, "dvc", "status", "--json").stdout)
    assert list(status) == ["train"]
    assert {"changed deps": {"pretrained": "modified"}} in status["train"]


def test_weights_outside_pretrained_are_refused_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must be inside pretrained/.*write pretrained/x.keras"):
        model_params("fastnet", weights=str(tmp_path / "x.keras"))
