"""Reproducible CNN image classification: the library behind the DVC stages in `stages/`."""
