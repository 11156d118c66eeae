"""Read a downloaded dataset (CIFAR python batches or an image-folder tree) into arrays, carve
the validation (and, when missing, test) splits, and store the prepared splits with their
per-channel statistics.

Prepared layout (`data/prepared/`): `train.npz`, `val.npz`, `test.npz` with `images` (uint8,
N x H x W x 3) and `labels` (int64), and `meta.json` with the class names, image size, mean and
std (computed on the training split only), counts per class and skipped files.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from imageclf.errors import PipelineError
from imageclf.fileio import atomic_path, write_json
from imageclf.images import BadImage, decode_image, resize_images

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    images: np.ndarray  # uint8, N x H x W x 3
    labels: np.ndarray  # int64, N


@dataclass
class RawDataset:
    class_names: list[str]
    train: Split
    test: Split | None  # None when the dataset ships no test split
    skipped: list[str] = field(default_factory=list)  # files that did not decode


# --- Reading --------------------------------------------------------------------------------


def read_dataset(raw_dir: Path, image_size: int, on_bad_image: str = "fail") -> RawDataset:
    """Read the dataset under `raw_dir`, whichever supported layout it has."""
    if not raw_dir.is_dir():
        raise PipelineError(f"{raw_dir}: no downloaded dataset here; run `dvc repro download`")
    root = _unwrap(raw_dir)
    if (root / "batches.meta").is_file() or (root / "meta").is_file():
        return _read_cifar_batches(root, image_size)
    return _read_image_folders(root, image_size, on_bad_image)


def _unwrap(folder: Path) -> Path:
    """Descend through wrapper folders that hold nothing but one folder (e.g. `cifar10-jpeg/`)."""
    while True:
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
        if len(entries) == 1 and entries[0].is_dir() and entries[0].name not in ("train", "test"):
            folder = entries[0]
        else:
            return folder


def _read_cifar_batches(root: Path, image_size: int) -> RawDataset:
    """CIFAR-10 (`data_batch_*`, `test_batch`, `batches.meta`) or CIFAR-100 (`train`, `test`,
    `meta`) python batches."""
    cifar10 = (root / "batches.meta").is_file()
    meta = _unpickle(root / ("batches.meta" if cifar10 else "meta"))
    names_key = b"label_names" if cifar10 else b"fine_label_names"
    labels_key = b"labels" if cifar10 else b"fine_labels"
    class_names = [name.decode() for name in meta[names_key]]
    train_files = sorted(root.glob("data_batch_*")) if cifar10 else [root / "train"]
    test_files = [root / ("test_batch" if cifar10 else "test")]
    if not train_files or not all(path.is_file() for path in train_files):
        raise PipelineError(f"{root}: CIFAR batches incomplete: training batch files are missing")

    def load(files: list[Path]) -> Split:
        batches = [_unpickle(path) for path in files]
        try:
            flat = np.concatenate([batch[b"data"] for batch in batches])
            labels = np.concatenate([batch[labels_key] for batch in batches]).astype(np.int64)
        except KeyError as exc:
            raise PipelineError(f"{root}: CIFAR batch without {exc.args[0]!r}") from None
        side = int(round((flat.shape[1] // 3) ** 0.5))
        images = flat.reshape(-1, 3, side, side).transpose(0, 2, 3, 1)
        return Split(resize_images(images, image_size), labels)

    test = load(test_files) if test_files[0].is_file() else None
    return RawDataset(class_names, load(train_files), test)


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as file:
            return pickle.load(file, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError) as exc:
        raise PipelineError(f"{path}: not a readable CIFAR batch file ({exc})") from None


def _read_image_folders(root: Path, image_size: int, on_bad_image: str) -> RawDataset:
    """`root/<class>/*` or `root/train/<class>/*` (+ optional `root/test/<class>/*`)."""
    train_root = root / "train" if (root / "train").is_dir() else root
    test_root = root / "test" if (root / "test").is_dir() else None
    class_names = sorted(p.name for p in train_root.iterdir() if p.is_dir() and p.name[0] != ".")
    if not class_names:
        raise PipelineError(
            f"{train_root}: no class folders found; expected one folder per class "
            "(optionally under train/ and test/), or CIFAR python batches"
        )
    if len(class_names) < 2:
        raise PipelineError(f"{train_root}: only one class ({class_names[0]}); need at least two")
    skipped: list[str] = []
    train = _read_split(train_root, class_names, image_size, on_bad_image, skipped)
    test = None
    if test_root is not None:
        extra = sorted(
            p.name for p in test_root.iterdir() if p.is_dir() and p.name not in class_names
        )
        if extra:
            raise PipelineError(
                f"{test_root}: class folders {extra} are not in {train_root}; "
                "train and test must have the same classes"
            )
        test = _read_split(test_root, class_names, image_size, on_bad_image, skipped)
    return RawDataset(class_names, train, test, skipped)


def _read_split(
    folder: Path, class_names: list[str], image_size: int, on_bad_image: str, skipped: list[str]
) -> Split:
    images, labels = [], []
    for label, name in enumerate(class_names):
        class_dir = folder / name
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and p.name[0] != ".")
        count = 0
        for path in files:
            try:
                pixels = decode_image(path, size=image_size)
            except BadImage as exc:
                if on_bad_image == "fail":
                    raise PipelineError(
                        f"{exc}; remove it, or set preprocess.on_bad_image: skip to leave such "
                        "files out"
                    ) from None
                skipped.append(str(path))
                continue
            images.append(resize_images(pixels[None], image_size)[0])
            labels.append(label)
            count += 1
        if count == 0:
            raise PipelineError(f"{class_dir}: class folder has no readable images")
    return Split(np.stack(images), np.asarray(labels, dtype=np.int64))


# --- Splitting and statistics ---------------------------------------------------------------


def prepare_splits(
    dataset: RawDataset, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, Split]:
    """Carve a stratified validation split (and a test split, if the dataset has none)."""
    train = dataset.train
    splits: dict[str, Split] = {}
    if dataset.test is None:
        train, splits["test"] = _stratified_split(train, test_fraction, seed, "test_fraction")
    else:
        splits["test"] = dataset.test
    splits["train"], splits["val"] = _stratified_split(train, val_fraction, seed, "val_fraction")
    return {name: splits[name] for name in SPLITS}


def _stratified_split(split: Split, fraction: float, seed: int, key: str) -> tuple[Split, Split]:
    counts = np.bincount(split.labels)
    try:
        keep, carve = train_test_split(
            np.arange(len(split.labels)),
            test_size=fraction,
            stratify=split.labels,
            random_state=seed,
        )
    except ValueError as exc:
        raise PipelineError(
            f"preprocess.{key} = {fraction}: cannot carve a stratified split from "
            f"{len(split.labels)} images (smallest class: {counts.min()}): {exc}. "
            "Add images or change the fraction."
        ) from None
    # train_test_split shuffles: stored splits are in a seeded random order, not class by class
    return Split(split.images[keep], split.labels[keep]), Split(
        split.images[carve], split.labels[carve]
    )


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images, on the 0-255 scale."""
    # one channel at a time: a float copy of the whole split would need 8 bytes per pixel
    channels = [images[..., c].astype(np.float32) for c in range(images.shape[-1])]
    return (
        [float(channel.mean(dtype=np.float64)) for channel in channels],
        [float(channel.std(dtype=np.float64)) for channel in channels],
    )


# --- Storage --------------------------------------------------------------------------------


def save_prepared(
    out_dir: Path, splits: dict[str, Split], class_names: list[str], skipped: list[str]
) -> dict:
    """Write the splits and `meta.json`; returns the meta dict."""
    mean, std = channel_stats(splits["train"].images)
    meta = {
        "class_names": class_names,
        "image_size": int(splits["train"].images.shape[1]),
        "mean": mean,
        "std": std,
        "counts": {
            name: dict(
                zip(class_names, np.bincount(split.labels, minlength=len(class_names)).tolist())
            )
            for name, split in splits.items()
        },
        "skipped_files": skipped,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        with atomic_path(out_dir / f"{name}.npz") as tmp:
            np.savez(tmp, images=split.images, labels=split.labels)
    write_json(out_dir / "meta.json", meta)
    return meta


def load_split(prepared_dir: Path, name: str) -> Split:
    with np.load(prepared_dir / f"{name}.npz") as data:
        return Split(data["images"], data["labels"])


def load_meta(prepared_dir: Path) -> dict:
    return json.loads((prepared_dir / "meta.json").read_text())
