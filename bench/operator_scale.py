"""Many trainings on one operator: API requests per pass and per round, reaction time, CPU and memory.

Starts the test cluster of tests/operator (kmock API server over HTTP) in a child process, with Jobs
that complete at once (no worker runs: this measures the operator, not training), creates
``--trainings`` 3-round, 2-client trainings at the same moment, and runs the operator until all
have Succeeded. Each variant runs in a fresh process, so CPU time and peak memory are the operator's:

- the operator as deployed: Jobs followed through a kopf index fed by its Job watch, Pods listed
  only when a Job the engine waits for has finished (or every few seconds while such Jobs run);
- baseline: the same operator reading the training and listing its Jobs and Pods on every pass (the
  earlier design).

Printed per variant: requests the operator made (kopf's own and the controller's), per reconcile
pass and per round; stage-to-stage reaction p50 and p99, from the API server's objects: the last Job
of a stage's completionTime (stamped by the test cluster's job controller as it writes the Job's
end) to the first Job of the next stage's creationTimestamp (stamped by the API server); operator
CPU seconds and peak RSS; the test cluster's CPU seconds (API server and Job runner, one process);
the load average before and after, since other work on the machine stretches every figure here.
Then the ratios deployed / baseline.

    python bench/operator_scale.py --trainings 50 --repeats 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: the repo's operator/ must not shadow stdlib

ROUNDS = 3
CLIENTS = 2
LABELS = {"deployed": "deployed (the training, Jobs and Pods from the watches)",
          "baseline": "baseline (read the training, list Jobs and Pods every pass)"}


def stamp(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def gaps(jobs: list[dict[str, Any]]) -> list[float]:
    """Per training: seconds from the last Job of each stage completing to the first Job of the next."""
    found: list[float] = []
    by_training: dict[str, list[dict[str, Any]]] = {}
    for job in jobs:
        by_training.setdefault(job["metadata"]["labels"]["fedtrain.io/training"], []).append(job)
    for training_jobs in by_training.values():
        stages: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for job in training_jobs:
            labels = job["metadata"]["labels"]
            order = {"init": 0, "train": 1, "aggregate": 2, "finalize": 3}[labels["fedtrain.io/task"]]
            number = int(labels["fedtrain.io/round"])
            key = (number if order in (1, 2) else (0 if order == 0 else ROUNDS + 1), order)
            stages.setdefault(key, []).append(job)
        for before, after in itertools.pairwise(sorted(stages)):
            if before[0] != after[0] - 1 and before[0] != after[0]:
                continue  # a stage whose Jobs were pruned in between
            ended = max(stamp(j["status"]["completionTime"]) for j in stages[before])
            started = min(stamp(j["metadata"]["creationTimestamp"]) for j in stages[after])
            found.append(started - ended)
    return found


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def request_kind(request: Any) -> str:
    """``who verb resource[/subresource]``, e.g. ``operator fetch federatedtrainings``, for the per-round breakdown.

    Who: ``kopf``, ``operator`` (the controller's client) or ``other`` (this benchmark, the test cluster's
    job controller: not counted in the operator's requests).
    """
    agent = request.headers.get("User-Agent", "")
    who = "kopf" if agent.startswith("kopf") else "operator" if agent.startswith("OpenAPI-Generator") else "other"
    plural = getattr(request.resource, "plural", None) or request.url.path.rstrip("/").rsplit("/", 1)[-1]
    watch = request.params.get("watch") in ("true", "1")
    verb = "watch" if watch else str(request.action).rsplit(".", 1)[-1].lower()
    return f"{who} {verb} {plural}" + (f"/{request.subresource}" if request.subresource else "")


def serve_cluster(connection: Any, root: str) -> None:
    """The child process: the test cluster, Jobs succeeding at once, until told to stop."""
    from tests.operator.cluster import Sabotage
    from tests.operator.conftest import ClusterThread

    thread = ClusterThread(Path(root), lambda job: Sabotage(exit_code=0, message="done"))
    thread.start()
    thread.started.wait(60)
    assert thread.server is not None
    connection.send(thread.url)
    while connection.recv() != "stop":
        requests = list(thread.server._requests)
        used = resource.getrusage(resource.RUSAGE_SELF)
        connection.send((Counter(r.headers.get("User-Agent", "").split("/")[0] for r in requests),
                         Counter(request_kind(r) for r in requests), used.ru_utime + used.ru_stime))
    jobs = [dict(o.raw) for (r, _, _), o in list(thread.server.objects.items())
            if getattr(r, "plural", "") == "jobs" and not o.deleted]
    connection.send(jobs)
    thread.stop()


def peak_rss_mib() -> float:
    """This process's peak resident memory since it started (VmHWM; ``ru_maxrss`` keeps the forking parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def run_operator(url: str, manifests: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], float]:
    """The operator (kopf, as deployed) in this process: create ``manifests`` and run until all have finished.

    Returns the trainings as they ended and the seconds from the operator's start to the last one's end.
    """
    import aiohttp
    import kopf

    import fedtrain.operator.handlers  # noqa: F401  (registers the handlers)
    from tests.operator.conftest import TRAININGS

    started = time.monotonic()
    stop = asyncio.Event()
    operator = asyncio.create_task(kopf.operator(clusterwide=True, standalone=True, stop_flag=stop))
    async with aiohttp.ClientSession(base_url=url) as session:
        for answer in await asyncio.gather(*(session.post(TRAININGS, json=m) for m in manifests)):
            assert answer.status in (200, 201), await answer.text()
        while True:
            async with session.get(TRAININGS) as answer:
                items = (await answer.json())["items"]
            if sum(i.get("status", {}).get("phase") in ("Succeeded", "Failed") for i in items) == len(manifests):
                break
            await asyncio.sleep(0.5)
    elapsed = time.monotonic() - started
    stop.set()
    await asyncio.wait_for(operator, 60)
    return items, elapsed


async def run_variant(url: str, trainings: int) -> dict[str, Any]:
    """In this (fresh) process: the operator against the cluster at ``url`` until every training is done."""
    from fedtrain.operator.controller import Controller
    from tests.operator.conftest import tiny_training

    passes = 0
    reconcile = Controller.reconcile

    baseline = os.environ.get("BENCH_VARIANT") == "baseline"

    async def counted(self: Controller, namespace: str, name: str, *seen: Any) -> Any:
        nonlocal passes
        passes += 1
        return await reconcile(self, namespace, name, *([] if baseline else seen))

    Controller.reconcile = counted
    if baseline:
        Controller.follow = lambda self, *sources: None
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    items, elapsed = await run_operator(url, [tiny_training(f"t{i:03d}", rounds=ROUNDS, clients={"count": CLIENTS})
                                              for i in range(trainings)])
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    return {"passes": passes, "seconds": elapsed,
            "cpu": cpu.ru_utime + cpu.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime,
            "rss_mib": peak_rss_mib(), "phases": Counter(i["status"]["phase"] for i in items)}


@contextlib.contextmanager
def cluster_process(serve: Callable[[Any, str], None]) -> Iterator[tuple[str, dict[str, str], Any]]:
    """A test cluster that ``serve(connection, folder)`` runs in a fresh process (it sends its URL first).

    Yields the URL, the environment an operator process needs to reach it, and this end of the pipe.
    """
    from tests.operator.conftest import kubeconfig

    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    with tempfile.TemporaryDirectory() as folder:
        cluster = context.Process(target=serve, args=(theirs, folder))
        cluster.start()
        url = ours.recv()
        kubeconfig(Path(folder) / "kubeconfig", url)
        yield url, {**os.environ, "KUBECONFIG": f"{folder}/kubeconfig", "FEDTRAIN_METRICS_PORT": "0"}, ours
        cluster.join(60)


def measure(variant: str, trainings: int) -> dict[str, Any]:
    """One variant: a fresh cluster process, a fresh operator process."""
    with cluster_process(serve_cluster) as (url, env, ours):
        ours.send("count")
        before, kinds_before, cluster_cpu = ours.recv()
        load = os.getloadavg()[0]
        child = subprocess.run([sys.executable, __file__, "--child", url, "--trainings", str(trainings)],
                               env={**env, "BENCH_VARIANT": variant}, capture_output=True, text=True, check=True)
        ours.send("count")
        after, kinds_after, cluster_cpu_after = ours.recv()
        ours.send("stop")
        jobs = ours.recv()
    result = json.loads(child.stdout.strip().splitlines()[-1])
    made = {agent: after[agent] - before.get(agent, 0) for agent in ("kopf", "OpenAPI-Generator")}
    reaction = gaps([j for j in jobs if j.get("status", {}).get("completionTime")])
    return {**result, "kopf_requests": made["kopf"], "controller_requests": made["OpenAPI-Generator"],
            "kinds": {kind: kinds_after[kind] - kinds_before.get(kind, 0) for kind in kinds_after},
            "reaction_p50": statistics.median(reaction), "reaction_p99": percentile(reaction, 0.99),
            "gaps": len(reaction), "cluster_cpu": cluster_cpu_after - cluster_cpu, "load": (load, os.getloadavg()[0])}


def report(name: str, figures: dict[str, Any], trainings: int) -> None:
    rounds = trainings * ROUNDS
    total = figures["kopf_requests"] + figures["controller_requests"]
    print(f"{name}: {figures['phases']} in {figures['seconds']:.1f} s, {figures['passes']} passes")
    print(f"  requests: {total} ({figures['kopf_requests']} kopf, {figures['controller_requests']} controller); "
          f"controller per pass {figures['controller_requests'] / figures['passes']:.2f}, "
          f"all per round {total / rounds:.1f}")
    print("  operator's requests per round: " + ", ".join(
        f"{kind} {count / rounds:.2f}" for kind, count in sorted(figures["kinds"].items(), key=lambda item: -item[1])
        if count and not kind.startswith("other")))
    print(f"  reaction (n={figures['gaps']}): p50 {figures['reaction_p50']:.3f} s, p99 {figures['reaction_p99']:.3f} s")
    print(f"  operator CPU {figures['cpu']:.1f} s, peak RSS {figures['rss_mib']:.0f} MiB; test cluster CPU "
          f"{figures['cluster_cpu']:.1f} s")
    print(f"  load average {figures['load'][0]:.1f} before, {figures['load'][1]:.1f} after")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainings", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant, interleaved")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import logging

        logging.basicConfig(level=logging.ERROR)
        print(json.dumps(asyncio.run(run_variant(args.child, args.trainings)), default=dict))
        return
    runs: dict[str, list[dict[str, Any]]] = {"deployed": [], "baseline": []}
    for _ in range(args.repeats):  # interleaved, so that the machine's load falls on both alike
        for variant, found in runs.items():
            found.append(measure(variant, args.trainings))
            report(LABELS[variant], found[-1], args.trainings)
    for key, label in (("controller_requests", "controller requests"), ("reaction_p99", "reaction p99"),
                       ("cpu", "operator CPU")):
        deployed, baseline = (statistics.median(r[key] for r in runs[v]) for v in ("deployed", "baseline"))
        print(f"ratio deployed/baseline (medians of {args.repeats}), {label}: {deployed / baseline:.2f}")


if __name__ == "__main__":
    main()
