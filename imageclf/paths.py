"""Where the stages read and write, named once for the package (dvc.yaml declares the same
paths as each stage's deps and outs)."""

from pathlib import Path

RAW = Path("data/raw")
PREPARED = Path("data/prepared")
AUGMENTED = Path("data/augmented")
MODEL = Path("models/model.keras")  # the train stage's model
FINETUNED = Path("models/finetuned.keras")  # the finetune stage's: the one to use
CHECKPOINTS = Path("checkpoints")  # per training stage, while it runs; removed when it ends
METRICS = Path("metrics")
PLOTS = Path("plots")
EVAL_METRICS = METRICS / "eval.json"
EXPORT = Path("export")  # the export stage's formats of the finetuned model
SAVED_MODEL = EXPORT / "saved_model"  # TF Serving's layout: a numbered version folder inside
TFLITE = EXPORT / "model.tflite"
TFLITE_INT8 = EXPORT / "model_int8.tflite"
EXPORT_METRICS = METRICS / "export.json"
