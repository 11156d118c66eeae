"""Training shared by the train and finetune stages: hardware setup, the augmented data
stream, optimizer and schedule, resumable `fit` with DVCLive curves."""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from dvclive import Live
from dvclive.keras import DVCLiveCallback

from imageclf.datasets import Split
from imageclf.fileio import write_text
from imageclf.params import TrainParams


def configure_runtime(params: TrainParams, seed: int) -> tf.distribute.Strategy:
    """Seed everything, pick the float policy and the distribution strategy, in one place."""
    # No tf.config.experimental.enable_op_determinism(): Keras turns XLA off under it, and the
    # CPU kernels we use give the same numbers run to run without it (tests/ check this).
    keras.utils.set_random_seed(seed)
    gpus = tf.config.list_physical_devices("GPU")
    precision = params.precision
    if precision == "auto":
        # float16 tensor cores pay on NVIDIA GPUs; on a CPU float32 is the fast path
        precision = "mixed_float16" if gpus else "float32"
    keras.mixed_precision.set_global_policy(precision)
    if params.distribute == "mirrored" or (params.distribute == "auto" and len(gpus) > 1):
        devices = [d.name for d in tf.config.list_logical_devices("GPU" if gpus else "CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    return tf.distribute.get_strategy()


def compile_model(
    model: keras.Model,
    params: TrainParams,
    peak_lr: float,
    total_steps: int,
    warmup_steps: int,
) -> None:
    """Compile with the optimizer of `params` and a warmup + cosine-decay-to-zero schedule."""
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else peak_lr,
        decay_steps=max(1, total_steps - warmup_steps),
        warmup_target=peak_lr if warmup_steps else None,
        warmup_steps=warmup_steps,
    )
    if params.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(
            schedule, momentum=params.momentum, nesterov=True, weight_decay=params.weight_decay
        )
    else:
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=params.weight_decay)
    # decaying BatchNorm shifts/scales and biases only hurts; decay the kernels
    optimizer.exclude_from_weight_decay(var_names=["_bn", "bias", "beta", "gamma"])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=params.label_smoothing),
        metrics=["accuracy"],
        jit_compile=params.jit_compile,
    )


def steps_per_epoch(count: int, batch_size: int) -> int:
    # the last, partial batch is dropped: one batch shape, one XLA compilation
    return max(1, count // batch_size)


def epoch_stream(
    copies: Sequence[Path],
    labels: np.ndarray,
    num_classes: int,
    batch_size: int,
    seed: int,
    epochs: range,
    copy_offset: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches for `epochs`: epoch e reads augmented copy (offset + e) % len(copies), in an
    order drawn from (seed, offset + e) alone, so a resumed run sees the same batches."""
    count = len(labels)
    steps = steps_per_epoch(count, batch_size)
    one_hot = np.eye(num_classes, dtype=np.float32)
    for epoch in epochs:
        # one copy in memory at a time
        images = np.load(copies[(copy_offset + epoch) % len(copies)])
        order = np.random.default_rng([seed, copy_offset + epoch]).permutation(count)
        for step in range(steps):
            batch = order[step * batch_size : (step + 1) * batch_size]
            yield images[batch], one_hot[labels[batch]]


def backup_epoch(backup_dir: Path, model: keras.Model) -> int:
    """The epoch a killed run reached, or 0; a corrupt backup is dropped with a warning."""
    metadata = backup_dir / "training_metadata.json"
    if not metadata.exists():
        return 0
    try:
        epoch = int(json.loads(metadata.read_text())["epoch"])
        model.optimizer.build(model.trainable_variables)
        model.load_weights(backup_dir / "latest.weights.h5")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(
            f"{backup_dir}: checkpoint unreadable ({exc.__class__.__name__}: {exc}); "
            "starting over from epoch 0",
            stacklevel=2,
        )
        shutil.rmtree(backup_dir)
        return 0
    return epoch


def fit(
    model: keras.Model,
    copies: Sequence[Path],
    train: Split,
    val: Split,
    *,
    params: TrainParams,
    epochs: int,
    seed: int,
    work_dir: Path,
    curves_path: Path,
    first_step: int = 0,
) -> tuple[dict[str, float], float]:
    """Train `epochs` epochs, resuming from the checkpoint in `work_dir` if a run was killed.

    DVCLive logs the curves in `work_dir` next to the checkpoint, so that a resumed run
    continues them; once training is done they are merged into one table at `curves_path`
    (`curves_table`) and `work_dir` is removed. `first_step` numbers the epochs (the finetune
    stage continues the train stage's curves). Returns the last epoch's logs and the wall time
    in seconds.
    """
    start = time.perf_counter()
    backup_dir, live_work_dir = work_dir / "backup", work_dir / "live"
    num_classes = model.output_shape[-1]
    initial_epoch = backup_epoch(backup_dir, model)
    if initial_epoch:
        print(f"Resuming from epoch {initial_epoch} of {epochs} (checkpoint in {backup_dir})")
    batch_shape = (None, *train.images.shape[1:])
    dataset = tf.data.Dataset.from_generator(
        lambda: epoch_stream(
            copies,
            train.labels,
            num_classes,
            params.batch_size,
            seed,
            range(initial_epoch, epochs),
            copy_offset=first_step,
        ),
        output_signature=(
            tf.TensorSpec(batch_shape, tf.uint8),
            tf.TensorSpec((None, num_classes), tf.float32),
        ),
    ).prefetch(2)
    live = Live(
        dir=str(live_work_dir),
        dvcyaml=None,
        save_dvc_exp=False,
        report=None,
        resume=initial_epoch > 0,
    )
    live.step = first_step + initial_epoch
    history = model.fit(
        dataset,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch(len(train.labels), params.batch_size),
        validation_data=(val.images, np.eye(num_classes, dtype=np.float32)[val.labels]),
        validation_batch_size=max(params.batch_size, 1000),
        callbacks=[
            LearningRateLogger(),
            # DVCLive before the backup: the curves are never behind the checkpoint
            DVCLiveCallback(live=live),
            keras.callbacks.BackupAndRestore(str(backup_dir), double_checkpoint=True),
        ],
        shuffle=False,  # the stream is already shuffled, per epoch and seeded
        verbose=2,
    )
    last = {key: float(values[-1]) for key, values in history.history.items()}
    write_text(curves_path, curves_table(live_work_dir).to_csv(sep="\t", index=False))
    shutil.rmtree(work_dir)
    return last, time.perf_counter() - start


def curves_table(live_dir: Path) -> pd.DataFrame:
    """DVCLive's series (one file per metric, `eval/` for validation) as one table: a row per
    epoch, columns step, loss, accuracy, val_loss, val_accuracy, lr. One git-tracked file per
    stage keeps DVC's run-cache usable and `dvc plots show` free of a plot per series."""
    table = None
    for path in sorted((live_dir / "plots" / "metrics").glob("*/*.tsv")):
        name = f"val_{path.stem}" if path.parent.name == "eval" else path.stem
        series = pd.read_csv(path, sep="\t")[["step", path.stem]].rename(columns={path.stem: name})
        table = series if table is None else table.merge(series, on="step", how="outer")
    if table is None:
        raise FileNotFoundError(f"{live_dir}: no DVCLive series")
    order = ["step", "loss", "accuracy", "val_loss", "val_accuracy", "lr"]
    return table[[c for c in order if c in table] + [c for c in table if c not in order]]


class LearningRateLogger(keras.callbacks.Callback):
    """Adds the learning rate of the epoch's last step to the logs, so DVCLive plots it."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            optimizer = self.model.optimizer
            logs["lr"] = float(optimizer.learning_rate)
