"""FedAvg over many client updates against the time just to read those files; peak memory of each.

Usage: python bench/fedavg_stream.py [--updates 100] [--architecture mobilenet_v3_small] [--dir /tmp/bench-updates]
Goal: FedAvg time / read time <= 1.2; peak memory <= 3 models (the current model, which the
aggregator holds anyway, plus what aggregation allocates) whatever the number of clients.
Both passes run with the files in the page cache (a warm-up read comes first), so the ratio
compares the aggregation's work with reading, checksumming and parsing alone (`read_weights`,
the same call FedAvg reads with).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedtrain.worker.models import ModelConfig, build_model
from fedtrain.worker.storage import DirectoryStore
from fedtrain.worker.strategies import UpdateFile, UpdateSet, make_strategy
from fedtrain.worker.training import state_to_numpy
from fedtrain.worker.weights import read_weights, save_weights


def write_updates(folder: Path, current: dict[str, np.ndarray], count: int) -> list[UpdateFile]:
    rng = np.random.default_rng(0)
    files = []
    store = DirectoryStore(folder)
    for i in range(count):
        update = {k: (v + rng.normal(0, 1e-3, v.shape).astype(v.dtype)) if v.dtype.kind == "f" else v
                  for k, v in current.items()}
        key = f"client-{i:03d}.safetensors"
        save_weights(store, key, update, {"num_examples": int(rng.integers(50, 500))})
        files.append(UpdateFile(key.removesuffix(".safetensors"), store, key))
    return files


def seconds_of(actions: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall time of each action, run in alternation so that machine drift hits all alike.

    Untraced: tracemalloc slows allocation-heavy code unevenly.
    """
    times: list[list[float]] = [[] for _ in actions]
    for _ in range(repeats):
        for action, spent in zip(actions, times, strict=True):
            started = time.perf_counter()
            action()
            spent.append(time.perf_counter() - started)
    return [float(np.median(spent)) for spent in times]


def peak_mib_of(action: Callable[[], object]) -> float:
    """Peak traced allocation (numpy buffers included) during one separate run."""
    tracemalloc.start()
    action()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--architecture", default="mobilenet_v3_small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/fedtrain-bench-updates"))
    args = parser.parse_args()
    current = state_to_numpy(build_model(ModelConfig(args.architecture, 43, 64)))
    model_mib = sum(v.nbytes for v in current.values()) / 2**20
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    files = write_updates(args.dir, current, args.updates)

    def read_all() -> None:
        for f in files:
            read_weights(f.store, f.key)

    def fedavg(count: int = args.updates) -> None:
        updates = UpdateSet(current, files[:count], max_norm_ratio=10.0)
        make_strategy("fedavg").aggregate(current, updates, {})
        assert len(updates.accepted) == count, updates.rejected

    read_all()  # warm the page cache
    read_s, agg_s = seconds_of([read_all, fedavg], args.repeats)
    read_peak, agg_peak = peak_mib_of(read_all), peak_mib_of(fedavg)
    tenth = max(1, args.updates // 10)
    tenth_peak = peak_mib_of(lambda: fedavg(tenth))
    print(f"{args.updates} updates of {args.architecture} ({model_mib:.1f} MiB each, float32)")
    print(f"median of {args.repeats} runs each, files in the page cache")
    print(f"read only:       {read_s:7.2f} s   peak traced memory {read_peak:7.1f} MiB")
    print(f"fedavg (stream): {agg_s:7.2f} s   peak traced memory {agg_peak:7.1f} MiB "
          f"({agg_peak / model_mib:.2f}× one model; with the current model {1 + agg_peak / model_mib:.2f}×, "
          "goal <= 3)")
    print(f"fedavg over {tenth} updates: peak traced memory {tenth_peak:7.1f} MiB (memory does not grow with clients)")
    print(f"ratio fedavg/read: {agg_s / read_s:.2f} (goal <= 1.2)")
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (above the cores: machine busy)")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
