"""Model registry: every model takes raw uint8 images of any size and does its own resizing and
normalization, so a saved `.keras` file is all that evaluation or prediction needs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
from keras import layers

from imageclf.errors import PipelineError
from imageclf.params import ARCHITECTURES, ModelParams

WHITENING_SAMPLE = 5000  # training images whose 2x2 patches set fastnet's whitening stem


def build_model(
    params: ModelParams, meta: dict, train_images: np.ndarray | None = None
) -> keras.Model:
    """Build `params.arch` for the classes, image size and channel statistics in `meta`;
    data-dependent initialization (fastnet's whitening stem) uses `train_images` when given."""
    inputs = keras.Input(shape=(None, None, 3), dtype="uint8", name="image")
    size = meta["image_size"]
    x = layers.Resizing(size, size, name="resize")(inputs)
    x = layers.Normalization(
        mean=meta["mean"], variance=[s * s for s in meta["std"]], name="normalize"
    )(x)
    x = BUILDERS[params.arch](x, params)
    # float32 softmax even under mixed precision, for numerically sound probabilities
    x = layers.Dense(len(meta["class_names"]), name="logits")(x)
    outputs = NamedSoftmax(meta["class_names"], dtype="float32", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name=params.arch)
    if params.arch == "fastnet":
        identity_init(model)
        if train_images is not None:
            stride = max(1, len(train_images) // WHITENING_SAMPLE)  # spread over all classes
            whiten_stem(model, train_images[::stride][:WHITENING_SAMPLE])
    return model


@keras.saving.register_keras_serializable(package="imageclf")
class NamedSoftmax(layers.Layer):
    """Softmax that carries the class names, so they travel inside the `.keras` file."""

    def __init__(self, class_names: list[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.class_names = list(class_names)

    def call(self, logits):
        return keras.ops.softmax(logits)

    def get_config(self) -> dict:
        return {**super().get_config(), "class_names": self.class_names}


def class_names(model: keras.Model) -> list[str]:
    """The class names a model built by `build_model` predicts, in output order."""
    return model.get_layer("probabilities").class_names


def _conv_bn(x, filters: int, name: str, pool: bool = False):
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    if pool:
        # pooling before BatchNorm normalizes a 4x smaller tensor: same net, less work (airbench)
        x = layers.MaxPooling2D(2, name=f"{name}_pool")(x)
    # momentum 0.6 (PyTorch's 0.4): BN statistics must keep up with a short, fast schedule;
    # no learned scale, as in airbench: the next layer's weights can absorb it
    x = layers.BatchNormalization(momentum=0.6, epsilon=1e-5, scale=False, name=f"{name}_bn")(x)
    return layers.Activation("gelu", name=f"{name}_gelu")(x)


def fastnet(x, params: ModelParams):
    """A small wide net shaped like airbench94: a 2x2 stem, three blocks of two 3x3 convolutions
    with max-pooling, BatchNorm and GELU, global max-pooling."""
    # 24 = 2 x 2*2*3: a +/- pair of filters per dimension of a 2x2 RGB patch (whiten_stem)
    x = layers.Conv2D(24, 2, padding="valid", name="stem")(x)
    x = layers.Activation("gelu", name="stem_gelu")(x)
    for block, width in enumerate(params.widths, start=1):
        x = _conv_bn(x, width, f"block{block}a", pool=True)
        x = _conv_bn(x, width, f"block{block}b")
    x = layers.GlobalMaxPooling2D(name="pool")(x)
    # max-pooled features are large: scaled down, the first logits are not overconfident
    return layers.Rescaling(1 / 9, name="pool_scale")(x)


def whiten_stem(model: keras.Model, images: np.ndarray, eps: float = 5e-4) -> None:
    """Set fastnet's 2x2 stem to whiten the patches of `images` and freeze it (airbench):
    its filters are the eigenvectors of the patch covariance, scaled to unit variance, in
    +/- pairs so that the GELU after it loses nothing. Training starts on decorrelated inputs.
    """
    stem = model.get_layer("stem")
    height, width, channels, filters = stem.kernel.shape
    x = np.asarray(model.get_layer("normalize")(images.astype(np.float32)))
    patches = np.lib.stride_tricks.sliding_window_view(x, (height, width), axis=(1, 2))
    # (N, H', W', C, h, w) -> rows of (h, w, C), the layout of a Keras conv kernel
    patches = patches.transpose(0, 1, 2, 4, 5, 3).reshape(-1, height * width * channels)
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    scaled = eigenvectors / np.sqrt(eigenvalues + eps)  # columns: one filter each
    kernel = np.concatenate([scaled, -scaled], axis=1)[:, :filters]
    stem.kernel.assign(kernel.reshape(height, width, channels, -1))
    stem.bias.assign(np.zeros(filters))
    stem.trainable = False


def identity_init(model: keras.Model) -> None:
    """Start each 3x3 convolution as (part) identity, an implicit residual connection (airbench):
    deep plain nets then train as fast as residual ones in the first epochs."""
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D) and layer.kernel_size == (3, 3):
            kernel = np.array(layer.kernel)
            channels = min(kernel.shape[2], kernel.shape[3])
            kernel[:, :, :, :channels] = 0
            kernel[1, 1, np.arange(channels), np.arange(channels)] = 1
            layer.kernel.assign(kernel)


def baseline(x, params: ModelParams):
    """The small CNN of the TensorFlow CNN tutorial, for comparison with the original project."""
    # designed for 32x32: its unpadded convolutions leave nothing of much smaller images
    x = layers.Resizing(32, 32, name="baseline_resize")(x)
    x = layers.Conv2D(32, 3, activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(64, 3, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Conv2D(64, 3, activation="relu", name="conv3")(x)
    x = layers.Flatten(name="flatten")(x)
    return layers.Dense(64, activation="relu", name="dense")(x)


BUILDERS: dict[str, Callable] = {"fastnet": fastnet, "baseline": baseline}
assert tuple(BUILDERS) == ARCHITECTURES, "keep imageclf.params.ARCHITECTURES in step"


def load_model(path: str | Path) -> keras.Model:
    """Load a `.keras` file written by a train or finetune stage (custom layers registered)."""
    if not Path(path).is_file():
        raise PipelineError(f"{path}: no model file here; run `dvc repro` to train one")
    return keras.models.load_model(path)
