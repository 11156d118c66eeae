"""A grid of 4 small experiments through DVC's queue: one worker (`-j 1`) against two (`-j 2`),
each with TensorFlow's threads left to `train.threads=auto` (all cores, in every worker) and
with `train.threads=1`, side by side on this machine.

Each run takes a fresh copy of one small repository whose pipeline has run once and been
committed, queues the same 2x2 grid (`-S train.lr=... -S augment.copies=...`, every experiment
reruns augment, train, finetune, evaluate and export) and times the queue until all 4 have
finished. Configurations take turns within each repeat, so that other load on the machine
spreads over all of them; prints the median wall time per configuration, the speed-ups against
`-j 1` with all cores, the share of the machine's CPU time left idle meanwhile, and numpy's
float32 GEMM rate before and after: gauges of other load on the machine.

    python benchmarks/experiment_queue.py               # about 35 minutes on 2 quiet cores
    python benchmarks/experiment_queue.py --repeats 1   # about 12
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from benchmarks.throughput import numpy_gemm_gflops  # noqa: E402
from tests import synthetic  # noqa: E402
from tests.repos import commit_all, copy_repo, make_repo, run, set_params  # noqa: E402

# Small enough for minutes, large enough that training is a good part of each run (next to
# starting Python and TensorFlow in each stage, and DVC's own work per experiment).
IMAGES_PER_CLASS = 200
WORKLOAD = {
    "data.image_size": 32,
    "model.widths": [32, 64, 64],
    "train.epochs": 20,
    "train.batch_size": 32,
}
# both values of both params differ from the committed ones: every experiment runs from augment
GRID = ("train.lr=0.5,0.8", "augment.copies=1,3")
CONFIGS = ((1, "auto"), (1, "1"), (2, "auto"), (2, "1"))  # (workers, train.threads)


def base_repository(root: Path) -> Path:
    """The small repository, its pipeline run and committed once."""
    synthetic.image_folders(root / "shapes", per_class=IMAGES_PER_CLASS, test_per_class=20, size=32)
    repo = make_repo(root, "../shapes", None)
    set_params(repo, **WORKLOAD)
    run(repo, "dvc", "repro")
    commit_all(repo, "first run")
    return repo


def cpu_ticks() -> tuple[int, int]:
    """Idle and total CPU time of the whole machine so far, all cores (Linux: /proc/stat)."""
    ticks = [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return ticks[3] + ticks[4], sum(ticks)  # idle + iowait; user ... steal


def time_grid(base: Path, root: Path, jobs: int, threads: str) -> tuple[float, float]:
    """Seconds from starting `jobs` queue workers until all 4 experiments of the grid are done,
    and the share of the machine's CPU time that stayed idle meanwhile."""
    repo = copy_repo(base, root)  # a fresh copy: no experiment of an earlier run to reuse
    grid = [arg for override in GRID for arg in ("-S", override)]
    run(repo, "dvc", "exp", "run", "--queue", *grid, "-S", f"train.threads={threads}")
    idle_before, total_before = cpu_ticks()
    start = time.perf_counter()
    # as `dvc queue start -j N`, then waiting: starts the workers and follows each experiment
    run(repo, "dvc", "exp", "run", "--run-all", "-j", str(jobs))
    seconds = time.perf_counter() - start
    idle_after, total_after = cpu_ticks()
    if len(run(repo, "dvc", "exp", "list", "--name-only").stdout.split()) != 4:
        status = run(repo, "dvc", "queue", "status").stdout
        raise SystemExit(f"-j {jobs}, train.threads={threads}: not all 4 experiments ran\n{status}")
    remove_tree(root)
    return seconds, (idle_after - idle_before) / (total_after - total_before)


def remove_tree(root: Path, seconds: float = 30.0) -> None:
    """`shutil.rmtree`, retried while DVC's queue workers, which outlive `dvc exp run` by a
    moment, still write to the repository's .dvc/tmp."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            shutil.rmtree(root)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration")
    args = parser.parse_args()

    gemm_before, blas = numpy_gemm_gflops()
    load_before = os.getloadavg()[0]
    times: dict[tuple[int, str], list[float]] = {config: [] for config in CONFIGS}
    idle: dict[tuple[int, str], list[float]] = {config: [] for config in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="queue-bench-") as tmp:
        base = base_repository(Path(tmp) / "base")
        for repeat in range(args.repeats):
            # a different order each repeat, so that no configuration always runs first
            order = CONFIGS[repeat % len(CONFIGS) :] + CONFIGS[: repeat % len(CONFIGS)]
            for jobs, threads in order:
                root = Path(tmp) / f"run-{repeat}-{jobs}-{threads}"
                seconds, idle_share = time_grid(base, root, jobs, threads)
                times[jobs, threads].append(seconds)
                idle[jobs, threads].append(idle_share)
                print(
                    f"repeat {repeat + 1}: -j {jobs}, threads {threads}: {seconds:.1f} s, "
                    f"{idle_share:.0%} of the CPU time idle",
                    flush=True,
                )
    gemm_after, _ = numpy_gemm_gflops()
    load_after = os.getloadavg()[0]

    widths, epochs = WORKLOAD["model.widths"], WORKLOAD["train.epochs"]
    print(
        f"\n4 experiments ({' x '.join(GRID)}), each: {3 * IMAGES_PER_CLASS} training images "
        f"of 32x32 (a fifth held out for validation), fastnet {widths}, {epochs} + 1 epochs; "
        f"{os.cpu_count()} cores, {args.repeats} repeat(s)"
    )
    print(
        f"numpy float32 GEMM: {gemm_before:.0f} GFLOP/s before, {gemm_after:.0f} after ({blas}); "
        f"load average {load_before:.1f} before, {load_after:.1f} after\n"
    )
    reference = statistics.median(times[1, "auto"])
    print(
        "| workers | train.threads | wall time, median | runs | speed-up vs -j 1, auto "
        "| CPU idle meanwhile |"
    )
    print("|---|---|---:|---|---:|---:|")
    for (jobs, threads), runs in times.items():
        median = statistics.median(runs)
        listed = ", ".join(f"{s:.0f}" for s in runs)
        print(
            f"| `-j {jobs}` | {threads} | {median:.0f} s | {listed} | {reference / median:.2f}x "
            f"| {statistics.median(idle[jobs, threads]):.0%} |"
        )
    print(f"\nreproduce: python benchmarks/experiment_queue.py --repeats {args.repeats}")


if __name__ == "__main__":
    main()
