"""Models take raw uint8 images of any size, carry their class names, and train under a
tf.distribute strategy."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imageclf.models import build_model, class_names, load_model
from imageclf.params import OWN_ARCHITECTURES, ModelParams

META = {"image_size": 16, "mean": [120.0] * 3, "std": [50.0] * 3, "class_names": ["a", "b", "c"]}
PROJECT = Path(__file__).resolve().parents[1]


def model_params(arch: str = "fastnet", **changes: object) -> ModelParams:
    defaults = {"widths": [4, 8, 8], "weights": "none", "input_size": None}
    return ModelParams(arch=arch, **{**defaults, **changes})


@pytest.mark.parametrize("arch", OWN_ARCHITECTURES)
def test_saved_model_needs_nothing_but_its_file(arch: str, tmp_path: Path) -> None:
    model = build_model(model_params(arch), META)
    model.save(tmp_path / "model.keras")
    loaded = load_model(tmp_path / "model.keras")
    assert class_names(loaded) == ["a", "b", "c"]
    for size in (16, 40):  # other sizes are resized inside the model
        images = np.random.default_rng(0).integers(0, 256, (5, size, size, 3), dtype=np.uint8)
        probabilities = loaded.predict(images, verbose=0)
        assert probabilities.shape == (5, 3)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
        np.testing.assert_allclose(probabilities, model.predict(images, verbose=0), rtol=1e-5)


def test_normalization_uses_the_training_statistics() -> None:
    model = build_model(model_params(widths=[4, 4, 4]), META)
    normalize = model.get_layer("normalize")
    images = np.full((1, 16, 16, 3), 170, dtype=np.float32)
    np.testing.assert_allclose(np.asarray(normalize(images)), 1.0, rtol=1e-5)


MIRRORED = """
import numpy as np, tensorflow as tf
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
from pathlib import Path
from imageclf.datasets import Split
from imageclf.models import build_model
from imageclf.params import ModelParams, load_params
from imageclf.errors import PipelineError
from imageclf.training import compile_model, configure_runtime, fit
params = load_params(PARAMS).train.model_copy(
    # without lookahead, whose averaging would hide replicas drifting apart between its steps
    update=dict(epochs=4, batch_size=16, distribute="mirrored", jit_compile="auto",
                lookahead=False))
strategy = configure_runtime(params, seed=0)
assert strategy.num_replicas_in_sync == 2, strategy

