"""How fast the operator starts the next Jobs after the last one of a stage finishes.

Runs a 4-round, 2-client tiny training on the test cluster of tests/operator (kmock API server over
HTTP, Jobs run as local processes) twice:

- the operator as deployed: kopf handlers, the training's loop woken by Job events;
- baseline: the same controller driven by polling every 5 s (the operator's default tick), no events.

For each stage boundary it measures the time from the last Job's completionTime to the next Job's
creationTimestamp (both stamped by the API server side), and prints median and max, and the ratio
operator / baseline.

    python bench/operator_reaction.py
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: the repo's operator/ must not shadow stdlib

from tests.operator.conftest import NAMESPACE, ClusterThread, kubeconfig, tiny_training

ROUNDS = 4
POLL_SECONDS = 5.0


def stamp(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def gaps(jobs: list[dict[str, Any]]) -> list[float]:
    """Seconds from the end of each stage (last Job completed) to the first Job of the next stage."""
    def stage(job: dict[str, Any]) -> tuple[int, int]:
        labels = job["metadata"]["labels"]
        order = {"init": 0, "train": 1, "aggregate": 2, "finalize": 3}[labels["fedtrain.io/task"]]
        number = int(labels["fedtrain.io/round"])
        return (number if order in (1, 2) else (0 if order == 0 else ROUNDS + 1), order)
    stages: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for job in jobs:
        stages.setdefault(stage(job), []).append(job)
    ordered = sorted(stages)
    found = []
    for before, after in itertools.pairwise(ordered):
        ended = max(stamp(j["status"]["completionTime"]) for j in stages[before])
        started = min(stamp(j["metadata"]["creationTimestamp"]) for j in stages[after])
        found.append(started - ended)
    return found


async def run(event_driven: bool) -> list[float]:
    import aiohttp

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        thread = ClusterThread(root / "node", lambda job: None)
        thread.start()
        thread.started.wait(60)
        config = str(kubeconfig(root / "kubeconfig", thread.url))
        os.environ["KUBECONFIG"] = config
        import kubernetes

        kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = config
        os.environ["FEDTRAIN_METRICS_PORT"] = "0"
        os.environ["FEDTRAIN_TICK_SECONDS"] = str(POLL_SECONDS)
        trainings = f"/apis/fedtrain.io/v1alpha1/namespaces/{NAMESPACE}/federatedtrainings"
        async with aiohttp.ClientSession(base_url=thread.url) as session:
            await session.post(trainings, json=tiny_training(rounds=ROUNDS))
            driver = asyncio.create_task(operator() if event_driven else polling())
            while True:
                async with session.get(f"{trainings}/signs") as answer:
                    phase = (await answer.json()).get("status", {}).get("phase")
                if phase in ("Succeeded", "Failed"):
                    break
                await asyncio.sleep(0.2)
            driver.cancel()
            async with session.get(f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs") as answer:
                jobs = (await answer.json())["items"]
        thread.stop()
    return gaps([j for j in jobs if j.get("status", {}).get("completionTime")])


async def operator() -> None:
    import kopf

    import fedtrain.operator.handlers  # noqa: F401

    await kopf.operator(clusterwide=True, standalone=True)


async def polling() -> None:
    from fedtrain.operator.controller import Controller
    from fedtrain.operator.kube import Kube

    controller = Controller(Kube.from_environment())
    while True:
        await controller.reconcile(NAMESPACE, "signs")
        await asyncio.sleep(POLL_SECONDS)


def main() -> None:
    import logging

    logging.basicConfig(level=logging.ERROR)
    baseline = asyncio.run(run(event_driven=False))
    reacting = asyncio.run(run(event_driven=True))
    for name, values in (("operator (Job events)", reacting), (f"baseline (poll every {POLL_SECONDS:.0f}s)", baseline)):
        print(f"{name:28s} stage gaps: n={len(values)} median={statistics.median(values):.3f}s "
              f"max={max(values):.3f}s")
    print(f"ratio operator/baseline (median): {statistics.median(reacting) / statistics.median(baseline):.3f}")


if __name__ == "__main__":
    main()
