"""Stage finetune: load models/model.keras, unfreeze the top of its backbone if it was
pretrained (and frozen by the train stage), and continue training at the lower `finetune.lr`
(cosine decay to zero); save models/finetuned.keras, metrics/finetune.json and the curves
(plots/finetune.tsv, numbered after the train stage's epochs). With finetune.epochs: 0 the
train stage's model passes through unchanged."""

import keras
import numpy as np

from imageclf import paths
from imageclf.errors import run_stage
from imageclf.models import load_model, unfreeze_top, with_precision
from imageclf.params import load_params
from imageclf.training import output_root, pass_model_through, run_training_stage


def main() -> None:
    params = load_params()
    if params.finetune.epochs == 0:
        pass_model_through("finetune", params.train, paths.MODEL, paths.FINETUNED)
        return

    def make_model(meta: dict, train_images: np.ndarray) -> keras.Model:
        # another worker of a multi-worker run has the train stage's model in its own folder
        # saved as float32: back to the policy this run trains in (train.precision)
        model = with_precision(
            load_model(output_root(params.train) / paths.MODEL), keras.config.dtype_policy().name
        )
        unfrozen = unfreeze_top(model, params.finetune.unfreeze)
        if unfrozen is not None:
            print(f"Pretrained backbone: fine-tuning its top {unfrozen} layers with weights")
        return model

    run_training_stage(
        "finetune",
        params,
        make_model,
        peak_lr=params.finetune.lr,
        epochs=params.finetune.epochs,
        warmup_epochs=0,
        first_step=params.train.epochs,
        model_path=paths.FINETUNED,
    )


if __name__ == "__main__":
    run_stage(main)
