"""What Keras' optimizers and schedules lack for airbench's recipe: a learning rate of its own
for BatchNorm shifts, and the triangular schedule. Registered for Keras' serialization, so that
a saved model (which stores its optimizer) loads wherever `imageclf.models` is imported."""

from __future__ import annotations

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
        # the TensorFlow backend passes its own variable, named like "bn/beta:0"
        if self.bias_lr_scale != 1.0 and variable.name.split(":")[0].endswith("beta"):
            learning_rate = learning_rate * self.bias_lr_scale
        return super().update_step(gradient, variable, learning_rate)

    def get_config(self) -> dict:
        return {**super().get_config(), "bias_lr_scale": self.bias_lr_scale}


@keras.saving.register_keras_serializable(package="imageclf")
class SGD(_BiasLearningRate, keras.optimizers.SGD):
    """Keras' SGD, with the BatchNorm shifts' own learning rate."""


@keras.saving.register_keras_serializable(package="imageclf")
class AdamW(_BiasLearningRate, keras.optimizers.AdamW):
    """Keras' AdamW, with the BatchNorm shifts' own learning rate."""
