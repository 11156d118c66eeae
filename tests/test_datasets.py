"""Reading datasets users bring, splitting them, and the errors bad data gets."""

import shutil
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
    (root / "test" / "blue" / "cut.png").write_bytes(
        (root / "test/blue/0000.png").read_bytes()[:60]
    )
    if policy == "fail":
        # every bad file of every split in one error, so that one run shows them all
        with pytest.raises(PipelineError) as error:
            read_dataset(root, 16, on_bad_image=policy)
        message = str(error.value)
        assert message.startswith("3 file(s) are not readable images:")
        for name in ("broken.jpg", "notes.txt", "cut.png"):
            assert f"{name}: not a readable image" in message
        assert "preprocess.on_bad_image: skip" in message
    else:
        dataset = read_dataset(root, 16, on_bad_image=policy)
        names = sorted(Path(p).name for p in dataset.skipped)
        assert names == ["broken.jpg", "cut.png", "notes.txt"]
        assert len(dataset.train.labels) == 18 and len(dataset.test.labels) == 6


def test_a_class_of_unreadable_files_is_listed_with_the_other_bad_files(tmp_path: Path) -> None:
    root = synthetic.image_folders(tmp_path / "ds", per_class=4, test_per_class=0)
    for path in (root / "train" / "green").iterdir():
        path.write_bytes(b"not an image")
    with pytest.raises(PipelineError, match="4 file\\(s\\) are not readable images"):
        read_dataset(root, 16, on_bad_image="fail")
    with pytest.raises(PipelineError, match="green: none of the class folder's 4 files is a"):
        read_dataset(root, 16, on_bad_image="skip")


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
    with pytest.raises(PipelineError) as error:
        read_dataset(root, 16)
    assert str(error.value).startswith(
        f"{root / 'train' / 'empty'}: class folder without image files; add images to it or "
        "remove it: make the change in your data.source folder or archive, then run "
        "`dvc repro -f -s download`"
    )


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


