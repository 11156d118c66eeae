"""Model registry: every model takes raw uint8 images of any size and does its own resizing and
normalization, so a saved `.keras` file is all that evaluation or prediction needs."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import keras
import numpy as np
from keras import layers

from imageclf.errors import PipelineError
from imageclf.images import resize_layer
from imageclf.optimizers import SGD, AdamW, Muon, Triangular  # noqa: F401 (registers them for loading)
from imageclf.params import ARCHITECTURES, BACKBONES, OWN_ARCHITECTURES, ModelParams

WHITENING_SAMPLE = 5000  # training images whose 2x2 patches set fastnet's whitening stem


def build_model(
    params: ModelParams, meta: dict, train_images: np.ndarray | None = None
) -> keras.Model:
    """Build `params.arch` for the classes, image size and channel statistics in `meta`.

    The model is image -> resize -> preprocessing -> "backbone" (a nested model) -> "logits" ->
    "probabilities". Pretrained weights (`params.weights`) fill the backbone, which is then
    frozen: the train stage trains the head only, the finetune stage unfreezes the backbone's
    top (`unfreeze_top`). Without them, fastnet's whitening stem is set from `train_images`.
    """
    size = params.input_size or meta["image_size"]
    pretrained = params.weights != "none"
    inputs = keras.Input(shape=(None, None, 3), dtype="uint8", name="image")
    x = ResizeImages.from_config(resize_layer(size).get_config())(inputs)
    if params.arch in BACKBONES:
        mode = APPLICATIONS[params.arch][1]
        if mode is not None:  # EfficientNet rescales and normalizes inside the backbone
            x = ImagenetPreprocess(mode, name="imagenet_preprocess")(x)
        backbone = _application(params, size)
    else:
        x = layers.Normalization(
            mean=meta["mean"], variance=[s * s for s in meta["std"]], name="normalize"
        )(x)
        body_input = keras.Input(shape=(size, size, 3), name="backbone_input")
        features = BUILDERS[params.arch](body_input, params)
        backbone = keras.Model(body_input, features, name="backbone")
    # a pretrained backbone runs in inference mode, BatchNorm statistics and dropout included,
    # also once its top is unfrozen (keras.io transfer-learning guide)
    features = backbone(x, training=False) if pretrained else backbone(x)
    # float32 softmax even under mixed precision, for numerically sound probabilities
    logits = layers.Dense(len(meta["class_names"]), name="logits")(features)
    outputs = NamedSoftmax(meta["class_names"], dtype="float32", name="probabilities")(logits)
    model = keras.Model(inputs, outputs, name=params.arch)

    if params.weights.endswith(".keras"):
        transfer_weights(Path(params.weights), model)
    elif pretrained and params.arch in OWN_ARCHITECTURES:
        _load_weights_file(backbone, Path(params.weights))
    elif params.arch == "fastnet":
        identity_init(backbone)
        if train_images is not None:
            stride = max(1, len(train_images) // WHITENING_SAMPLE)  # spread over all classes
            whiten_stem(model, train_images[::stride][:WHITENING_SAMPLE])
    if pretrained:
        backbone.trainable = False
    return model


def _application(params: ModelParams, size: int) -> keras.Model:
    """A Keras application without its ImageNet classifier, global-average-pooled."""
    constructor = APPLICATIONS[params.arch][0]
    weights = None  # random, or filled from a .keras model afterwards by transfer_weights
    if params.weights == "imagenet":
        weights = "imagenet"
    elif params.weights != "none" and not params.weights.endswith(".keras"):
        weights = _existing_file(Path(params.weights))
    try:
        backbone = constructor(
            include_top=False, weights=weights, input_shape=(size, size, 3), pooling="avg"
        )
    except ValueError as exc:
        raise PipelineError(f"model: {params.arch} cannot be built as asked: {exc}") from None
    except Exception as exc:  # keras.utils.get_file raises a bare Exception when offline
        if weights != "imagenet":
            raise
        raise PipelineError(
            f"model.weights = 'imagenet': could not download the ImageNet weights of "
            f"{params.arch} ({exc}). Keras caches them in "
            f"{keras_cache() / 'models'}; on a machine without internet, "
            "copy the no-top weights file there, or set model.weights to its path."
        ) from None
    backbone.name = "backbone"
    return backbone


def keras_cache() -> Path:
    """Where Keras keeps downloaded files (as `keras.utils.get_file`: $KERAS_HOME or ~/.keras)."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))


def _existing_file(path: Path) -> str:
    if not path.is_file():
        raise PipelineError(
            f"model.weights: {path} does not exist; give none, imagenet, or the path of a "
            ".keras model or a weights file"
        )
    return str(path)


def _load_weights_file(backbone: keras.Model, path: Path) -> None:
    try:
        backbone.load_weights(_existing_file(path))
    except (ValueError, OSError) as exc:
        raise PipelineError(
            f"model.weights: {path} does not fit the {backbone.name} of this model.arch ({exc}); "
            "use weights saved from the same architecture and widths"
        ) from None


