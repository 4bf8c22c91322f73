"""Per-round orchestration overhead of the local runner, with and without the fork server.

Usage: python bench/local_overhead.py [--rounds 4] [--clients 4]
Overhead of a round = its wall time (first client task launched -> aggregation recorded) minus the
slowest client's task time (whole worker process: load data, train, save) minus the aggregation
task's time. Process start-up and torch imports are inside the task times for fresh processes
(the baseline), and avoided by the fork server. Both run the same spec in the same run.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from fedtrain.local.runner import RunOptions, run_training
from fedtrain.spec import parse_manifest


def manifest(rounds: int, clients: int) -> dict:
    return {"apiVersion": "fedtrain.io/v1alpha1", "kind": "FederatedTraining", "metadata": {"name": "overhead"},
            "spec": {"rounds": rounds, "model": {"architecture": "tiny_cnn", "imageSize": 32},
                     "dataset": {"synthetic": {"imagesPerClass": 10, "testImagesPerClass": 4}},
                     "clients": {"count": clients}, "training": {"localEpochs": 1},
                     "worker": {"parallelism": 2, "device": "cpu"}}}


def measure(rounds: int, clients: int, fork_server: bool, data: Path) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="fedtrain-overhead-"))
    spec = manifest(rounds, clients)
    spec["spec"]["dataset"] = {"path": str(data)}
    result = run_training(parse_manifest(spec), RunOptions(workdir, "sqlite:///" + str(workdir / "m.db"),
                                                           fork_server=fork_server))
    assert result.status.phase == "Succeeded", result.status.message
    walls, overheads, tasks = [], [], []
    for number, wall in sorted(result.round_walls.items()):
        clients_time = max(v for k, v in result.durations.items() if k.startswith(f"r{number:04d}-client"))
        aggregate = next(v for k, v in result.durations.items() if k.startswith(f"r{number:04d}-aggregate"))
        walls.append(wall)
        overheads.append(wall - clients_time - aggregate)
        tasks.append(clients_time)
    shutil.rmtree(workdir)
    return {"round": statistics.median(walls), "overhead": statistics.median(overheads),
            "slowest_client_task": statistics.median(tasks)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=2, help="= parallelism, so that clients run in one wave")
    args = parser.parse_args()
    from fedtrain.worker.data.synth import SynthConfig, generate

    data = Path(tempfile.mkdtemp(prefix="fedtrain-overhead-data-"))
    generate(data, SynthConfig(10, 4, seed=0))
    print(f"{args.rounds} rounds, {args.clients} clients (parallelism 2: one wave), tiny_cnn 32px, median per round")
    figures = {}
    for fork_server in (False, True):
        figures[fork_server] = measure(args.rounds, args.clients, fork_server, data)
        name = "fork server   " if fork_server else "fresh process "
        f = figures[fork_server]
        print(f"{name}: round {f['round']:6.2f} s, slowest client task {f['slowest_client_task']:5.2f} s, "
              f"orchestration overhead {f['overhead']:5.2f} s ({f['overhead'] / f['round']:.0%} of the round)")
    print(f"ratio round time fork-server/fresh-process: {figures[True]['round'] / figures[False]['round']:.2f}")
    shutil.rmtree(data)


if __name__ == "__main__":
    main()
