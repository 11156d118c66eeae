"""Does transfer learning pay? Pretrain fastnet on five CIFAR-10 classes, then learn the other
five from only 100 training images per class: once from scratch, once from the pretrained
weights (head on the frozen backbone, then the whole net fine-tuned at a lower rate), with
the same number of epochs, the same augmentation and the same code as the pipeline's stages.

Prints the test accuracy (on all 5,000 test images of the five new classes, flip TTA) and the
wall time of each run.

    python benchmarks/transfer.py --source ../shared/data/cifar10-jpeg.tar.gz   # ~15 min, 2 cores

`--source` takes what `data.source` takes (URL, archive or folder of CIFAR-10 in either
layout); the default is the official archive.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from imageclf.augment import write_copies  # noqa: E402
from imageclf.datasets import Split, channel_stats, read_dataset  # noqa: E402
from imageclf.download import fetch_dataset  # noqa: E402
from imageclf.evaluation import predict  # noqa: E402
from imageclf.models import build_model, unfreeze_top  # noqa: E402
from imageclf.params import load_params  # noqa: E402
from imageclf.training import compile_model, configure_runtime, fit, steps_per_epoch  # noqa: E402

OUT = PROJECT / "benchmarks" / "out"  # git-ignored
PER_CLASS = 100  # training images per new class
VAL_PER_CLASS = 20  # held out from the other training images, to monitor training only


def subset(split: Split, classes: list[int]) -> Split:
    """The images of `classes`, relabelled 0..len(classes)-1."""
    keep = np.isin(split.labels, classes)
    relabel = {old: new for new, old in enumerate(classes)}
    return Split(split.images[keep], np.array([relabel[c] for c in split.labels[keep]]))


def few_shot(split: Split, per_class: int, val_per_class: int, seed: int) -> tuple[Split, Split]:
    """`per_class` training images per class, and a disjoint validation set."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(split.labels):
        chosen = rng.permutation(np.flatnonzero(split.labels == label))
        train.extend(chosen[:per_class])
        val.extend(chosen[per_class : per_class + val_per_class])
    return (
        Split(split.images[train], split.labels[train]),
        Split(split.images[val], split.labels[val]),
    )


def meta_for(train: Split, names: list[str]) -> dict:
    mean, std = channel_stats(train.images)
    return {"image_size": train.images.shape[1], "mean": mean, "std": std, "class_names": names}


def train_run(
    model, train: Split, val: Split, work: Path, params, epochs: int, lr: float, seed: int
) -> float:
    """Train `model` like the pipeline's train stage; returns the wall time."""
    copies = write_copies(
        work / "augmented",
        train.images,
        params.augment.copies,
        seed,
        params.augment.translate,
        params.augment.flip,
        params.augment.cutout,
    )
    steps = steps_per_epoch(len(train.labels), params.train.batch_size)
    compile_model(
        model,
        params.train,
        lr,
        total_steps=steps * epochs,
        warmup_steps=round(min(params.train.warmup_epochs, epochs / 4) * steps),
    )
    _, seconds = fit(
        model,
        copies,
        train,
        val,
        params=params.train,
        epochs=epochs,
        seed=seed,
        work_dir=work / "checkpoint",
        fingerprint=f"{work.name} {epochs} epochs at lr {lr}",  # never resumed: a fresh folder
        curves_path=work / "curves.tsv",
    )
    return seconds


def accuracy(model, test: Split) -> float:
    probabilities = predict(model, test.images, batch_size=1000, tta="flip")
    return float((probabilities.argmax(axis=1) == test.labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=load_params(PROJECT / "params.yaml").data.source)
    parser.add_argument(
        "--work-dir", type=Path, default=PROJECT / "benchmarks" / "out" / "transfer"
    )
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--head-epochs", type=int, default=10, help="frozen backbone")
    parser.add_argument("--finetune-epochs", type=int, default=30, help="backbone unfrozen")
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args()

    params = load_params(PROJECT / "params.yaml")
    seed = params.seed
    configure_runtime(params.train, seed)
    work = args.work_dir
    raw = work / "raw"
    if not raw.is_dir():
        fetch_dataset(args.source, raw)
    dataset = read_dataset(raw, params.data.image_size)
    if len(dataset.class_names) != 10 or dataset.test is None:
        raise SystemExit(f"{args.source}: expected CIFAR-10 with its test split")
    old, new = list(range(5)), list(range(5, 10))
    old_names = [dataset.class_names[c] for c in old]
    new_names = [dataset.class_names[c] for c in new]

    # 1. pretrain on the training images of the first five classes, as the train stage would,
    # monitored on some held out of them: the test split is read only at the end
    old_train = subset(dataset.train, old)
    smallest = int(np.bincount(old_train.labels).min())
    pretrain, pretrain_val = few_shot(old_train, smallest - VAL_PER_CLASS, VAL_PER_CLASS, seed)
    model = build_model(params.model, meta_for(pretrain, old_names), pretrain.images)
    pretrain_seconds = train_run(
        model,
        pretrain,
        pretrain_val,
        work / "pretrain",
        params,
        args.pretrain_epochs,
        params.train.lr,
        seed,
    )
    pretrained = work / "pretrained.keras"
    model.save(pretrained)
    print(f"pretrained on {old_names}: {pretrain_seconds:.0f} s")

    # 2. the five new classes, 100 training images each
    train, val = few_shot(subset(dataset.train, new), PER_CLASS, VAL_PER_CLASS, seed)
    test = subset(dataset.test, new)
    meta = meta_for(train, new_names)
    epochs = args.head_epochs + args.finetune_epochs
    small = params.model_copy(
        update={"train": params.train.model_copy(update={"batch_size": args.batch_size})}
    )

    scratch = build_model(params.model, meta, train.images)
    scratch_seconds = train_run(
        scratch, train, val, work / "scratch", small, epochs, params.train.lr, seed
    )
    scratch_accuracy = accuracy(scratch, test)

    transferred = build_model(
        params.model.model_copy(update={"weights": str(pretrained)}), meta, train.images
    )
    head_seconds = train_run(
        transferred, train, val, work / "head", small, args.head_epochs, params.train.lr, seed
    )
    unfreeze_top(transferred, "all")
    tune_seconds = train_run(
        transferred,
        train,
        val,
        work / "finetune",
        small,
        args.finetune_epochs,
        params.finetune.lr,
        seed,
    )
    transfer_accuracy = accuracy(transferred, test)

    rows = [
        (f"from scratch, {epochs} epochs", scratch_accuracy, scratch_seconds),
        (
            f"pretrained: head {args.head_epochs} + finetune {args.finetune_epochs} epochs",
            transfer_accuracy,
            head_seconds + tune_seconds,
        ),
    ]
    print(f"\n{PER_CLASS} training images per class of {new_names}; {len(test.labels)} test images")
    print(f"{'run':<44} {'test accuracy':>13} {'wall time':>10}")
    for name, score, seconds in rows:
        print(f"{name:<44} {score:>13.4f} {seconds:>9.0f}s")
    print(f"pretraining on {old_names} ({len(pretrain.labels)} images): {pretrain_seconds:.0f} s")


if __name__ == "__main__":
    main()