def test_os_leftovers_and_loose_files_next_to_the_wrapper_are_ignored(tmp_path: Path) -> None:
    # as unpacked from a macOS Finder zip of a folder with its licence beside it, after a
    # Windows user browsed the pictures
    raw = tmp_path / "raw"
    synthetic.image_folders(raw / "myset", per_class=6, test_per_class=0)
    (raw / "LICENSE.txt").write_text("CC-BY 4.0")
    (raw / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    for leftover in ("__MACOSX/myset/train/red/._0000.png", "__MACOSX/._myset"):
        (raw / leftover).parent.mkdir(parents=True, exist_ok=True)
        (raw / leftover).write_bytes(b"\0\5\26\7 AppleDouble")
    red = raw / "myset" / "train" / "red"
    (red / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0 thumbnails")
    (red / "desktop.ini").write_text("[.ShellClassInfo]\n")
    (red / "._0001.png").write_bytes(b"\0\5\26\7 AppleDouble")
    dataset = read_dataset(raw, 16)  # on_bad_image: fail
    assert dataset.class_names == ["blue", "green", "red"]
    assert np.bincount(dataset.train.labels).tolist() == [6, 6, 6]
    assert dataset.skipped == []


def test_a_lone_class_folder_is_one_class_not_a_wrapper(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    (raw / "chat noir").mkdir(parents=True)
    for i, image in enumerate(synthetic.class_images(0, 4, 16, seed=0)):
        Image.fromarray(image).save(raw / "chat noir" / f"{i}.png")
    with pytest.raises(PipelineError) as error:
        read_dataset(raw, 16)
    assert str(error.value) == f"{raw}: only one class (chat noir); need at least two"


def test_split_folders_in_any_case_and_a_shipped_validation_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = synthetic.image_folders(tmp_path / "kaggle", per_class=10, test_per_class=4)
    (root / "train").rename(root / "Train")
    (root / "test").rename(root / "Test")
    synthetic.image_folders(tmp_path / "valid", per_class=3, test_per_class=0, seed=7)
    (tmp_path / "valid" / "train").rename(root / "Valid")
    dataset = read_dataset(root, 16)
    assert dataset.class_names == ["blue", "green", "red"]
    assert dataset.test is not None and len(dataset.test.labels) == 12
    splits = prepare_splits(dataset, val_fraction=0.5, test_fraction=0.5, seed=0)
    # the dataset's own splits, whole; nothing carved from training
    assert {name: np.bincount(s.labels).tolist() for name, s in splits.items()} == {
        "train": [10, 10, 10],
        "val": [3, 3, 3],
        "test": [4, 4, 4],
    }
    assert np.array_equal(splits["val"].images, dataset.val.images)
    assert f"{root / 'Valid'}: used as the validation split" in capsys.readouterr().out
    # without train/, a folder called "valid" is a class like any other
    classes = synthetic.image_folders(
        tmp_path / "parts", per_class=4, test_per_class=0, classes=("valid", "invalid")
    )
    assert read_dataset(classes / "train", 16).class_names == ["invalid", "valid"]


def test_a_class_of_few_images_is_in_every_carved_split(tmp_path: Path) -> None:
    root = synthetic.image_folders(
        tmp_path / "ds", per_class=8, test_per_class=0, classes=("cat", "dog", "rare")
    )
    for path in sorted((root / "train" / "rare").iterdir())[3:]:
        path.unlink()  # 3 images: one for each split
    dataset = read_dataset(root, 16)
    splits = prepare_splits(dataset, val_fraction=0.2, test_fraction=0.2, seed=0)
    # a fifth of each class, rounded, would carve no "rare" image: its scores would be 0 and
    # pull the macro averages down though every test image was classified right
    for name, split in splits.items():
        assert np.bincount(split.labels, minlength=3).min() >= 1, name
    together = np.concatenate([s.images for s in splits.values()])
    assert len(np.unique(together.reshape(len(together), -1), axis=0)) == 19  # each once
    again = prepare_splits(dataset, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert np.array_equal(again["test"].images, splits["test"].images)


def test_folders_named_like_splits_are_classes_when_they_hold_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vehicles = synthetic.image_folders(
        tmp_path / "vehicles", per_class=4, test_per_class=0, classes=("bus", "car", "train")
    )
    shutil.copy(vehicles / "train" / "bus" / "0000.png", vehicles / "train" / "unsorted.png")
    assert read_dataset(vehicles / "train", 16).class_names == ["bus", "car", "train"]
    assert "1 image file(s) next to the class folders (unsorted.png, ...) are in no class: " in (
        capsys.readouterr().out
    )
    stages = synthetic.image_folders(
        tmp_path / "stages", per_class=4, test_per_class=0, classes=("prod", "test")
    )
    assert read_dataset(stages / "train", 16).class_names == ["prod", "test"]
    # a train/ of class folders is a split: a class folder beside it is neither here nor there
    mixed = synthetic.image_folders(tmp_path / "mixed", per_class=4, test_per_class=0)
    (mixed / "train" / "red").rename(mixed / "red")
    with pytest.raises(PipelineError) as error:
        read_dataset(mixed, 16)
    assert str(error.value).startswith(
        f"{mixed}: folders ['red'] are next to the split folders ['train']. A dataset is either "
        "one folder per class, or split folders"
    )


def test_a_test_split_without_a_class_names_the_class(tmp_path: Path) -> None:
    root = synthetic.image_folders(tmp_path / "ds", per_class=4, test_per_class=2)
    shutil.rmtree(root / "test" / "green")
    with pytest.raises(PipelineError) as error:
        read_dataset(root, 16)
    assert str(error.value).startswith(
        f"{root / 'test'}: class folders ['green'] are missing. Every split must have the same "
        "classes: make the change in your data.source folder or archive"
    )


def test_the_pixel_limit_counts_the_pixels_decoded(tmp_path: Path) -> None:
    root = synthetic.image_folders(tmp_path / "ds", per_class=4, test_per_class=0)
    photo = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(photo).save(root / "train" / "red" / "photo.jpg")
    # 120,000 pixels, over the limit, but a JPEG for 16-pixel images decodes at 1/8: 50 x 38
    dataset = read_dataset(root, 16, max_pixels=10_000)
    assert np.bincount(dataset.train.labels).tolist() == [4, 4, 5]
    Image.fromarray(photo).save(root / "train" / "red" / "scan.png")  # no reduced decoding
    with pytest.raises(PipelineError) as error:
        read_dataset(root, 16, max_pixels=10_000)
    assert (
        f"{root / 'train' / 'red' / 'scan.png'}: 400 x 300 = 120,000 pixels, over the limit "
        "of 10,000; shrink the image, or raise the limit (preprocess.max_pixels)"
    ) in str(error.value)


def test_too_few_images_name_the_class_and_what_it_needs(tmp_path: Path) -> None:
    root = synthetic.image_folders(tmp_path / "ds", per_class=6, test_per_class=2)
    for path in sorted((root / "train" / "green").iterdir())[1:]:
        path.unlink()
    with pytest.raises(PipelineError) as error:
        prepare_splits(read_dataset(root, 16), val_fraction=0.2, test_fraction=0.2, seed=0)
    assert str(error.value).startswith(
        "preprocess.val_fraction = 0.2: cannot carve a stratified validation split: class "
        "'green' has 1 image(s). Each class needs at least 2 images"
    )
    # without a test split of its own, one more image per class is needed
    (root / "test").rename(tmp_path / "test")
    (root / "train" / "green" / "copy.png").write_bytes((root / "train/red/0000.png").read_bytes())
    with pytest.raises(PipelineError) as error:
        prepare_splits(read_dataset(root, 16), val_fraction=0.2, test_fraction=0.2, seed=0)
    assert (
        "class 'green' has 2 image(s) (1 left after carving the test split). "
        "Each class needs at least 3 images"
    ) in str(error.value)


@pytest.mark.parametrize("suffix", [".png", ".tiff"])
def test_16_bit_grayscale_gives_the_pixels_of_its_8_bit_copy(tmp_path: Path, suffix: str) -> None:
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(gray).save(tmp_path / f"8-bit{suffix}")
    # 16-bit PNG (Pillow mode "I;16") and a 32-bit integer TIFF holding 16-bit levels ("I")
    wide = gray.astype(np.uint16) * 257 if suffix == ".png" else gray.astype(np.int32) * 257
    Image.fromarray(wide).save(tmp_path / f"16-bit{suffix}")
    eight = decode_image(tmp_path / f"8-bit{suffix}")
    sixteen = decode_image(tmp_path / f"16-bit{suffix}")
    assert sixteen.dtype == np.uint8 and sixteen.shape == (16, 16, 3)
    assert np.array_equal(sixteen, eight)
