"""Stage train: build `model.arch`, train it on the augmented copies with the `train` params
while monitoring the validation split, and save models/model.keras, metrics/train.json and the
per-epoch curves (logged with DVCLive, plots/train.tsv)."""

import keras
import numpy as np

from imageclf import paths
from imageclf.errors import run_stage
from imageclf.models import build_model
from imageclf.params import load_params
from imageclf.training import run_training_stage


def main() -> None:
    params = load_params()

    def make_model(meta: dict, train_images: np.ndarray) -> keras.Model:
        model = build_model(params.model, meta, train_images)
        if not model.get_layer("backbone").trainable:
            print(f"Backbone from {params.model.weights}, frozen: training the head only")
        return model

    run_training_stage(
        "train",
        params,
        make_model,
        peak_lr=params.train.lr,
        epochs=params.train.epochs,
        warmup_epochs=params.train.warmup_epochs,
        first_step=0,
        model_path=paths.MODEL,
    )


if __name__ == "__main__":
    run_stage(main)
