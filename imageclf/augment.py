"""Materialize seeded, augmented copies of the training split.

Augmenting once, in its own stage, makes the augmented data a cached and reproducible output:
training reads copy `epoch % copies` instead of drawing random transforms on the fly, so a
rerun (or a resumed run) sees exactly the same images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imageclf.errors import PipelineError
from imageclf.fileio import atomic_path


def augment_copy(
    images: np.ndarray, copy: int, seed: int, translate: int, flip: str, cutout: int
) -> np.ndarray:
    """One augmented copy of `images` (uint8, N x H x W x C), drawn from `(seed, copy)` alone."""
    rng = np.random.default_rng([seed, copy])
    count = len(images)
    out = images
    if translate:
        out = _translate(out, rng, translate)
    if flip == "random":
        mirrored = rng.random(count) < 0.5
    elif flip == "alternate":
        # every image is mirrored on every other copy, starting at a random parity per image
        parity = np.random.default_rng([seed, 2**31]).integers(0, 2, count)
        mirrored = (parity + copy) % 2 == 1
    else:
        mirrored = np.zeros(count, dtype=bool)
    out = np.where(mirrored[:, None, None, None], out[:, :, ::-1], out)
    if cutout:
        out = _cutout(out, rng, cutout)
    return out


def _translate(images: np.ndarray, rng: np.random.Generator, pad: int) -> np.ndarray:
    """Each image shifted at random by up to `pad` pixels each way."""
    count = len(images)
    # drawn as the corner of a crop of the padded image, 0..2*pad (the shift is pad - corner)
    top = rng.integers(0, 2 * pad + 1, count)
    left = rng.integers(0, 2 * pad + 1, count)
    out = np.empty_like(images)
    # one vectorized shift per distinct offset instead of one per image
    for y in range(2 * pad + 1):
        for x in range(2 * pad + 1):
            chosen = (top == y) & (left == x)
            out[chosen] = shift(images[chosen], pad - y, pad - x)
    return out


def shift(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """`images` moved by (dy, dx) pixels, the uncovered edge filled by reflection: a shifted
    photo still looks like a photo, where zero padding would add a black border."""
    pad = max(abs(dy), abs(dx))
    height, width = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    return padded[:, pad - dy : pad - dy + height, pad - dx : pad - dx + width]


def _cutout(images: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Zero a `size` x `size` square at a random centre of each image (clipped at the border)."""
    count, height, width, _ = images.shape
    top = rng.integers(0, height, count)[:, None, None] - size // 2
    left = rng.integers(0, width, count)[:, None, None] - size // 2
    rows = np.arange(height)[None, :, None]
    cols = np.arange(width)[None, None, :]
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    out = images.copy()
    out[inside] = 0
    return out


def write_copies(
    folder: Path,
    images: np.ndarray,
    copies: int,
    seed: int,
    translate: int,
    flip: str,
    cutout: int,
) -> list[Path]:
    """Write each copy to its own `.npy` file in `folder`, so that training holds one copy in
    memory at a time; returns the paths in copy order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"train_{copy:03d}.npy" for copy in range(copies)]
    for copy, path in enumerate(paths):
        with atomic_path(path) as tmp:
            np.save(tmp, augment_copy(images, copy, seed, translate, flip, cutout))
    for stale in set(copy_paths(folder)) - set(paths):  # from an earlier run with more copies
        stale.unlink()
    return paths


def copy_paths(folder: Path) -> list[Path]:
    """The augmented copies written by `write_copies`, in copy order."""
    paths = sorted(folder.glob("train_*.npy"))
    if not paths:
        raise PipelineError(f"{folder}: no augmented copies; run `dvc repro augment`")
    return paths
