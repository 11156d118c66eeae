"""What Keras' optimizers and schedules lack for airbench's recipe: a learning rate of its own
for BatchNorm shifts, the triangular schedule, and airbench94_muon's Muon for conv kernels.
Registered for Keras' serialization, so that a saved model (which stores its optimizer) loads
wherever `imageclf.models` is imported."""

from __future__ import annotations

import math

import keras


@keras.saving.register_keras_serializable(package="imageclf")
class Triangular(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to `peak` over `warmup_steps`, then linear decay to 0 at
    `total_steps` (airbench's schedule shape): more steps near the peak than a cosine."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int) -> None:
        self.peak = peak
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        decay = (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps)
        rise = step / self.warmup_steps if self.warmup_steps else decay
        return self.peak * keras.ops.clip(keras.ops.minimum(rise, decay), 0.0, 1.0)

    def get_config(self) -> dict:
        return {
            "peak": self.peak,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
        }


class _BiasLearningRate:
    """Optimizer mixin: BatchNorm shifts (beta) learn `bias_lr_scale` times faster than the
    kernels (airbench: 64x). A shift acts on a whole channel, and its gradient is small next
    to a kernel's; at the kernels' rate it barely moves in a short run."""

    def __init__(self, *args, bias_lr_scale: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bias_lr_scale = bias_lr_scale

    def update_step(self, gradient, variable, learning_rate):
        if self.bias_lr_scale != 1.0 and self._is_batchnorm_shift(variable):
            learning_rate = learning_rate * self.bias_lr_scale
        return super().update_step(gradient, variable, learning_rate)

    def _is_batchnorm_shift(self, variable) -> bool:
        # The backend passes its own variable (TensorFlow: "bn/beta:0", under tf.distribute
        # "bn/beta/replica_1:0" on the second device); the optimizer's index, which maps every
        # device's copy to one slot, gives back the Keras variable and its path ("bn/beta")
        return self._trainable_variables[self._get_variable_index(variable)].path.endswith("beta")

    def get_config(self) -> dict:
        return {**super().get_config(), "bias_lr_scale": self.bias_lr_scale}


@keras.saving.register_keras_serializable(package="imageclf")
class SGD(_BiasLearningRate, keras.optimizers.SGD):
    """Keras' SGD, with the BatchNorm shifts' own learning rate."""


@keras.saving.register_keras_serializable(package="imageclf")
class AdamW(_BiasLearningRate, keras.optimizers.AdamW):
    """Keras' AdamW, with the BatchNorm shifts' own learning rate."""


def _orthogonalize(matrix):
    """airbench94_muon's quintic Newton-Schulz iteration: about U V^T of matrix = U S V^T, with
    every singular value moved near 1 (into roughly [0.5, 1.5]; the coefficients maximize the
    slope at 0, so that 3 iterations are enough)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    wide = matrix.shape[0] <= matrix.shape[1]
    # on the wide orientation the Gram matrix x x^T is the smaller of the two
    x = matrix if wide else keras.ops.transpose(matrix)
    # the Frobenius norm bounds the spectral norm: every singular value starts at most 1
    x = x / (keras.ops.norm(x) + 1e-7)
    for _ in range(3):
        gram = keras.ops.matmul(x, keras.ops.transpose(x))
        x = a * x + keras.ops.matmul(b * gram + c * keras.ops.matmul(gram, gram), x)
    return x if wide else keras.ops.transpose(x)


def _takes_muon(variable) -> bool:
    # a conv kernel (kh, kw, in, out); not a depthwise one (kh, kw, in, 1) of the Keras
    # backbones, which as a (kh*kw*in, 1) matrix would orthogonalize to a unit vector
    return len(variable.shape) == 4 and variable.shape[-1] > 1


@keras.saving.register_keras_serializable(package="imageclf")
class Muon(SGD):
    """airbench94_muon's optimizers in one: every trainable conv kernel takes
    Muon steps, all others our SGD's (Nesterov momentum, BatchNorm shifts' own rate, weight
    decay). Muon orthogonalizes the kernel's momentum, as a (kh*kw*in, out) matrix: each step
    moves every direction of the filter space alike, not mostly the few with large gradients.

    `muon_lr_scale` times the scheduled learning rate is the kernels' (same schedule, its own
    peak); `muon_momentum` is their momentum, Nesterov when `nesterov` is."""

    def __init__(
        self, *args, muon_lr_scale: float = 1.0, muon_momentum: float = 0.6, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self.muon_lr_scale = muon_lr_scale
        self.muon_momentum = muon_momentum

    def build(self, variables) -> None:
        if self.built:
            return
        super().build(variables)
        # a kernel reuses SGD's momentum slot for its own buffer; without momentum SGD has none
        if not self.momentums:
            self.momentums = [
                self.add_variable_from_reference(v, "momentum") if _takes_muon(v) else None
                for v in variables
            ]

    def _use_weight_decay(self, variable) -> bool:
        # a kernel is rescaled to norm sqrt(out) at every step, which undoes decay exactly
        return not _takes_muon(variable) and super()._use_weight_decay(variable)

    def update_step(self, gradient, variable, learning_rate):
        if not _takes_muon(variable):
            return super().update_step(gradient, variable, learning_rate)
        ops = keras.ops
        gradient = ops.cast(gradient, "float32")
        slot = self.momentums[self._get_variable_index(variable)]
        # Muon's buffer convention, buf = mu * buf + g (SGD's slots hold -lr * velocity)
        buffer = self.muon_momentum * slot + gradient
        self.assign(slot, buffer)
        direction = gradient + self.muon_momentum * buffer if self.nesterov else buffer
        outputs = variable.shape[-1]
        update = _orthogonalize(ops.reshape(direction, (-1, outputs)))
        learning_rate = ops.cast(learning_rate, "float32") * self.muon_lr_scale
        # airbench: "normalize the weight" to norm sqrt(out). BatchNorm follows every conv, so
        # the kernel's scale is free; fixed, it keeps the step's relative size to the schedule
        scale = math.sqrt(outputs) / ops.norm(ops.reshape(variable, (-1,)))
        self.assign(
            variable, variable * scale - learning_rate * ops.reshape(update, variable.shape)
        )

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "muon_lr_scale": self.muon_lr_scale,
            "muon_momentum": self.muon_momentum,
        }
