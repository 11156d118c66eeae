"""Stage finetune: load models/model.keras, unfreeze the top of its backbone if it was
pretrained (and frozen by the train stage), and continue training at the lower `finetune.lr`
(cosine decay to zero); save models/finetuned.keras, metrics/finetune.json and the curves
(plots/finetune.tsv, numbered after the train stage's epochs)."""

from pathlib import Path

from imageclf.augment import copy_paths
from imageclf.datasets import load_split
from imageclf.errors import run_stage
from imageclf.fileio import atomic_path, write_json
from imageclf.models import load_model, unfreeze_top
from imageclf.params import load_params
from imageclf.training import compile_model, configure_runtime, fit, steps_per_epoch


def main() -> None:
    params = load_params()
    strategy = configure_runtime(params.train, params.seed)
    prepared = Path("data/prepared")
    train, val = load_split(prepared, "train"), load_split(prepared, "val")
    copies = copy_paths(Path("data/augmented"))

    steps = steps_per_epoch(len(train.labels), params.train.batch_size)
    with strategy.scope():
        model = load_model("models/model.keras")
        unfrozen = unfreeze_top(model, params.finetune.unfreeze)
        if unfrozen is not None:
            print(f"Pretrained backbone: fine-tuning its top {unfrozen} layers with weights")
        compile_model(
            model,
            params.train,
            params.finetune.lr,
            total_steps=steps * params.finetune.epochs,
            warmup_steps=0,
        )
    logs, seconds = fit(
        model,
        copies,
        train,
        val,
        params=params.train,
        epochs=params.finetune.epochs,
        seed=params.seed,
        work_dir=Path("checkpoints/finetune"),
        curves_path=Path("plots/finetune.tsv"),
        first_step=params.train.epochs,
    )
    with atomic_path("models/finetuned.keras") as tmp:
        model.save(tmp)
    write_json("metrics/finetune.json", {**logs, "seconds": round(seconds, 1)})


if __name__ == "__main__":
    run_stage(main)
