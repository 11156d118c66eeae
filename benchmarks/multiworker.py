"""Multi-worker training on this machine, side by side: one process with all threads against
tf.distribute's MultiWorkerMirroredStrategy with 2 worker processes (chief + worker on
127.0.0.1) of 1 thread each, the same global batch, the committed params' model. Prints the time
per training step (median over timed steps) and per CIFAR-10 epoch, the bytes each worker
all-reduces per step (the float32 gradients of every trainable weight), and numpy's GEMM rate
measured in the same run; then README's on-paper estimate for N machines: per-step compute /
N plus a ring all-reduce of those bytes.

    python benchmarks/multiworker.py        # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from benchmarks.throughput import numpy_gemm_gflops  # noqa: E402

CIFAR_TRAIN = 47_500  # training images of the committed split (50,000 minus 5% validation)


def worker(threads: int, steps: int, warmup: int) -> None:
    """One process of a configuration: train `warmup + steps` steps on random CIFAR-shaped
    batches, print the median step time (s) and the gradient bytes as JSON (chief only)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from imageclf.models import build_model
    from imageclf.params import load_params
    from imageclf.training import compile_model, configure_runtime, output_root

    params = load_params(PROJECT / "params.yaml")
    train = params.train.model_copy(
        update={
            "threads": threads,
            "distribute": "multi_worker" if "TF_CONFIG" in os.environ else "none",
        }
    )
    strategy = configure_runtime(train, params.seed)
    meta = {"image_size": 32, "class_names": [str(i) for i in range(10)]}
    meta |= {"mean": [127.0] * 3, "std": [64.0] * 3}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (train.batch_size, 32, 32, 3), dtype=np.uint8)
    labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, train.batch_size)]
    with strategy.scope():
        model = build_model(params.model, meta, images)
        compile_model(model, train, train.lr, total_steps=10_000, warmup_steps=100)
    times: list[float] = []

    class StepTimer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter() - self.start)

    batches = tf.data.Dataset.from_tensors((images, labels)).repeat()
    model.fit(batches, steps_per_epoch=warmup + steps, epochs=1, callbacks=[StepTimer()], verbose=0)
    if output_root(train) == Path("."):
        gradient_bytes = sum(int(np.prod(w.shape)) * 4 for w in model.trainable_weights)
        print(json.dumps({"step": statistics.median(times[warmup:]), "bytes": gradient_bytes}))


def run_configuration(workers: int, threads: int, steps: int, warmup: int) -> dict:
    command = [sys.executable, __file__, "--worker", f"--threads={threads}"]
    command += [f"--steps={steps}", f"--warmup={warmup}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    if workers == 1:
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    ports = []
    for _ in range(workers):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    processes = [
        subprocess.Popen(
            command,
            env={**env, "TF_CONFIG": json.dumps({"cluster": cluster, "task": task})},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for task in ({"type": "worker", "index": i} for i in range(workers))
    ]
    outputs = [process.communicate()[0] for process in processes]
    if any(process.returncode for process in processes):
        raise RuntimeError(f"a worker failed: {outputs}")
    return json.loads(outputs[0].strip().splitlines()[-1])  # worker 0 is the chief


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--gbit", type=float, default=10.0, help="network for the estimate")
    args = parser.parse_args()
    if args.worker:
        worker(args.threads, args.steps, args.warmup)
        return

    gemm, _ = numpy_gemm_gflops()
    cores = os.cpu_count() or 1
    single = run_configuration(1, cores, args.steps, args.warmup)
    multi = run_configuration(2, 1, args.steps, args.warmup)
    steps_per_epoch = CIFAR_TRAIN // 256
    print(f"numpy float32 GEMM: {gemm:.0f} GFLOP/s; {args.steps} timed steps of a global batch")
    print(f"{'configuration':<32}{'s/step':>8}{'s/epoch':>9}{'ratio':>7}")
    for name, result in (
        (f"1 process x {cores} threads", single),
        ("2 workers x 1 thread (MWMS)", multi),
    ):
        step, ratio = result["step"], result["step"] / single["step"]
        print(f"{name:<32}{step:>8.3f}{step * steps_per_epoch:>9.0f}{ratio:>7.2f}")
    megabytes = single["bytes"] / 1e6
    bandwidth = args.gbit * 1e9 / 8  # bytes/s
    print(f"all-reduced per step and worker: {megabytes:.1f} MB (float32 gradients)")
    print(
        f"\nOn paper, N machines like this one on {args.gbit:g} Gbit/s: "
        f"t(N) = {single['step']:.3f} s / N + 2 (N-1)/N x {megabytes:.1f} MB / "
        f"{bandwidth / 1e9:.2f} GB/s"
    )

    def all_reduce_seconds(n: int) -> float:
        return 2 * (n - 1) / n * single["bytes"] / bandwidth

    crossover = next(n for n in range(2, 10_000) if single["step"] / n <= all_reduce_seconds(n))
    print(f"communication takes longer than compute from N = {crossover}")
    print(f"{'N':>4}{'compute s':>11}{'all-reduce s':>14}{'step s':>8}{'speed-up':>10}")
    for n in (1, 2, 4, 8, 16, 32, 64):
        compute = single["step"] / n
        communicate = all_reduce_seconds(n)
        step = compute + communicate
        speedup = single["step"] / step
        print(f"{n:>4}{compute:>11.3f}{communicate:>14.3f}{step:>8.3f}{speedup:>10.1f}")


if __name__ == "__main__":
    main()
