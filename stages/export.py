"""Stage export: write models/finetuned.keras as a SavedModel in TF Serving's layout
(export/saved_model/1/), as a float32 TFLite file (export/model.tflite) and as a dynamic-range
int8 one (export/model_int8.tflite), then measure each format on the test split (size,
accuracy, agreement with the Keras model, latency per image at batch 1 and 64) into
metrics/export.json. A float format that classifies differently from the Keras model fails the
stage."""

from imageclf import paths
from imageclf.datasets import load_split
from imageclf.errors import run_stage
from imageclf.export import check_agreement, export_saved_model, export_tflite, measure
from imageclf.fileio import write_json
from imageclf.models import load_model
from imageclf.predict import load_classifier


def main() -> None:
    source = paths.FINETUNED
    model = load_model(source)
    formats = {
        "keras": source,
        "saved_model": export_saved_model(model, paths.SAVED_MODEL),
        "tflite": paths.TFLITE,
        "tflite_int8": paths.TFLITE_INT8,
    }
    export_tflite(model, formats["tflite"])
    export_tflite(model, formats["tflite_int8"], int8=True)

    test = load_split(paths.PREPARED, "test")
    keras_classifier = load_classifier(source)
    reference = keras_classifier.predict(test.images).argmax(axis=1)
    figures = {}
    for name, path in formats.items():
        classifier = keras_classifier if name == "keras" else load_classifier(path)
        figures[name] = measure(classifier, test.images, test.labels, reference, path)
        print(name, figures[name])
        if name != "tflite_int8":  # quantized: its agreement is measured, not required
            check_agreement(name, figures[name])
    write_json(paths.EXPORT_METRICS, figures)


if __name__ == "__main__":
    run_stage(main)
