"""Stage download: fetch `data.source` (URL, file:// URL or local path; archive or folder),
verify `data.checksum`, and extract it to data/raw."""

from imageclf import paths
from imageclf.download import fetch_dataset
from imageclf.errors import run_stage
from imageclf.params import load_params


def main() -> None:
    params = load_params()
    fetch_dataset(params.data.source, paths.RAW, params.data.checksum)


if __name__ == "__main__":
    run_stage(main)
