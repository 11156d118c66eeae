"""Training speed on this machine, side by side with its matrix-product rate.

Prints, for each model of the presets below: training images per second (median of timed
steps), training FLOPs per image (forward + backward, counted from the layer shapes), the
achieved FLOP rate, and its ratio to numpy's float32 GEMM rate (OpenBLAS, 4096 x 4096) and to
TensorFlow's matmul rate, both measured in the same run.

    python benchmarks/throughput.py            # about 4 minutes on 2 cores
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

GEMM = """
import time, numpy as np
from threadpoolctl import threadpool_info
a = np.random.rand(4096, 4096).astype(np.float32); b = a.copy(); a @ b
times = []
for _ in range(5):
    t = time.perf_counter(); a @ b; times.append(time.perf_counter() - t)
times.sort()
blas = [i.get("internal_api", "?") + "/" + str(i.get("architecture")) for i in threadpool_info()]
print(2 * 4096**3 / times[len(times) // 2] / 1e9, blas)
"""


def numpy_gemm_gflops() -> tuple[float, str]:
    """numpy's float32 GEMM rate, with OPENBLAS_CORETYPE/L2_SIZE unset for this process only:
    they are set on some machines here for old OpenBLAS builds and slow a current one down."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
    }
    out = subprocess.run(
        [sys.executable, "-c", GEMM], env=env, capture_output=True, text=True, check=True
    ).stdout.split(" ", 1)
    return float(out[0]), out[1].strip()


def tf_matmul_gflops() -> float:
    import tensorflow as tf

    a = tf.random.uniform((4096, 4096))
    matmul = tf.function(lambda x: tf.matmul(x, x))
    matmul(a).numpy()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        matmul(a).numpy()
        times.append(time.perf_counter() - start)
    return 2 * 4096**3 / statistics.median(times) / 1e9


def training_flops_per_image(model) -> float:
    """Forward multiply-adds of convolutions and dense layers, x2 for FLOPs, x3 for training
    (the backward pass costs about twice the forward: gradients for inputs and for weights)."""
    import keras

    from imageclf.models import all_layers

    macs = 0
    for layer in all_layers(model):  # the backbone's too: a nested model
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, channels_out = layer.output.shape
            kh, kw = layer.kernel_size
            macs += height * width * kh * kw * layer.input.shape[-1] * channels_out
        elif isinstance(layer, keras.layers.Dense):
            macs += layer.input.shape[-1] * layer.units
    return 3 * 2 * macs


def images_per_second(model_params, train_params, meta, steps: int = 40) -> tuple[float, object]:
    """Training images per second: the batch size over the median time of `steps` training
    steps. Each step is timed on its own: timing whole short `fit` calls mixed in their start
    and end, which here varied by up to 1.7x from one call to the next."""
    import keras
    import numpy as np
    import tensorflow as tf

    from imageclf.models import build_model
    from imageclf.training import compile_model, precision_policy

    keras.mixed_precision.set_global_policy(precision_policy(train_params.precision))
    model = build_model(model_params, meta)
    compile_model(model, train_params, 0.1, total_steps=10_000, warmup_steps=0)
    batch = train_params.batch_size
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    labels = np.eye(10, dtype=np.float32)[np.arange(batch) % 10]
    data = tf.data.Dataset.from_tensors((images, labels)).repeat()
    model.fit(data, steps_per_epoch=3, epochs=1, verbose=0)  # compile and warm up
    ends = []
    step_ends = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: ends.append(time.perf_counter())
    )
    model.fit(data, steps_per_epoch=steps + 1, epochs=1, verbose=0, callbacks=[step_ends])
    step_times = np.diff(ends)
    return batch / float(np.median(step_times)), model


def main() -> None:
    from imageclf.params import load_params

    params = load_params(PROJECT / "params.yaml")
    meta = {
        "image_size": 32,
        "mean": [125.0] * 3,
        "std": [62.0] * 3,
        "class_names": list("0123456789"),
    }
    gemm, blas = numpy_gemm_gflops()
    tf_gemm = tf_matmul_gflops()
    print(f"numpy float32 GEMM 4096^2: {gemm:.0f} GFLOP/s ({blas})")
    print(f"TensorFlow matmul 4096^2:  {tf_gemm:.0f} GFLOP/s")
    presets = {
        "default (params.yaml)": (params.model, params.train),
        # oneDNN's bfloat16 kernels, on CPUs with AVX512_BF16 or AMX
        "default, mixed_bfloat16": (
            params.model,
            params.train.model_copy(update={"precision": "mixed_bfloat16"}),
        ),
        # jit_compile: auto leaves XLA off on a CPU; this row measures the other choice
        "default, XLA on": (params.model, params.train.model_copy(update={"jit_compile": True})),
        "quick preset's fastnet": (
            params.model.model_copy(update={"widths": [64, 128, 256]}),
            params.train,
        ),
        "baseline (TF tutorial CNN)": (
            params.model.model_copy(update={"arch": "baseline"}),
            params.train.model_copy(update={"batch_size": 64}),
        ),
    }
    print(
        f"{'model':28} {'batch':>5} {'precision':>14} {'img/s':>7} {'MFLOP/img':>10} "
        f"{'GFLOP/s':>8} {'/numpy':>7} {'/TF':>6}"
    )
    for name, (model_params, train_params) in presets.items():
        rate, model = images_per_second(model_params, train_params, meta)
        flops = training_flops_per_image(model)
        achieved = rate * flops / 1e9
        print(
            f"{name:28} {train_params.batch_size:5d} {model.dtype_policy.name:>14} {rate:7.0f} "
            f"{flops / 1e6:10.0f} "
            f"{achieved:8.1f} {achieved / gemm:7.0%} {achieved / tf_gemm:6.0%}"
        )


if __name__ == "__main__":
    main()