def transfer_weights(path: Path, model: keras.Model) -> None:
    """Start `model` from the `.keras` model at `path` (an earlier run): its backbone, and its
    classifier head too when the class count is the same."""
    source = load_model(_existing_file(path))
    try:
        source_backbone = source.get_layer("backbone")
    except ValueError:
        raise PipelineError(
            f"model.weights: {path} was not made by this project's train or finetune stage "
            "(it has no 'backbone' layer)"
        ) from None
    backbone = model.get_layer("backbone")
    source_shapes = [tuple(w.shape) for w in source_backbone.weights]
    if source_shapes != [tuple(w.shape) for w in backbone.weights]:
        raise PipelineError(
            f"model.weights: the backbone in {path} ({source.name}) does not match "
            f"model.arch = {model.name!r} with these model.widths; set them as in the run that "
            "made it"
        )
    backbone.set_weights(source_backbone.get_weights())
    head, source_head = model.get_layer("logits"), source.get_layer("logits")
    if [w.shape for w in head.weights] == [w.shape for w in source_head.weights]:
        head.set_weights(source_head.get_weights())


def unfreeze_top(model: keras.Model, unfreeze: int | str) -> int | None:
    """Make the top of a frozen (pretrained) backbone trainable for fine-tuning: "all" layers
    with weights, a number of them, or a percentage ("30%"); BatchNorm layers stay frozen.
    Returns the number unfrozen, or None when the backbone was trained from scratch (all of it
    trains)."""
    backbone = model.get_layer("backbone")
    if backbone.trainable:
        return None
    candidates = [
        layer
        for layer in backbone.layers
        if layer.weights and not isinstance(layer, layers.BatchNormalization)
    ]
    if unfreeze == "all":
        count = len(candidates)
    elif isinstance(unfreeze, str):
        count = round(float(unfreeze.removesuffix("%")) / 100 * len(candidates))
    else:
        count = min(unfreeze, len(candidates))
    top = set(map(id, candidates[len(candidates) - count :]))
    backbone.trainable = True
    for layer in backbone.layers:
        layer.trainable = id(layer) in top
    return count


@keras.saving.register_keras_serializable(package="imageclf")
class ImagenetPreprocess(layers.Layer):
    """The input scaling a Keras application's ImageNet weights expect ("tf": to [-1, 1];
    "caffe": BGR, minus the ImageNet mean), as a layer so that it is saved with the model."""

    def __init__(self, mode: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, images):
        return keras.applications.imagenet_utils.preprocess_input(images, mode=self.mode)

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="imageclf")
class ResizeImages(layers.Resizing):
    """Keras' Resizing, left out of the graph where the images already have its size: the
    antialiased resize (TensorFlow's ScaleAndTranslate op) has no XLA kernel, and training
    feeds images of the model's size, so that its step compiles with XLA
    (`train.jit_compile`, on by default with a GPU). On such images it is the identity anyway."""

    def transform_images(self, images, transformation=None, training=True):
        if tuple(images.shape[1:3]) == (self.height, self.width):
            return self.backend.cast(images, self.compute_dtype)
        return super().transform_images(images, transformation, training)


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


def input_size(model: keras.Model) -> int:
    """The side a model built by `build_model` resizes every input image to."""
    return model.get_layer("resize").height


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
    stem = model.get_layer("backbone").get_layer("stem")
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
# Keras applications and the input scaling their ImageNet weights expect
APPLICATIONS: dict[str, tuple[Callable, str | None]] = {
    "mobilenet_v2": (keras.applications.MobileNetV2, "tf"),
    "efficientnet_b0": (keras.applications.EfficientNetB0, None),
    "resnet50": (keras.applications.ResNet50, "caffe"),
}
assert (*BUILDERS, *APPLICATIONS) == ARCHITECTURES, "keep imageclf.params.ARCHITECTURES in step"


def with_precision(model: keras.Model, policy: str) -> keras.Model:
    """`model` with its layers computing in `policy` ("float32", "mixed_bfloat16", ...) and the
    same weights; the softmax stays float32. Training stages save float32 models whatever
    policy trained them, so evaluation, export and prediction run them in full precision on any
    machine; finetune converts the model back to the policy it trains in."""
    if all(
        layer.dtype_policy.name == policy
        for layer in all_layers(model)
        if not isinstance(layer, (keras.Model, keras.layers.InputLayer, NamedSoftmax))
    ):
        return model

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if not isinstance(layer, NamedSoftmax):
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    outer_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)  # for the input layers and the nested model
    try:
        copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    finally:
        keras.config.set_dtype_policy(outer_policy)
    # the clone leaves a nested model trainable; a pretrained backbone's own flag says that it
    # is frozen, and unfreeze_top reads it
    for original, copied in zip(all_layers(model), all_layers(copy)):
        if isinstance(original, keras.Model):
            copied.trainable = original.trainable
    copy.set_weights(model.get_weights())
    return copy


def all_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    """The layers of `model` and of the models nested in it, depth first."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)


def load_model(path: str | Path) -> keras.Model:
    """Load a `.keras` file written by a train or finetune stage (custom layers registered)."""
    if not Path(path).is_file():
        raise PipelineError(f"{path}: no model file here; run `dvc repro` to train one")
    model = keras.models.load_model(path)
    # trained with XLA (on by default with a GPU), its predict would be compiled too, and XLA
    # lacks the antialiased resize that images of other sizes need
    model.jit_compile = False
    return model
