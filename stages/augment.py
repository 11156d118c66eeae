"""Stage augment: write `augment.copies` seeded augmented copies of the training split
(translation, flip, optional cutout) to data/augmented, and a preview grid to plots/."""

import numpy as np

from imageclf import paths
from imageclf.augment import write_copies
from imageclf.datasets import load_meta, load_split
from imageclf.errors import run_stage
from imageclf.params import load_params
from imageclf.plots import image_grid

PREVIEW_IMAGES = 6


def main() -> None:
    params = load_params()
    aug = params.augment
    train = load_split(paths.PREPARED, "train")
    class_names = load_meta(paths.PREPARED)["class_names"]
    copy_files = write_copies(
        paths.AUGMENTED,
        train.images,
        aug.copies,
        params.seed,
        aug.translate,
        aug.flip,
        aug.cutout,
    )

    # preview: each row one training image, original first, then its first augmented copies
    shown = min(aug.copies, 7)
    copies = [np.load(path, mmap_mode="r") for path in copy_files[:shown]]
    picks = np.random.default_rng(params.seed).choice(
        len(train.labels), PREVIEW_IMAGES, replace=False
    )
    images, captions = [], []
    for index in picks:
        name = class_names[train.labels[index]]
        images.append(train.images[index])
        captions.append(f"{name}: original")
        images.extend(copy[index] for copy in copies)
        captions.extend(f"copy {copy}" for copy in range(shown))
    image_grid(
        np.stack(images),
        captions,
        paths.PLOTS / "augment_samples.png",
        "Augmented training images (seeded; one copy per epoch)",
        columns=shown + 1,
    )


if __name__ == "__main__":
    run_stage(main)
