"""Reading datasets users bring, splitting them, and the errors bad data gets."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imageclf.datasets import load_meta, load_split, prepare_splits, read_dataset, save_prepared
from imageclf.errors import PipelineError
from imageclf.images import BadImage, decode_image
from tests import synthetic


def test_image_folders_and_cifar_batches_read_alike(tmp_path: Path) -> None:
    folders = read_dataset(synthetic.image_folders(tmp_path / "f" / "wrapper"), 16)
    batches = read_dataset(synthetic.cifar_batches(tmp_path / "c" / "cifar-10-batches-py"), 16)
    for dataset in (folders, batches):
        assert dataset.train.images.shape == (90, 16, 16, 3)
        assert dataset.train.images.dtype == np.uint8
        assert np.bincount(dataset.train.labels).tolist() == [30, 30, 30]
        assert dataset.test is not None and len(dataset.test.labels) == 24
    assert folders.class_names == sorted(synthetic.CLASSES)
    assert batches.class_names == list(synthetic.CLASSES)
    # the dominant colour channel follows the class, whatever the layout
    for dataset in (folders, batches):
        for label, name in enumerate(dataset.class_names):
            means = dataset.train.images[dataset.train.labels == label].mean(axis=(0, 1, 2))
            assert means.argmax() == synthetic.CLASSES.index(name)


def test_other_sizes_and_grayscale_are_converted(tmp_path: Path) -> None:
    root = synthetic.image_folders(tmp_path / "ds", per_class=6, test_per_class=0, size=16)
    Image.new("L", (40, 24), color=77).save(root / "train" / "red" / "gray.png")
    Image.new("RGBA", (8, 8), color=(1, 2, 3, 4)).save(root / "train" / "blue" / "alpha.png")
    dataset = read_dataset(root, 16)
    assert dataset.train.images.shape == (20, 16, 16, 3)
    assert dataset.test is None


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_corrupt_files_are_reported_by_path(tmp_path: Path, policy: str) -> None:
    root = synthetic.image_folders(tmp_path / "ds", per_class=6, test_per_class=2)
    bad = root / "train" / "green" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "train" / "red" / "notes.txt").write_text("hello")
    if policy == "fail":
        with pytest.raises(PipelineError, match="broken.jpg: not a readable image"):
            read_dataset(root, 16, on_bad_image=policy)
    else:
        dataset = read_dataset(root, 16, on_bad_image=policy)
        assert sorted(Path(p).name for p in dataset.skipped) == ["broken.jpg", "notes.txt"]
        assert len(dataset.train.labels) == 18


def test_an_upload_that_is_no_image_is_named_as_such() -> None:
    with pytest.raises(BadImage) as error:
        decode_image(b"hello", name="upload 3")
    assert str(error.value).startswith("upload 3: not a readable image (no image format")
    assert "BytesIO" not in str(error.value)


def test_one_class_or_an_empty_class_is_an_error(tmp_path: Path) -> None:
    one = synthetic.image_folders(tmp_path / "one", per_class=4, test_per_class=0, classes=("a",))
    with pytest.raises(PipelineError, match="only one class"):
        read_dataset(one, 16)
    root = synthetic.image_folders(tmp_path / "two", per_class=4, test_per_class=0)
    (root / "train" / "empty").mkdir()
    with pytest.raises(PipelineError, match="empty: class folder has no readable images"):
        read_dataset(root, 16)


def test_splits_are_stratified_seeded_and_carved_from_train(tmp_path: Path) -> None:
    root = synthetic.image_folders(tmp_path / "ds", per_class=20, test_per_class=0)
    dataset = read_dataset(root, 16)
    splits = prepare_splits(dataset, val_fraction=0.2, test_fraction=0.25, seed=3)
    assert {name: np.bincount(s.labels).tolist() for name, s in splits.items()} == {
        "train": [12, 12, 12],
        "val": [3, 3, 3],
        "test": [5, 5, 5],
    }
    together = np.concatenate([s.images for s in splits.values()])
    assert len(np.unique(together.reshape(60, -1), axis=0)) == 60  # no image in two splits
    again = prepare_splits(dataset, val_fraction=0.2, test_fraction=0.25, seed=3)
    assert np.array_equal(again["val"].images, splits["val"].images)
    other = prepare_splits(dataset, val_fraction=0.2, test_fraction=0.25, seed=4)
    assert not np.array_equal(other["val"].images, splits["val"].images)


def test_too_few_images_for_a_split_is_an_error(tmp_path: Path) -> None:
    root = synthetic.image_folders(tmp_path / "ds", per_class=2, test_per_class=0)
    with pytest.raises(PipelineError, match="preprocess.val_fraction = 0.1: cannot carve"):
        prepare_splits(read_dataset(root, 16), val_fraction=0.1, test_fraction=0.5, seed=0)


def test_prepared_data_round_trips_with_train_statistics(tmp_path: Path) -> None:
    dataset = read_dataset(synthetic.image_folders(tmp_path / "ds"), 16)
    splits = prepare_splits(dataset, 0.1, 0.2, seed=0)
    save_prepared(tmp_path / "prepared", splits, dataset.class_names, [])
    meta = load_meta(tmp_path / "prepared")
    train = load_split(tmp_path / "prepared", "train")
    assert np.array_equal(train.images, splits["train"].images)
    assert meta["mean"] == pytest.approx(train.images.mean(axis=(0, 1, 2)).tolist())
    assert meta["std"] == pytest.approx(train.images.std(axis=(0, 1, 2)).tolist())
    assert meta["counts"]["val"] == {"blue": 3, "green": 3, "red": 3}
