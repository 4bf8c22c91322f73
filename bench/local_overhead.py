"""Per-round orchestration overhead of the local runner, with and without the fork server.

Usage: python bench/local_overhead.py [--rounds 4] [--clients 4]
Overhead of a round = its wall time (first client task launched -> aggregation recorded) minus the
slowest client's training time (its training loop, from the update's sidecar) minus the
aggregation's compute (strategy and evaluation, from result.json). What remains is orchestration:
process start-up and imports, reading data and weights, scheduling. Fresh processes (the baseline)
and the fork server run the same spec in the same run.
"""

from __future__ import annotations

import argparse
import json
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
    walls, overheads, trainings = [], [], []
    for number, wall in sorted(result.round_walls.items()):
        round_dir = workdir / f"round-{number:04d}"
        training = max(json.loads(p.read_text())["metrics"]["train_seconds"]
                       for p in (round_dir / "clients").glob("*.json"))
        aggregation = json.loads((round_dir / "result.json").read_text())["seconds"]
        walls.append(wall)
        overheads.append(wall - training - aggregation)
        trainings.append(training)
    shutil.rmtree(workdir)
    return {"round": statistics.median(walls), "overhead": statistics.median(overheads),
            "slowest_training": statistics.median(trainings)}


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
        print(f"{name}: round {f['round']:6.2f} s, slowest client training {f['slowest_training']:5.2f} s, "
              f"orchestration overhead {f['overhead']:5.2f} s ({f['overhead'] / f['round']:.0%} of the round)")
    print(f"ratio round time fork-server/fresh-process: {figures[True]['round'] / figures[False]['round']:.2f}")
    print(f"ratio overhead fork-server/fresh-process: {figures[True]['overhead'] / figures[False]['overhead']:.2f}")
    shutil.rmtree(data)


if __name__ == "__main__":
    main()
