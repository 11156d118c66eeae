"""Tiny synthetic datasets on disk, in the layouts users bring: image folders and CIFAR batches.

Each class has its own dominant colour, so even a tiny net learns it in an epoch or two.
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("red", "green", "blue")


def class_images(label: int, count: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, label])
    images = rng.integers(0, 90, (count, size, size, 3), dtype=np.uint8)
    images[..., label % 3] += 140
    return images


def image_folders(
    root: Path,
    per_class: int = 30,
    test_per_class: int = 8,
    size: int = 16,
    seed: int = 0,
    classes: tuple[str, ...] = CLASSES,
) -> Path:
    """`root/train/<class>/*.png` and, if `test_per_class`, `root/test/<class>/*.png`."""
    splits = {"train": per_class, "test": test_per_class}
    for split, count in splits.items():
        if not count:
            continue
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(class_images(label, count, size, seed + len(split))):
                Image.fromarray(image).save(folder / f"{i:04d}.png")
    return root


def cifar_batches(root: Path, per_class: int = 30, test_per_class: int = 8, size: int = 16) -> Path:
    """The CIFAR-10 python layout: `data_batch_1..2`, `test_batch`, `batches.meta`."""
    root.mkdir(parents=True, exist_ok=True)

    def batch(per: int, seed: int) -> tuple[np.ndarray, list[int]]:
        images = np.concatenate([class_images(c, per, size, seed) for c in range(len(CLASSES))])
        labels = [c for c in range(len(CLASSES)) for _ in range(per)]
        return images.transpose(0, 3, 1, 2).reshape(len(labels), -1), labels

    data, labels = batch(per_class, 1)
    half = len(labels) // 2
    for number, part in ((1, slice(0, half)), (2, slice(half, None))):
        _dump(root / f"data_batch_{number}", {b"data": data[part], b"labels": labels[part]})
    data, labels = batch(test_per_class, 2)
    _dump(root / "test_batch", {b"data": data, b"labels": labels})
    _dump(root / "batches.meta", {b"label_names": [name.encode() for name in CLASSES]})
    return root


def _dump(path: Path, content: dict) -> None:
    with path.open("wb") as file:
        pickle.dump(content, file)


def tar_gz(folder: Path, archive: Path) -> Path:
    """Pack `folder` as `archive` with the folder itself as the single top-level entry."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive
