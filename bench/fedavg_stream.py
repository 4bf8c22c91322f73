"""FedAvg over many client updates against the time just to read those files; peak memory of each.

Usage: python bench/fedavg_stream.py [--updates 100] [--architecture mobilenet_v3_small] [--dir /tmp/bench-updates]
Goal: FedAvg time / read time <= 1.2; peak memory <= 3 models (the current model, which the
aggregator holds anyway, plus what aggregation allocates) whatever the number of clients.
Both passes run with the files in the page cache (a warm-up read comes first), so the ratio
compares the aggregation's work with reading, checksumming and parsing alone (`read_weights`:
the same reading, hash and parse FedAvg does, one after the other). The current model is read
from its file, as the aggregator reads the round's global model. Times are printed as wall, CPU
(all threads) and, for FedAvg, its main thread's CPU: FedAvg hashes each file on a second thread
while it adds the file, so on a machine with a free core its wall time is about the main thread's.
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

from fedtrain.contract.storage import DirectoryStore
from fedtrain.worker.models import ModelConfig, build_model
from fedtrain.worker.strategies import UpdateFile, UpdateSet, make_strategy
from fedtrain.worker.training import state_to_numpy
from fedtrain.worker.weights import Weights, read_weights, save_weights


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


def read_current(folder: Path, architecture: str) -> Weights:
    """The round's current model as the aggregator has it: read from its file (`Workspace.load_global`)."""
    store = DirectoryStore(folder)
    save_weights(store, "global.safetensors", state_to_numpy(build_model(ModelConfig(architecture, 43, 64))), {})
    return read_weights(store, "global.safetensors")[0]


def seconds_of(actions: list[Callable[[], object]], repeats: int) -> list[tuple[float, float, float]]:
    """Median wall, CPU and main-thread CPU seconds of each action, run in alternation so that machine drift
    hits all alike.

    CPU seconds (this process's, all threads) beside wall seconds show how much of the wall time the
    machine's other work took; the main thread's CPU is the wall time the action would take with a free
    core for its other threads (FedAvg hashes each file on a second thread). Untraced: tracemalloc slows
    allocation-heavy code unevenly.
    """
    times: list[list[tuple[float, float, float]]] = [[] for _ in actions]
    for _ in range(repeats):
        for action, spent in zip(actions, times, strict=True):
            wall, cpu, main = time.perf_counter(), time.process_time(), time.thread_time()
            action()
            spent.append((time.perf_counter() - wall, time.process_time() - cpu, time.thread_time() - main))
    return [(float(np.median([w for w, _, _ in spent])), float(np.median([c for _, c, _ in spent])),
             float(np.median([m for _, _, m in spent]))) for spent in times]


def load() -> str:
    """The load average, to print beside every figure (above the core count: the machine is busy)."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


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
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    current = read_current(args.dir, args.architecture)
    model_mib = sum(v.nbytes for v in current.values()) / 2**20
    files = write_updates(args.dir, current, args.updates)

    def read_all() -> None:
        for f in files:
            read_weights(f.store, f.key)

    def fedavg(count: int = args.updates) -> None:
        updates = UpdateSet(current, files[:count], max_norm_ratio=10.0)
        make_strategy("fedavg").aggregate(current, updates, {})
        assert len(updates.accepted) == count, updates.rejected

    read_all()  # warm the page cache
    print(f"before: {load()}")
    (read_s, read_cpu, _), (agg_s, agg_cpu, agg_main) = seconds_of([read_all, fedavg], args.repeats)
    read_peak, agg_peak = peak_mib_of(read_all), peak_mib_of(fedavg)
    tenth = max(1, args.updates // 10)
    tenth_peak = peak_mib_of(lambda: fedavg(tenth))
    print(f"{args.updates} updates of {args.architecture} ({model_mib:.1f} MiB each, float32)")
    print(f"median of {args.repeats} runs each, files in the page cache")
    print(f"read only:       {read_s:7.2f} s (CPU {read_cpu:5.2f} s)   peak traced memory {read_peak:7.1f} MiB")
    print(f"fedavg (stream): {agg_s:7.2f} s (CPU {agg_cpu:5.2f} s, main thread {agg_main:5.2f} s)   "
          f"peak traced memory {agg_peak:7.1f} MiB "
          f"({agg_peak / model_mib:.2f}× one model; with the current model {1 + agg_peak / model_mib:.2f}×, "
          "goal <= 3)")
    print(f"fedavg over {tenth} updates: peak traced memory {tenth_peak:7.1f} MiB (memory does not grow with clients)")
    print(f"ratio fedavg/read: {agg_s / read_s:.2f} wall, {agg_cpu / read_cpu:.2f} CPU, "
          f"{agg_main / read_cpu:.2f} main-thread CPU / read CPU (goal <= 1.2)")
    print(f"after: {load()}")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
