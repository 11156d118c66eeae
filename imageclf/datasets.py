"""Read a downloaded dataset (CIFAR python batches or an image-folder tree) into arrays, carve
the validation (and, when missing, test) splits, and store the prepared splits with their
per-channel statistics.

Prepared layout (`data/prepared/`): `train.npz`, `val.npz`, `test.npz` with `images` (uint8,
N x H x W x 3) and `labels` (int64), and `meta.json` with the class names, image size, mean and
std (computed on the training split only), counts per class and skipped files.
"""

from __future__ import annotations

import functools
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from imageclf.errors import PipelineError
from imageclf.fileio import atomic_path, write_json
from imageclf.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    BadImage,
    decode_image,
    resize_images,
)

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
    val: Split | None = None  # None when the dataset ships no validation split


# --- Reading --------------------------------------------------------------------------------

# What operating systems leave among a user's files, never images nor classes: macOS Finder
# zips carry a __MACOSX/ folder of "._*" AppleDouble files, Windows Explorer writes Thumbs.db
# and desktop.ini into picture folders. Hidden files (.DS_Store, ._*) are left out as well.
OS_METADATA = frozenset({"__macosx", "thumbs.db", "ehthumbs.db", "desktop.ini"})
# names of the split folders a dataset may ship, matched in any case (Kaggle's Train/, Test/)
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
# data/raw is the download stage's copy of data.source: what to do about a problem found there
FIX_THE_SOURCE = (
    "make the change in your data.source folder or archive, then run `dvc repro -f -s "
    "download` and `dvc repro` (DVC does not notice changes inside data.source)"
)


def read_dataset(
    raw_dir: Path,
    image_size: int,
    on_bad_image: str = "fail",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> RawDataset:
    """Read the dataset under `raw_dir`, whichever supported layout it has. An image that
    would decode to more than `max_pixels` pixels counts as unreadable."""
    if not raw_dir.is_dir():
        raise PipelineError(f"{raw_dir}: no downloaded dataset here; run `dvc repro download`")
    root = _unwrap(raw_dir)
    if _is_cifar(root):
        return _read_cifar_batches(root, image_size)
    return _read_image_folders(root, image_size, on_bad_image, max_pixels)


def _is_cifar(folder: Path) -> bool:
    return (folder / "batches.meta").is_file() or (folder / "meta").is_file()


def _is_os_metadata(name: str) -> bool:
    return name.startswith(".") or name.lower() in OS_METADATA


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not _is_os_metadata(p.name))


def _split_name(name: str) -> str | None:
    return next((split for split, names in SPLIT_FOLDERS.items() if name.lower() in names), None)


def _split_of(folder: Path) -> str | None:
    """The split `folder` is, if it is one: named like a split, holding class folders and no
    images of its own. A folder of images called "train" is a class (trains, among vehicles)."""
    split = _split_name(folder.name)
    if split is None:
        return None
    entries = _entries(folder)
    holds_images = any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in entries)
    return split if any(p.is_dir() for p in entries) and not holds_images else None


def _unwrap(folder: Path) -> Path:
    """Descend through wrapper folders (e.g. `cifar10-jpeg/`): a lone folder, next to nothing but
    files that are not images (LICENSE.txt, README.md), that holds folders or CIFAR batches."""
    while True:
        entries = _entries(folder)
        folders = [p for p in entries if p.is_dir()]
        loose_images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if len(folders) != 1 or loose_images or _split_name(folders[0].name):
            return folder
        inner = folders[0]
        # a lone folder of images is the only class of a one-class dataset, not a wrapper
        if not _is_cifar(inner) and not any(p.is_dir() for p in _entries(inner)):
            return folder
        folder = inner


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


