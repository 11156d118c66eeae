"""Training shared by the train and finetune stages: hardware setup, the augmented data
stream, optimizer and schedule, resumable `fit` with DVCLive curves, and the stage itself
(`run_training_stage`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
import yaml
from dvclive import Live
from dvclive.keras import DVCLiveCallback

from imageclf import paths
from imageclf.augment import copy_paths
from imageclf.datasets import Split, load_meta, load_split
from imageclf.errors import PipelineError
from imageclf.fileio import atomic_path, write_json, write_text
from imageclf.models import with_precision
from imageclf.optimizers import SGD, AdamW, Muon, Triangular
from imageclf.params import Params, TrainParams


def configure_runtime(params: TrainParams, seed: int) -> tf.distribute.Strategy:
    """Seed everything, pick the float policy and the distribution strategy, in one place."""
    if params.threads != "auto":
        # e.g. two queued experiments on one machine: each takes its share of the cores
        # instead of both using all of them and slowing each other down
        tf.config.threading.set_intra_op_parallelism_threads(params.threads)
        tf.config.threading.set_inter_op_parallelism_threads(params.threads)
    # before any other TensorFlow work: it sets up the cluster's runtime
    strategy = _multi_worker_strategy() if params.distribute == "multi_worker" else None
    # No tf.config.experimental.enable_op_determinism(): Keras turns XLA off under it, and the
    # CPU kernels we use give the same numbers run to run without it (tests/ check this).
    keras.utils.set_random_seed(seed)
    keras.mixed_precision.set_global_policy(precision_policy(params.precision))
    gpus = tf.config.list_physical_devices("GPU")
    if strategy is not None:
        return strategy
    if params.distribute == "mirrored" or (params.distribute == "auto" and len(gpus) > 1):
        devices = [d.name for d in tf.config.list_logical_devices("GPU" if gpus else "CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    return tf.distribute.get_strategy()


def precision_policy(precision: str) -> str:
    """The Keras dtype policy for `train.precision`; auto: mixed_float16 on NVIDIA GPUs (tensor
    cores), float32 on a CPU. mixed_bfloat16 is opt-in: on CPUs with native bfloat16 (AVX512_BF16,
    AMX) it trains faster (README: Hardware), but it was not shown to keep the accuracy."""
    if precision != "auto":
        return precision
    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"


def _multi_worker_strategy() -> tf.distribute.MultiWorkerMirroredStrategy:
    """Synchronous data-parallel training over the machines that TF_CONFIG lists (TensorFlow's
    format: {"cluster": {"chief": [...], "worker": [...]}, "task": {"type": ..., "index": ...}}),
    every GPU of each, or its CPU."""
    try:
        config = json.loads(os.environ["TF_CONFIG"])
        config["cluster"], config["task"]["type"], config["task"]["index"]  # noqa: B018
    except (KeyError, TypeError, ValueError) as exc:
        problem = "is not set" if "TF_CONFIG" not in os.environ else f"is not valid ({exc!r})"
        raise PipelineError(
            f"train.distribute = multi_worker: the environment variable TF_CONFIG {problem}. "
            'Set it on every machine to {"cluster": {"chief": ["host:port"], "worker": '
            '["host:port", ...]}, "task": {"type": "chief", "index": 0}} with its own task '
            "(README: Training on several machines), or set train.distribute: auto"
        ) from None
    return _MultiWorkerMirroredStrategy()


class _MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """Works around keras-team/keras#20585 (open: Keras 3's `fit` fails under this strategy).
    Keras reduces (1) a whole (images, labels) batch in one call, to learn its shapes, and
    (2) each replica's scalar loss and metrics with `axis=0`. Unlike MirroredStrategy, this
    strategy maps a reduction over no tuple, all-reduces no uint8, and takes no axis of a
    scalar. Here it does all three: per item, uint8 through float32, a scalar across replicas.
    """

    def reduce(self, reduce_op, value, axis=None):
        return tf.nest.map_structure(lambda item: self._reduce_one(reduce_op, item, axis), value)

    def _reduce_one(self, reduce_op, value, axis):
        local = self.experimental_local_results(value)[0]
        if local.shape.rank == 0:
            axis = None
        if local.dtype in (tf.float16, tf.bfloat16, tf.float32, tf.float64, tf.int32, tf.int64):
            return super().reduce(reduce_op, value, axis)
        floats = self.run(tf.cast, args=(value, tf.float32))
        return tf.cast(super().reduce(reduce_op, floats, axis), local.dtype)


def output_root(params: TrainParams) -> Path:
    """Where this process writes a training stage's outputs: the project itself, unless it is
    one of the other workers of a multi-worker run. Those hold the same model, but only the
    chief writes the stage's outputs: another worker keeps its copy in a scratch folder of its
    own (`checkpoints/worker-<index>`, removed when its finetune stage ends), from which its
    finetune stage starts, and resumes from its own checkpoints there."""
    if params.distribute != "multi_worker":
        return Path(".")
    config = json.loads(os.environ["TF_CONFIG"])  # checked by configure_runtime
    task = config["task"]
    # TensorFlow's rule: the chief, or without one, worker 0
    if task["type"] == "chief" or (
        task["type"] == "worker" and int(task["index"]) == 0 and "chief" not in config["cluster"]
    ):
        return Path(".")
    return paths.CHECKPOINTS / f"{task['type']}-{task['index']}"


def compile_model(
    model: keras.Model,
    params: TrainParams,
    peak_lr: float,
    total_steps: int,
    warmup_steps: int,
    pretrained: bool = False,
) -> None:
    """Compile with the optimizer of `params`, its learning-rate schedule (linear warmup to
    `peak_lr`, then a cosine or linear decay to zero at `total_steps`) and label smoothing.
    With Muon the conv kernels' schedule peaks at `peak_lr * muon_lr / lr`; a `pretrained`
    model trains with SGD instead (see below)."""
    if params.schedule == "triangular":
        schedule = Triangular(peak_lr, warmup_steps, total_steps)
    else:
        schedule = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup_steps else peak_lr,
            decay_steps=max(1, total_steps - warmup_steps),
            warmup_target=peak_lr if warmup_steps else None,
            warmup_steps=warmup_steps,
        )
    sgd = dict(
        momentum=params.momentum,
        nesterov=True,
        weight_decay=params.weight_decay,
        bias_lr_scale=params.bias_lr_scale,
    )
    optimizer_name = params.optimizer
    if optimizer_name == "muon" and pretrained:
        # Muon holds every kernel it trains at norm sqrt(out channels) from its first step:
        # right for kernels trained from scratch, but it would rescale pretrained ones, whose
        # BatchNorm statistics stay fixed (inference mode) and cannot follow
        print("Pretrained weights: trained with SGD (train.optimizer: muon is for new nets)")
        optimizer_name = "sgd"
    if optimizer_name == "sgd":
        optimizer = SGD(schedule, **sgd)
    elif optimizer_name == "muon":
        # the kernels' peak is train.muon_lr where the others' is train.lr; the finetune
        # stage's lower peak lowers both alike
        optimizer = Muon(
            schedule,
            **sgd,
            muon_lr_scale=params.muon_lr / params.lr,
            muon_momentum=params.muon_momentum,
        )
    else:
        optimizer = AdamW(
            schedule, weight_decay=params.weight_decay, bias_lr_scale=params.bias_lr_scale
        )
    # decaying BatchNorm shifts/scales and biases only hurts; decay the kernels
    optimizer.exclude_from_weight_decay(var_names=["_bn", "bias", "beta", "gamma"])
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if params.jit_compile is True and replicas > 1:
        # Keras 3 compiles the whole distributed step, whose variables sit on several
        # devices: XLA refuses it. With "auto" Keras turns XLA off under tf.distribute.
        raise PipelineError(
            f"train.jit_compile = true: XLA does not compile Keras' training step under "
            f"tf.distribute ({replicas} replicas); set train.jit_compile: auto (XLA off with "
            "several devices, on with one GPU) or train.distribute: none"
        )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=params.label_smoothing),
        metrics=["accuracy"],
        jit_compile=params.jit_compile,
    )


class Lookahead(keras.callbacks.Callback):
    """airbench's lookahead: every `EVERY` steps the weights (BatchNorm statistics included)
    move to an exponential average of themselves, which then replaces them. The average's
    decay grows with the cube of training progress, from 0 (plain SGD) early, when the
    weights still travel far, to 0.95**5 at the end, where averaging the noisy last steps
    gives a flatter, better-generalizing minimum; the weights at the end are that average.
    Averages are also taken at every epoch's end, so that the epoch checkpoint holds the whole
    state and a resumed run continues exactly."""

    EVERY = 5

    def __init__(self, total_steps: int, steps_per_epoch: int) -> None:
        super().__init__()
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.weights = [w for w in self.model.weights if "float" in str(w.dtype)]
        self.average = [keras.ops.convert_to_numpy(w) for w in self.weights]

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        # a plain variable, or one per device under tf.distribute: read its value
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if step % self.EVERY and step % self.steps_per_epoch:
            return
        # airbench ends on the average of the last multiple of 5 steps, dropping up to 4 steps;
        # with a run of a few steps (a tiny dataset) that would be all of them: here the last
        # step is averaged in like the others
        decay = 0.95**self.EVERY * (min(step, self.total_steps) / self.total_steps) ** 3
        for index, weight in enumerate(self.weights):
            average = self.average[index]
            # in this form a weight that did not move (a frozen layer) stays bit for bit
            average = average + (1 - decay) * (keras.ops.convert_to_numpy(weight) - average)
            self.average[index] = average
            weight.assign(average)


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


def run_training_stage(
    stage: str,
    params: Params,
    make_model: Callable[[dict, np.ndarray], keras.Model],
    *,
    peak_lr: float,
    epochs: int,
    warmup_epochs: float,
    first_step: int,
    model_path: Path,
) -> None:
    """What the train and finetune stages share: set up the runtime, make the model in the
    strategy's scope (`make_model(meta, train_images)`), compile it with a warmup + cosine
    schedule, `fit` it resumably, and save the model, `metrics/<stage>.json` (the last epoch's
    figures and the wall time) and the curves `plots/<stage>.tsv`."""
    strategy = configure_runtime(params.train, params.seed)
    root = output_root(params.train)
    fingerprint = stage_fingerprint(stage)
    meta = load_meta(paths.PREPARED)
    train, val = load_split(paths.PREPARED, "train"), load_split(paths.PREPARED, "val")
    copies = copy_paths(paths.AUGMENTED)
    steps = steps_per_epoch(len(train.labels), params.train.batch_size)
    with strategy.scope():
        model = make_model(meta, train.images)
        compile_model(
            model,
            params.train,
            peak_lr,
            total_steps=steps * epochs,
            warmup_steps=round(warmup_epochs * steps),
            pretrained=params.model.weights != "none",
        )
    logs, seconds = fit(
        model,
        copies,
        train,
        val,
        params=params.train,
        epochs=epochs,
        seed=params.seed,
        work_dir=root / paths.CHECKPOINTS / stage,
        curves_path=root / paths.PLOTS / f"{stage}.tsv",
        fingerprint=fingerprint,
        first_step=first_step,
    )
    # every worker saves: reading variables synchronized on read is a collective operation
    with atomic_path(root / model_path) as tmp:
        with_precision(model, "float32").save(tmp)
    write_json(root / paths.METRICS / f"{stage}.json", {**logs, "seconds": round(seconds, 1)})
    if root != Path(".") and stage == "finetune":
        shutil.rmtree(root)  # the last stage another worker takes part in


def pass_model_through(stage: str, params: TrainParams, source: Path, model_path: Path) -> None:
    """A training stage with no epochs to train (finetune.epochs: 0): its model is `source`
    unchanged, its metrics say so, and its curves have no rows."""
    root = output_root(params)
    if root != Path("."):
        shutil.rmtree(root, ignore_errors=True)  # another worker: nothing to take part in
        return
    with atomic_path(model_path) as tmp:
        shutil.copyfile(source, tmp)
    write_json(paths.METRICS / f"{stage}.json", {"epochs": 0, "seconds": 0.0})
    write_text(paths.PLOTS / f"{stage}.tsv", "\t".join(CURVES) + "\n")


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
    fingerprint: str,
    first_step: int = 0,
) -> tuple[dict[str, float], float]:
    """Train `epochs` epochs, resuming from the checkpoint in `work_dir` if a run with the same
    `fingerprint` (what the run depends on) was killed; another run's checkpoint is discarded.

    DVCLive logs the curves in `work_dir` next to the checkpoint, so that a resumed run
    continues them; once training is done they are merged into one table at `curves_path`
    (`curves_table`) and `work_dir` is removed. `first_step` numbers the epochs (the finetune
    stage continues the train stage's curves). Returns the last epoch's logs and the wall time
    in seconds, that of the killed runs it resumes included.
    """
    checkpoint = EpochCheckpoint(work_dir / "backup", fingerprint)
    initial_epoch = checkpoint.restore(model)
    if initial_epoch:
        print(
            f"Resuming from epoch {initial_epoch} of {epochs} (checkpoint in {checkpoint.folder})"
        )
    live = _live(work_dir / "live", first_step + initial_epoch)
    num_classes = model.output_shape[-1]
    steps = steps_per_epoch(len(train.labels), params.batch_size)
    # the curves are written before the checkpoint; a resumed run drops what is logged after
    # it (`_live`), so every epoch appears once
    callbacks = [LearningRateLogger(), DVCLiveCallback(live=live), checkpoint]
    if params.lookahead:
        callbacks.insert(0, Lookahead(total_steps=steps * epochs, steps_per_epoch=steps))
    history = model.fit(
        _batches(
            copies, train, num_classes, params.batch_size, seed, epochs, initial_epoch, first_step
        ),
        initial_epoch=initial_epoch,
        epochs=epochs,
        steps_per_epoch=steps,
        validation_data=(val.images, np.eye(num_classes, dtype=np.float32)[val.labels]),
        validation_batch_size=max(params.batch_size, 1000),
        callbacks=callbacks,
        shuffle=False,  # the stream is already shuffled, per epoch and seeded
        verbose=2,
    )
    last = {key: float(values[-1]) for key, values in history.history.items()}
    write_text(curves_path, curves_table(Path(live.dir)).to_csv(sep="\t", index=False))
    shutil.rmtree(work_dir)
    return last, checkpoint.elapsed()


def _batches(
    copies: Sequence[Path],
    train: Split,
    num_classes: int,
    batch_size: int,
    seed: int,
    epochs: int,
    initial_epoch: int,
    copy_offset: int,
) -> tf.data.Dataset:
    """`epoch_stream` from `initial_epoch` on, as a prefetching tf.data pipeline."""
    return tf.data.Dataset.from_generator(
        lambda: epoch_stream(
            copies,
            train.labels,
            num_classes,
            batch_size,
            seed,
            range(initial_epoch, epochs),
            copy_offset=copy_offset,
        ),
        output_signature=(
            tf.TensorSpec((None, *train.images.shape[1:]), tf.uint8),
            tf.TensorSpec((None, num_classes), tf.float32),
        ),
    ).prefetch(2)


def _live(live_dir: Path, next_step: int) -> Live:
    """DVCLive logging to `live_dir`, continuing its curves at `next_step` (0: afresh)."""
    if next_step == 0 or not live_dir.is_dir():
        shutil.rmtree(live_dir, ignore_errors=True)
    else:
        # a run killed between logging an epoch and checkpointing it logged rows that the
        # resumed run is about to log again
        for series in (live_dir / "plots" / "metrics").rglob("*.tsv"):
            table = pd.read_csv(series, sep="\t")
            write_text(series, table[table["step"] < next_step].to_csv(sep="\t", index=False))
    live = Live(
        dir=str(live_dir),
        dvcyaml=None,
        save_dvc_exp=False,
        report=None,
        resume=next_step > 0,
    )
    live.step = next_step
    return live


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves the training state (weights and optimizer) after every epoch, for resuming a
    killed run, and restores it only into the run it belongs to.

    Unlike `keras.callbacks.BackupAndRestore`, which writes the weights and the epoch number as
    two files one after the other (a kill between them resumes the wrong epoch), each epoch's
    state is one file, `epoch-NNNN.weights.h5`, renamed into place once complete; the two
    latest are kept, so that an unreadable last file falls back to the one before. The
    folder also holds the `fingerprint` of the run that wrote it, and `seconds.json`: the
    training's wall time up to each epoch, so that a resumed run's time counts the runs before.
    """

    KEEP = 2

    def __init__(self, folder: Path, fingerprint: str) -> None:
        super().__init__()
        self.folder = folder
        self.fingerprint = fingerprint
        self.started = time.perf_counter()
        self.seconds_before = 0.0  # of the runs this one resumes

    def elapsed(self) -> float:
        """Wall time of the training so far, earlier runs that this one resumes included."""
        return self.seconds_before + time.perf_counter() - self.started

    def _seconds(self) -> dict[str, float]:
        path = self.folder / "seconds.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def restore(self, model: keras.Model) -> int:
        """Load the latest readable state of this run into `model`; returns its epoch, or 0
        (after discarding the folder) when there is none or it belongs to another run."""
        stored = self.folder / "fingerprint"
        if self.folder.exists() and (
            not stored.is_file() or stored.read_text().strip() != self.fingerprint
        ):
            print(
                f"{self.folder}: the checkpoint belongs to a run with other params, data or "
                "code; starting over from epoch 0"
            )
            shutil.rmtree(self.folder)
        if not self.folder.exists():
            self.folder.mkdir(parents=True)
            write_text(stored, self.fingerprint + "\n")
            return 0
        with model.distribute_strategy.scope():  # its variables are the strategy's
            model.optimizer.build(model.trainable_variables)
        saved = sorted(self.folder.glob("epoch-*.weights.h5"), reverse=True)
        for path in saved:
            try:
                model.load_weights(path)
                epoch = int(path.name.split(".")[0].removeprefix("epoch-"))
                self.seconds_before = self._seconds().get(str(epoch), 0.0)
                return epoch
            except (OSError, ValueError, KeyError, TypeError) as exc:
                warnings.warn(
                    f"{path}: checkpoint unreadable ({exc.__class__.__name__}: {exc}); "
                    "trying the one before",
                    stacklevel=2,
                )
                path.unlink()
        if saved:
            warnings.warn(f"{self.folder}: no readable checkpoint; starting over", stacklevel=2)
        return 0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        # the time first: a kill before the rename below leaves an entry never looked up
        write_text(
            self.folder / "seconds.json",
            json.dumps({**self._seconds(), str(epoch + 1): round(self.elapsed(), 1)}),
        )
        # Keras needs the ".weights.h5" ending; same folder, so the rename is atomic
        partial = self.folder / ".partial.weights.h5"
        self.model.save_weights(partial, overwrite=True)
        os.replace(partial, self.folder / f"epoch-{epoch + 1:04d}.weights.h5")
        for old in sorted(self.folder.glob("epoch-*.weights.h5"))[: -self.KEEP]:
            old.unlink()


def stage_fingerprint(
    stage: str, dvc_file: Path = Path("dvc.yaml"), params_file: Path = Path("params.yaml")
) -> str:
    """What a run of `stage` depends on, as dvc.yaml declares it: the values of its params
    and the contents of its deps (files, and every file in a folder). Two runs with the same
    fingerprint compute the same thing, so one may resume the other's checkpoint."""
    spec = yaml.safe_load(dvc_file.read_text())["stages"][stage]
    values = yaml.safe_load(params_file.read_text())
    digest = hashlib.sha256()
    for key in spec.get("params", []):
        value = values
        for part in str(key).split("."):
            value = value.get(part) if isinstance(value, dict) else None
        digest.update(f"param {key} = {json.dumps(value, sort_keys=True)}\n".encode())
    for dep in spec.get("deps", []):
        root = Path(dep)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            if path.is_file():
                with path.open("rb") as file:
                    content = hashlib.file_digest(file, "md5").hexdigest()
            else:
                content = "missing"
            digest.update(f"dep {path} {content}\n".encode())
    return digest.hexdigest()


CURVES = ("step", "loss", "accuracy", "val_loss", "val_accuracy", "lr")  # columns, in order


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
    return table[[c for c in CURVES if c in table] + [c for c in table if c not in CURVES]]


class LearningRateLogger(keras.callbacks.Callback):
    """Adds the learning rate of the epoch's last step to the logs, so DVCLive plots it."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            optimizer = self.model.optimizer
            logs["lr"] = float(optimizer.learning_rate)