def colour_classes(count, seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 3
    images = rng.integers(0, 60, (count, 16, 16, 3), dtype=np.uint8)
    images[np.arange(count), :, :, labels] += 190
    return Split(images, labels)

train, val = colour_classes(96, 0), colour_classes(30, 1)  # validation: images never trained on
meta = {"image_size": 16, "mean": [100.0] * 3, "std": [80.0] * 3, "class_names": ["a", "b", "c"]}
with strategy.scope():
    model = build_model(
        ModelParams(arch="fastnet", widths=[8, 8, 8], weights="none", input_size=None), meta)
    try:  # XLA cannot compile the distributed step: asked for, it is a clear error
        compile_model(model, params.model_copy(update=dict(jit_compile=True)), 0.05, 24, 0)
        raise AssertionError("jit_compile=True under MirroredStrategy was accepted")
    except PipelineError as error:
        assert "train.jit_compile = true" in str(error)
    compile_model(model, params, 0.05, total_steps=24, warmup_steps=0)
np.save("copy.npy", train.images)
logs, _ = fit(model, [Path("copy.npy")], train, val, params=params, epochs=4, seed=0,
              work_dir=Path("work"), curves_path=Path("curves.tsv"), fingerprint="mirrored")
# every replica holds the same weights: each variable got the same update on both devices
for weight in model.trainable_weights:
    first, *others = [np.asarray(v) for v in strategy.experimental_local_results(weight.value)]
    for other in others:
        np.testing.assert_array_equal(other, first, err_msg=weight.path)
print("val_accuracy", logs["val_accuracy"])
"""


def test_mirrored_strategy_trains_on_two_logical_cpus(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED.replace("PARAMS", repr(str(PROJECT / "params.yaml")))],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(result.stdout.split("val_accuracy")[-1])
    assert accuracy > 0.5  # three colour classes, held-out images: chance is 0.33
    curves = (tmp_path / "curves.tsv").read_text().splitlines()
    assert curves[0].split("\t") == ["step", "loss", "accuracy", "val_loss", "val_accuracy", "lr"]
    assert [line.split("\t")[0] for line in curves[1:]] == ["0", "1", "2", "3"]
    assert not (tmp_path / "work").exists()  # checkpoint removed once training completed


def test_triangular_schedule_rises_to_the_peak_then_falls_to_zero() -> None:
    from imageclf.optimizers import Triangular

    schedule = Triangular(peak=2.0, warmup_steps=10, total_steps=50)
    rates = [float(schedule(step)) for step in (0, 5, 10, 30, 50, 60)]
    assert rates == pytest.approx([0.0, 1.0, 2.0, 1.0, 0.0, 0.0])
    assert float(Triangular(peak=2.0, warmup_steps=0, total_steps=50)(0)) == pytest.approx(2.0)


def test_batchnorm_shifts_take_their_own_learning_rate() -> None:
    import keras

    from imageclf.optimizers import SGD

    def one_step(bias_lr_scale: float) -> dict[str, np.ndarray]:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,))
        x = keras.layers.Dense(3, use_bias=False, name="dense")(inputs)
        x = keras.layers.BatchNormalization(scale=False, name="bn")(x)
        model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
        model.compile(SGD(0.1, bias_lr_scale=bias_lr_scale), loss="mse")
        before = {w.path: np.array(w) for w in model.trainable_weights}
        data = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
        model.train_on_batch(data, np.ones((8, 2), np.float32))
        return {w.path: np.array(w) - before[w.path] for w in model.trainable_weights}

    plain, scaled = one_step(1.0), one_step(64.0)
    for path in plain:
        factor = 64.0 if path.endswith("beta") else 1.0
        np.testing.assert_allclose(scaled[path], factor * plain[path], rtol=1e-4, atol=1e-7)
    assert any(path.endswith("beta") and np.abs(plain[path]).max() > 0 for path in plain)


def airbench_newton_schulz(matrix: np.ndarray) -> np.ndarray:
    """airbench94_muon's orthogonalization in numpy, on a kernel as PyTorch lays it out
    (out channels, fan-in)."""
    x = matrix / (np.linalg.norm(matrix) + 1e-7)
    tall = matrix.shape[0] > matrix.shape[1]
    x = x.T if tall else x
    for _ in range(3):
        gram = x @ x.T
        x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
    return x.T if tall else x


def test_muon_orthogonalizes_the_conv_kernels_steps_and_leaves_the_rest_to_sgd() -> None:
    import keras
    import tensorflow as tf

    from imageclf.params import load_params
    from imageclf.training import compile_model

    def conv_net() -> keras.Model:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6, 6, 3))
        x = keras.layers.Conv2D(4, 3, use_bias=False, name="tall")(inputs)  # (27, 4) matrix
        x = keras.layers.Conv2D(16, 1, use_bias=False, name="wide")(x)  # (4, 16) matrix
        x = keras.layers.BatchNormalization(scale=False, name="bn")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(x))

    train = load_params(PROJECT / "params.yaml").train
    models = {}
    for optimizer in ("sgd", "muon"):
        models[optimizer] = conv_net()
        params = train.model_copy(update=dict(optimizer=optimizer))
        compile_model(models[optimizer], params, 0.1, total_steps=10, warmup_steps=0)
    sgd, muon = models["sgd"], models["muon"]
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 6, 6, 3)).astype(np.float32)
    labels = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 8)]
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=train.label_smoothing)
    kernels = [w for w in muon.trainable_weights if len(w.shape) == 4]
    mu, buffers = train.muon_momentum, [0.0] * len(kernels)
    for step in range(2):  # the second step reads the momentum buffer of the first
        lr = float(muon.optimizer.learning_rate) * train.muon_lr / train.lr
        with tf.GradientTape() as tape:
            gradients = tape.gradient(loss(labels, muon(images, training=True)), kernels)
        before, expected = [np.array(w) for w in kernels], []
        for index, (w, gradient) in enumerate(zip(before, gradients)):
            buffers[index] = mu * buffers[index] + np.array(gradient)
            direction = (np.array(gradient) + mu * buffers[index]).reshape(-1, w.shape[-1])
            update = airbench_newton_schulz(direction.T).T.reshape(w.shape)
            expected.append(np.sqrt(w.shape[-1]) / np.linalg.norm(w) * w - lr * update)
        muon.train_on_batch(images, labels)
        for w, w0, want in zip(kernels, before, expected):
            np.testing.assert_allclose(np.array(w), want, rtol=1e-4, atol=1e-6)
            # near-orthogonal step from a kernel rescaled to norm sqrt(out channels)
            step_taken = np.sqrt(w0.shape[-1]) / np.linalg.norm(w0) * w0 - np.array(w)
            singular = np.linalg.svd(step_taken.reshape(-1, w0.shape[-1]), compute_uv=False)
            assert np.all((0.3 * lr <= singular) & (singular <= 1.7 * lr)), (singular, lr)
        if step == 0:  # the same gradients on both: everything else moved as with SGD
            sgd.train_on_batch(images, labels)
            for a, b in zip(sgd.trainable_weights, muon.trainable_weights):
                if len(a.shape) != 4:
                    np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-5, atol=1e-7)
            assert np.abs(np.array(muon.get_layer("bn").beta)).max() > 0


def test_model_trained_with_muon_loads_with_its_optimizer_state(tmp_path: Path) -> None:
    from imageclf.optimizers import Muon
    from imageclf.params import load_params
    from imageclf.training import compile_model

    # not the defaults of Muon's arguments: a loaded optimizer must have them from its file
    muon = dict(optimizer="muon", muon_lr=0.3, muon_momentum=0.5)
    train = load_params(PROJECT / "params.yaml").train.model_copy(update=muon)
    model = build_model(model_params(), META)
    compile_model(model, train, 0.1, total_steps=12, warmup_steps=2)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    labels = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 40)]
    model.fit(images[:32], labels[:32], batch_size=8, epochs=1, verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = load_model(tmp_path / "model.keras")
    assert isinstance(loaded.optimizer, Muon)
    assert loaded.optimizer.muon_lr_scale == pytest.approx(0.3 / train.lr)
    assert loaded.optimizer.muon_momentum == 0.5
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    for saved, restored in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(np.array(restored), np.array(saved))
    # the next step moves the conv kernels as in the original: Muon's buffers were restored
    for net in (model, loaded):
        net.train_on_batch(images[32:], labels[32:])
    for original, restored in zip(model.trainable_weights, loaded.trainable_weights):
        if len(original.shape) == 4:
            np.testing.assert_allclose(np.array(restored), np.array(original), atol=1e-6)


def test_model_trained_in_bfloat16_is_saved_as_float32_and_trains_on_in_bfloat16() -> None:
    import keras

    from imageclf.models import with_precision

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (48, 16, 16, 3), dtype=np.uint8)
    labels = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 48)]
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        trained = build_model(model_params(), META, images)  # whitening stem: frozen
        trained.get_layer("backbone").get_layer("block3b_conv").trainable = False
        frozen = build_model(model_params(), META)
        frozen.get_layer("backbone").trainable = False  # as a pretrained backbone
        trained.compile(optimizer="sgd", loss="categorical_crossentropy")
        trained.fit(images, labels, batch_size=16, epochs=1, verbose=0)
        saved = with_precision(trained, "float32")
        resumed = with_precision(saved, "mixed_bfloat16")
        frozen_copy = with_precision(frozen, "float32")
    finally:
        keras.config.set_dtype_policy("float32")

    def policies(model: keras.Model) -> dict[str, str]:
        backbone = model.get_layer("backbone")
        return {layer.name: layer.dtype_policy.name for layer in [*model.layers, *backbone.layers]}

    def trainable(model: keras.Model) -> list[str]:
        return [weight.path for weight in model.trainable_weights]

    assert set(policies(trained).values()) == {"mixed_bfloat16", "float32"}  # float32 softmax
    assert set(policies(saved).values()) == {"float32"}
    assert policies(resumed) == policies(trained)
    assert trainable(saved) == trainable(resumed) == trainable(trained)
    assert "backbone/stem/kernel" not in trainable(saved)
    for copy in (saved, resumed):
        for original, copied in zip(trained.weights, copy.weights):
            np.testing.assert_array_equal(np.array(copied), np.array(original))
    expected = trained.predict(images, verbose=0)
    np.testing.assert_array_equal(resumed.predict(images, verbose=0), expected)
    # full precision differs from bfloat16's by bfloat16's rounding, not more
    np.testing.assert_allclose(saved.predict(images, verbose=0), expected, atol=0.02)
    assert with_precision(saved, "float32") is saved
    assert not frozen_copy.get_layer("backbone").trainable
    assert trainable(frozen_copy) == ["logits/kernel", "logits/bias"]


def test_training_step_compiles_with_xla_and_the_saved_model_predicts_any_size(
    tmp_path: Path,
) -> None:
    """XLA is on by default with a GPU (`train.jit_compile: auto`); on a CPU the same
    compilation runs when asked for, so a model op XLA lacks fails here first."""
    from imageclf.params import load_params
    from imageclf.training import compile_model

    train = load_params(PROJECT / "params.yaml").train.model_copy(update={"jit_compile": True})
    model = build_model(model_params(), META)
    compile_model(model, train, 0.1, total_steps=4, warmup_steps=1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    labels = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 16)]
    history = model.fit(images, labels, batch_size=8, epochs=2, verbose=0).history
    assert model.jit_compile is True
    assert np.isfinite(history["loss"]).all()
    # the resize layer, left out of the compiled step, resizes images of other sizes
    model.save(tmp_path / "model.keras")
    loaded = load_model(tmp_path / "model.keras")
    other = rng.integers(0, 256, (2, 24, 20, 3), dtype=np.uint8)
    np.testing.assert_allclose(loaded.predict_on_batch(other).sum(axis=1), 1, rtol=1e-5)
    expected = model.predict(images, verbose=0)  # with XLA: the same up to rounding
    np.testing.assert_allclose(loaded.predict(images, verbose=0), expected, rtol=1e-5)
