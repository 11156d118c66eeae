"""Stage preprocess: decode data/raw into uint8 arrays at `data.image_size`, carve the seeded,
stratified validation split (and a test split when the dataset has none), and store the splits
with the training split's per-channel statistics in data/prepared."""

from imageclf import paths
from imageclf.datasets import prepare_splits, read_dataset, save_prepared
from imageclf.errors import run_stage
from imageclf.params import load_params


def main() -> None:
    params = load_params()
    dataset = read_dataset(
        paths.RAW,
        params.data.image_size,
        params.preprocess.on_bad_image,
        params.preprocess.max_pixels,
    )
    splits = prepare_splits(
        dataset, params.preprocess.val_fraction, params.preprocess.test_fraction, params.seed
    )
    meta = save_prepared(paths.PREPARED, splits, dataset.class_names, dataset.skipped)
    for name, counts in meta["counts"].items():
        print(f"{name}: {sum(counts.values())} images, per class: {counts}")
    if dataset.skipped:
        print(
            f"skipped {len(dataset.skipped)} unreadable files (listed in data/prepared/meta.json)"
        )


if __name__ == "__main__":
    run_stage(main)
