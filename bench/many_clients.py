"""A training with 1,000 clients: the engine's decision time per pass and the size of the status.

The engine decides a 1,000-client training (perRound 100, then 1,000) to the end, every task
answered at once (one client in seven failing, a third of the rest rejected: the status must carry
failures too); the aggregation's output goes through the worker's 4 KiB termination message, as on
Kubernetes. Printed: decision time per pass (median, p99, max; wall and this process's CPU time,
which a busy machine does not inflate) and the largest status seen, against two baselines measured
in the same run: a 10-client training (decision time) and the same training with every round's
per-client records kept (status size, the design before rounds were compacted).

With ``--local``, also `fedtrain run` of a 1,000-client, 2-round federation, perRound 100 and then
1,000 (tiny CNN, 16 px, one image track per client or so: this measures orchestration): wall time
per round and the size of status.json.

With ``--cluster``, also the operator (kopf, as deployed) running a 1,000-client, 2-round training
on the test cluster of tests/operator, perRound 100 and then 1,000, with Jobs that end at once (one
client in seven failing with a message; no worker runs: this measures the operator): wall time per
round, the engine's decision time inside the operator (CPU time of its thread), the largest status
it wrote, its CPU and peak memory, and its requests per round.

    python bench/many_clients.py [--local] [--cluster]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: the repo's operator/ must not shadow stdlib

from fedtrain.engine import (
    Observation,
    TrainingStatus,
    decide,
    engine,
)
from fedtrain.engine.status import Launch
from fedtrain.spec import parse_spec

ROUNDS = 10


def simulate(clients: int, per_round: int) -> tuple[list[float], list[float], int]:
    """Decision seconds per pass (wall, and CPU: on a shared machine the wall clock counts the others' work
    too), and the largest status (bytes of JSON)."""
    names = [f"city-{i:04d}-road-operator" for i in range(clients)]
    failing = set(names[::7])
    spec = parse_spec({"rounds": ROUNDS, "clients": {"list": [{"name": n} for n in names], "perRound": per_round,
                                                      "minSuccessful": max(1, per_round // 2), "maxRetries": 0}})
    status, observations, now = TrainingStatus(), dict[str, Observation](), 0.0
    times: list[float] = []
    cpu: list[float] = []
    largest = 0
    while status.phase not in ("Succeeded", "Failed"):
        now += 1
        started, started_cpu = time.perf_counter(), time.process_time()
        decision = decide(spec, status, observations, now)
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
        for action in decision.actions:
            if isinstance(action, Launch):
                observations[action.task.id] = answer(action.task, decision.status, failing)
        status = decision.status
        largest = max(largest, len(json.dumps(status.to_json())))
    assert status.phase == "Succeeded", status.message
    return times, cpu, largest


def answer(task: Any, status: TrainingStatus, failing: set[str]) -> Observation:
    from fedtrain.worker.jobs import termination_message  # torch comes with it: never in the operator's process

    if task.kind == "aggregate":
        trained = [c for c in status.rounds[-1].selected if c not in failing]
        rejected = trained[:len(trained) // 3]
        result = {"round": task.round, "accuracy": 0.5, "loss": 1.0, "accepted": trained[len(rejected):],
                  "rejected": {c: "update norm is over 10x the round's median" for c in rejected}}
        return Observation("succeeded", 0, json.loads(termination_message(result)))
    if task.client in failing:
        return Observation("failed", 1, None, "Traceback (most recent call last): RuntimeError: CUDA out of memory")
    return Observation("succeeded", 0)


def summary(times: list[float]) -> str:
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return (f"{len(times)} passes, median {statistics.median(times) * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms, "
            f"max {max(times) * 1e3:.2f} ms")


def local_run(per_round: int) -> None:
    """`fedtrain run` with 1,000 clients, ``per_round`` per round: seconds per round and the size of status.json."""
    with tempfile.TemporaryDirectory() as folder:
        manifest = {"apiVersion": "fedtrain.io/v1alpha1", "kind": "FederatedTraining",
                    "metadata": {"name": "thousand"},
                    "spec": {"rounds": 2, "model": {"architecture": "tiny_cnn", "numClasses": 43, "imageSize": 16},
                             "dataset": {"synthetic": {"imagesPerClass": 30, "testImagesPerClass": 2,
                                                       "framesPerTrack": 1, "seed": 3}},  # 1,290 tracks
                             "clients": {"count": 1000, "perRound": per_round, "minSuccessful": per_round // 2},
                             "training": {"localEpochs": 1, "batchSize": 32},
                             "worker": {"parallelism": 2, "device": "cpu"}, "mlflow": {"logClients": False}}}
        path = Path(folder) / "thousand.yaml"
        path.write_text(yaml.safe_dump(manifest))
        started = time.monotonic()
        done = subprocess.run(["fedtrain", "run", str(path), "--workdir", f"{folder}/w"], capture_output=True,
                              text=True)
        wall = time.monotonic() - started
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-2000:])
            return
        status = json.loads((Path(folder) / "w" / "status.json").read_text())
        seconds = [r["finishedAt"] - r["startedAt"] for r in status["rounds"]]
        print(f"fedtrain run, 1000 clients, {per_round} per round, 2 rounds: {wall:.0f} s in all, rounds "
              f"{', '.join(f'{s:.0f} s' for s in seconds)}, status.json {len(json.dumps(status)) / 1024:.1f} KiB, "
              f"phase {status['phase']}")


def cluster_plan(job: dict[str, Any]) -> Any:
    """How the test cluster ends each Job at once: one client in seven fails; aggregations report a round."""
    from tests.operator.cluster import Sabotage

    labels = job["metadata"]["labels"]
    client = labels.get("fedtrain.io/client", "")
    if client and int(client.rsplit("-", 1)[-1]) % 7 == 0:
        return Sabotage(exit_code=1, message="Traceback (most recent call last): RuntimeError: CUDA out of memory")
    if labels.get("fedtrain.io/task") == "aggregate":
        return Sabotage(exit_code=0, message=json.dumps({"round": int(labels["fedtrain.io/round"]),
                                                         "accuracy": 0.5, "loss": 1.0}))
    return Sabotage(exit_code=0, message="")


def serve_cluster(connection: Any, root: str) -> None:
    """The child process: the test cluster until told to stop, then the operator's request count."""
    from tests.operator.conftest import ClusterThread

    thread = ClusterThread(Path(root), cluster_plan)
    thread.start()
    thread.started.wait(60)
    assert thread.server is not None
    connection.send(thread.url)
    connection.recv()
    connection.send(sum(r.headers.get("User-Agent", "").startswith(("kopf", "OpenAPI-Generator"))
                        for r in list(thread.server._requests)))
    thread.stop()