def _read_image_folders(
    root: Path, image_size: int, on_bad_image: str, max_pixels: int
) -> RawDataset:
    """`root/<class>/*` or `root/train/<class>/*` (+ optional `root/test/<class>/*` and
    `root/val/<class>/*`; split folders named in any case)."""
    folders = [p for p in _entries(root) if p.is_dir()]
    splits: dict[str, list[Path]] = {}
    for path in folders:
        if split := _split_of(path):
            splits.setdefault(split, []).append(path)
    if "train" not in splits:
        splits.pop("val", None)  # only next to train/, so that a class may be called "valid"
    for split, paths in splits.items():
        if len(paths) > 1:
            raise PipelineError(
                f"{root}: {', '.join(p.name for p in paths)} are all the {split} split; "
                f"keep one of them: {FIX_THE_SOURCE}"
            )
    if "train" in splits:
        split_folders = [paths[0] for paths in splits.values()]
        beside = [p.name for p in folders if p not in split_folders]
        if beside:
            raise PipelineError(
                f"{root}: folders {beside} are next to the split folders "
                f"{[p.name for p in split_folders]}. A dataset is either one folder per class, or "
                "split folders (train/, and optionally val/ and test/) of one folder per class "
                f"each: move them into the splits, or rename the split-named folders if they are "
                f"classes; {FIX_THE_SOURCE}"
            )
    train_root = splits["train"][0] if "train" in splits else root
    test_root = splits["test"][0] if "test" in splits else None
    # A dataset's own validation split is used as it is, like its test split: its authors may
    # have kept near-duplicates (frames of one video, one object) on the same side.
    val_root = splits["val"][0] if "val" in splits else None
    class_names = sorted(
        p.name for p in _entries(train_root) if p.is_dir() and p not in (test_root, val_root)
    )
    if not class_names:
        raise PipelineError(
            f"{train_root}: no class folders found; expected one folder per class "
            "(optionally under train/ and test/), or CIFAR python batches"
        )
    if len(class_names) < 2:
        raise PipelineError(f"{train_root}: only one class ({class_names[0]}); need at least two")
    loose = [p.name for p in _entries(train_root) if p.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        print(
            f"{train_root}: {len(loose)} image file(s) next to the class folders ({loose[0]}, "
            "...) are in no class: left out"
        )
    unreadable: list[tuple[str, str]] = []  # (path, what is wrong), from every split
    read = functools.partial(
        _read_split,
        class_names=class_names,
        image_size=image_size,
        on_bad_image=on_bad_image,
        max_pixels=max_pixels,
        unreadable=unreadable,
    )
    train = read(train_root)
    test = val = None
    if test_root is not None:
        test = _read_other_split(test_root, train_root, class_names, read)
    if val_root is not None:
        print(f"{val_root}: used as the validation split (preprocess.val_fraction is not used)")
        val = _read_other_split(val_root, train_root, class_names, read)
    if unreadable and on_bad_image == "fail":
        raise PipelineError(_unreadable_files(unreadable))
    return RawDataset(class_names, train, test, [path for path, _ in unreadable], val)


def _unreadable_files(unreadable: list[tuple[str, str]], shown: int = 20) -> str:
    """One error for every file that did not decode: a dataset with several bad files is
    fixed in one go, not one run per file."""
    lines = [problem for _, problem in unreadable[:shown]]
    if len(unreadable) > shown:
        lines.append(f"... and {len(unreadable) - shown} more")
    return (
        f"{len(unreadable)} file(s) are not readable images:\n  "
        + "\n  ".join(lines)
        + "\nSet preprocess.on_bad_image: skip to leave such files out, or fix or remove them: "
        + FIX_THE_SOURCE
    )


def _read_other_split(
    folder: Path, train_root: Path, class_names: list[str], read: functools.partial
) -> Split:
    """A split the dataset ships besides train/: the same class folders, read by `read`."""
    present = {p.name for p in _entries(folder) if p.is_dir()}
    extra = sorted(present - set(class_names))
    missing = [name for name in class_names if name not in present]
    if extra or missing:
        found = [
            f"class folders {names} {where}"
            for names, where in ((extra, f"are not in {train_root}"), (missing, "are missing"))
            if names
        ]
        raise PipelineError(
            f"{folder}: {'; '.join(found)}. Every split must have the same classes: "
            + FIX_THE_SOURCE
        )
    return read(folder)


def _read_split(
    folder: Path,
    class_names: list[str],
    image_size: int,
    on_bad_image: str,
    max_pixels: int,
    unreadable: list[tuple[str, str]],
) -> Split:
    """The images of `folder/<class>/**`; files that do not decode are added to `unreadable`."""
    images, labels = [], []
    for label, name in enumerate(class_names):
        class_dir = folder / name
        files = sorted(
            p
            for p in class_dir.rglob("*")
            if p.is_file()
            and not any(_is_os_metadata(part) for part in p.relative_to(class_dir).parts)
        )
        count = bad = 0
        for path in files:
            try:
                pixels = decode_image(
                    path, max_pixels, size=image_size, limit_name="preprocess.max_pixels"
                )
            except BadImage as exc:
                unreadable.append((str(path), str(exc)))
                bad += 1
                continue
            images.append(resize_images(pixels[None], image_size)[0])
            labels.append(label)
            count += 1
        if not files:
            raise PipelineError(
                f"{class_dir}: class folder without image files; add images to it or remove "
                f"it: {FIX_THE_SOURCE}"
            )
        # with on_bad_image: fail, a class of unreadable files is reported with the others
        if count == 0 and on_bad_image == "skip":
            raise PipelineError(
                f"{class_dir}: none of the class folder's {bad} files is a readable image; "
                f"fix them: {FIX_THE_SOURCE}"
            )
    if not images:  # every file unreadable: the caller reports them
        return Split(np.zeros((0, image_size, image_size, 3), np.uint8), np.zeros(0, np.int64))
    return Split(np.stack(images), np.asarray(labels, dtype=np.int64))


# --- Splitting and statistics ---------------------------------------------------------------


def prepare_splits(
    dataset: RawDataset, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, Split]:
    """Carve a stratified validation split (and a test split) unless the dataset has its own."""
    train = dataset.train
    carved = [
        part for part, own in (("test", dataset.test), ("validation", dataset.val)) if own is None
    ]
    splits: dict[str, Split] = {}
    if dataset.test is None:
        train, splits["test"] = _stratified_split(
            dataset, train, test_fraction, seed, "test", carved
        )
    else:
        splits["test"] = dataset.test
    if dataset.val is None:
        splits["train"], splits["val"] = _stratified_split(
            dataset, train, val_fraction, seed, "val", carved
        )
    else:
        splits["train"], splits["val"] = train, dataset.val
    return {name: splits[name] for name in SPLITS}


def _stratified_split(
    dataset: RawDataset, split: Split, fraction: float, seed: int, part: str, carved: list[str]
) -> tuple[Split, Split]:
    key = f"preprocess.{part}_fraction = {fraction}"
    name = "validation" if part == "val" else part
    counts = np.bincount(split.labels, minlength=len(dataset.class_names))
    # stratified: each class keeps at least one image on either side
    scarce = np.flatnonzero(counts < 2)
    if scarce.size:
        read = np.bincount(dataset.train.labels, minlength=len(counts))
        described = [
            f"{dataset.class_names[c]!r} has {read[c]} image(s)"
            + (f" ({counts[c]} left after carving the test split)" if counts[c] != read[c] else "")
            for c in scarce
        ]
        raise PipelineError(
            f"{key}: cannot carve a stratified {name} split: class "
            f"{'; '.join(described)}. Each class needs at least {1 + len(carved)} images (one "
            f"for training, one for each split carved from it: {', '.join(carved)}); add images "
            "to its folder."
        )
    try:
        keep, carve = train_test_split(
            np.arange(len(split.labels)),
            test_size=fraction,
            stratify=split.labels,
            random_state=seed,
        )
    except ValueError as exc:
        raise PipelineError(
            f"{key}: cannot carve a stratified {name} split from {len(split.labels)} images "
            f"(smallest class: {counts.min()}): {exc}. Add images or change the fraction."
        ) from None
    keep, carve = _every_class_on_both_sides(split.labels, keep, carve, seed)
    # train_test_split shuffles: stored splits are in a seeded random order, not class by class
    return Split(split.images[keep], split.labels[keep]), Split(
        split.images[carve], split.labels[carve]
    )


def _every_class_on_both_sides(
    labels: np.ndarray, keep: np.ndarray, carve: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """`train_test_split` rounds each class's share, so a class of a few images can land on
    one side only (2 of 18 images, a fifth carved: none of that class in the carved split,
    and its macro-averaged scores 0). One of its images, drawn with `seed`, moves across.
    Splits where every class is on both sides come back unchanged."""
    rng = np.random.default_rng(seed)

    def move_one(label: int, source: np.ndarray, target: np.ndarray) -> tuple:
        candidates = np.flatnonzero(labels[source] == label)  # at least 2: checked before
        moved = source[candidates[rng.integers(len(candidates))]]
        return source[source != moved], np.append(target, moved)

    for label in np.unique(labels):
        if not np.any(labels[carve] == label):
            keep, carve = move_one(label, keep, carve)
        if not np.any(labels[keep] == label):
            carve, keep = move_one(label, carve, keep)
    return keep, carve


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
