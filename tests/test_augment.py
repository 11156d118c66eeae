"""Materialized augmentation: seeded, label-preserving translations, flips and cutout."""

from pathlib import Path

import numpy as np

from imageclf.augment import augment_copy, copy_paths, write_copies


def images(count: int = 64, size: int = 12) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def crops_of(original: np.ndarray, pad: int) -> list[np.ndarray]:
    padded = np.pad(original, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    size = original.shape[0]
    windows = [
        padded[y : y + size, x : x + size] for y in range(2 * pad + 1) for x in range(2 * pad + 1)
    ]
    return windows + [w[:, ::-1] for w in windows]


def test_each_augmented_image_is_a_shifted_or_mirrored_original() -> None:
    originals = images()
    augmented = augment_copy(originals, copy=0, seed=1, translate=2, flip="random", cutout=0)
    assert augmented.shape == originals.shape and augmented.dtype == np.uint8
    for original, result in zip(originals, augmented):
        assert any(np.array_equal(result, crop) for crop in crops_of(original, 2))
    assert not np.array_equal(augmented, originals)


def test_copies_are_seeded() -> None:
    originals = images()
    first = augment_copy(originals, 0, seed=1, translate=2, flip="random", cutout=4)
    assert np.array_equal(first, augment_copy(originals, 0, 1, 2, "random", 4))
    assert not np.array_equal(first, augment_copy(originals, 1, 1, 2, "random", 4))
    assert not np.array_equal(first, augment_copy(originals, 0, 2, 2, "random", 4))


def test_alternate_flip_mirrors_each_image_in_exactly_one_of_two_consecutive_copies() -> None:
    originals = images()
    copies = [
        augment_copy(originals, c, seed=5, translate=0, flip="alternate", cutout=0) for c in (3, 4)
    ]
    for index, original in enumerate(originals):
        mirrored = [np.array_equal(copy[index], original[:, ::-1]) for copy in copies]
        assert sorted(mirrored) == [False, True]


def test_cutout_zeroes_one_square_at_most() -> None:
    originals = np.full((32, 16, 16, 3), 200, dtype=np.uint8)
    augmented = augment_copy(originals, 0, seed=0, translate=0, flip="none", cutout=6)
    zeroed = (augmented == 0).all(axis=-1)
    assert zeroed.any(axis=(1, 2)).all()
    assert (zeroed.sum(axis=(1, 2)) <= 36).all()
    rows, cols = np.nonzero(zeroed[0])
    assert rows.max() - rows.min() < 6 and cols.max() - cols.min() < 6


def test_write_copies_stores_one_file_per_copy(tmp_path: Path) -> None:
    originals = images(10)
    folder = tmp_path / "augmented"
    paths = write_copies(
        folder, originals, copies=3, seed=1, translate=1, flip="alternate", cutout=0
    )
    assert copy_paths(folder) == paths and len(paths) == 3
    assert np.array_equal(np.load(paths[2]), augment_copy(originals, 2, 1, 1, "alternate", 0))
    assert sorted(p.name for p in folder.iterdir()) == [p.name for p in paths]