async def operate(url: str, per_round: int) -> dict[str, Any]:
    """In a fresh process: the operator runs one 1,000-client training at ``url`` to its end."""
    import resource

    from operator_scale import peak_rss_mib, run_operator  # a sibling script: bench/ is this script's folder

    import fedtrain.operator.controller as controller
    from tests.operator.conftest import tiny_training

    decisions: list[float] = []
    largest = [0]
    engine_decide, store = controller.decide, controller.write_status

    def timed_decide(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time()  # this thread's CPU only: kopf's and the API client's threads are apart
        decision = engine_decide(*args, **kwargs)
        decisions.append(time.thread_time() - started)
        return decision

    async def measured_store(kube: Any, resource_: dict[str, Any], status: Any) -> Any:
        largest[0] = max(largest[0], len(json.dumps(status.to_json())))
        return await store(kube, resource_, status)

    controller.decide, controller.write_status = timed_decide, measured_store
    manifest = tiny_training("thousand", rounds=2, clients={"count": 1000, "perRound": per_round,
                                                            "minSuccessful": per_round // 2, "maxRetries": 0})
    items, elapsed = await run_operator(url, [manifest])
    status = items[0]["status"]
    used = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": elapsed, "phase": status["phase"], "message": status.get("message", ""),
            "rounds": [r["finishedAt"] - r["startedAt"] for r in status.get("rounds", []) if r.get("finishedAt")],
            "decisions": decisions, "largest": largest[0], "cpu": used.ru_utime + used.ru_stime,
            "rss_mib": peak_rss_mib()}


def cluster_run(per_round: int) -> None:
    """The operator against a fresh test cluster (both in fresh processes): print what `operate` measured."""
    from operator_scale import cluster_process

    with cluster_process(serve_cluster) as (url, env, connection):
        child = subprocess.run([sys.executable, __file__, "--operate", url, "--per-round", str(per_round)], env=env,
                               capture_output=True, text=True)
        connection.send("stop")
        requests = connection.recv()
    if child.returncode != 0:
        print(child.stdout[-2000:], child.stderr[-3000:])
        return
    found = json.loads(child.stdout.strip().splitlines()[-1])
    rounds = len(found["rounds"])
    print(f"operator on the test cluster, 1000 clients, {per_round} per round: {found['phase']} in "
          f"{found['seconds']:.0f} s, rounds {', '.join(f'{s:.1f} s' for s in found['rounds'])}; "
          f"decision CPU {summary(found['decisions'])}; largest status {found['largest'] / 1024:.1f} KiB; "
          f"operator CPU {found['cpu']:.0f} s, peak RSS {found['rss_mib']:.0f} MiB; "
          f"{requests / max(rounds, 1):.0f} operator requests per round ({requests / max(rounds, 1) / per_round:.1f} "
          f"per client)" + (f"; {found['message']}" if found["phase"] != "Succeeded" else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local", action="store_true", help="also run a 1,000-client federation with fedtrain run")
    parser.add_argument("--cluster", action="store_true", help="also run a 1,000-client training on the test cluster")
    parser.add_argument("--operate", help=argparse.SUPPRESS)
    parser.add_argument("--per-round", type=int, default=100, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.operate:
        import logging

        logging.basicConfig(level=logging.ERROR)
        print(json.dumps(asyncio.run(operate(args.operate, args.per_round))))
        return
    # The worker's termination message comes with torch, whose millions of objects the operator's process
    # never has; leave them out of the garbage collector's scans so that it does not time those.
    import fedtrain.worker.jobs  # noqa: F401
    gc.freeze()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    small, small_cpu, _ = simulate(10, 10)
    print(f"baseline, 10 clients: wall {summary(small)}; CPU {summary(small_cpu)}")
    for per_round in (100, 1000):
        times, cpu, largest = simulate(1000, per_round)
        limit = engine.DETAILED_CLIENTS
        engine.DETAILED_CLIENTS = 10**9  # baseline: every round keeps its per-client records
        _, _, uncompacted = simulate(1000, per_round)
        engine.DETAILED_CLIENTS = limit
        print(f"1000 clients, {per_round} per round: wall {summary(times)}; CPU {summary(cpu)}; ratio of median "
              f"CPU to 10 clients: {statistics.median(cpu) / max(statistics.median(small_cpu), 1e-6):.1f}")
        print(f"  largest status {largest / 1024:.1f} KiB (limit 256 KiB); every round kept whole: "
              f"{uncompacted / 1024:.1f} KiB; ratio {largest / uncompacted:.2f}")
    if args.local:
        for per_round in (100, 1000):
            local_run(per_round)
    if args.cluster:
        for per_round in (100, 1000):
            cluster_run(per_round)


if __name__ == "__main__":
    main()
