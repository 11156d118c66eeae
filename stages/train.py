"""Stage train: build `model.arch`, train it on the augmented copies with the `train` params
while monitoring the validation split, and save models/model.keras, metrics/train.json and the
per-epoch curves (logged with DVCLive, plots/train.tsv)."""

from pathlib import Path

from imageclf.augment import copy_paths
from imageclf.datasets import load_meta, load_split
from imageclf.errors import run_stage
from imageclf.fileio import atomic_path, write_json
from imageclf.models import build_model
from imageclf.params import load_params
from imageclf.training import compile_model, configure_runtime, fit, steps_per_epoch


def main() -> None:
    params = load_params()
    strategy = configure_runtime(params.train, params.seed)
    prepared = Path("data/prepared")
    meta = load_meta(prepared)
    train, val = load_split(prepared, "train"), load_split(prepared, "val")
    copies = copy_paths(Path("data/augmented"))

    steps = steps_per_epoch(len(train.labels), params.train.batch_size)
    with strategy.scope():
        model = build_model(params.model, meta, train.images)
        if not model.get_layer("backbone").trainable:
            print(f"Backbone from {params.model.weights}, frozen: training the head only")
        compile_model(
            model,
            params.train,
            params.train.lr,
            total_steps=steps * params.train.epochs,
            warmup_steps=round(params.train.warmup_epochs * steps),
        )
    logs, seconds = fit(
        model,
        copies,
        train,
        val,
        params=params.train,
        epochs=params.train.epochs,
        seed=params.seed,
        work_dir=Path("checkpoints/train"),
        curves_path=Path("plots/train.tsv"),
    )
    with atomic_path("models/model.keras") as tmp:
        model.save(tmp)
    write_json("metrics/train.json", {**logs, "seconds": round(seconds, 1)})


if __name__ == "__main__":
    run_stage(main)
