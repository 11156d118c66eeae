"""Stage check_params: validate the whole of params.yaml. It depends on every param, so any
edit runs it: a misspelled key or section that no other stage reads fails `dvc repro` here,
instead of passing as "up to date" (each stage also validates the whole file when it runs)."""

from imageclf.errors import run_stage
from imageclf.params import load_params


def main() -> None:
    load_params()


if __name__ == "__main__":
    run_stage(main)
