"""Passes that follow Jobs from the watch: no Job lists, and Pods listed only when the engine needs them."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fedtrain.operator.controller import POD_CHECK_SECONDS, Controller
from fedtrain.operator.kube import Kube
from tests.operator.conftest import NAMESPACE, Cluster, tiny_training

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(300)]


class CountingKube(Kube):
    """Counts the collection reads the controller makes, by kind."""

    lists: list[str]

    async def list(self, path: str, selector: dict[str, str] | None = None) -> list[dict[str, Any]]:
        self.lists.append(path.rsplit("/", 1)[-1])
        return await super().list(path, selector)


async def test_jobs_come_from_the_watch_and_pods_are_read_when_a_job_finishes(cluster: Cluster) -> None:
    kube = CountingKube.from_environment()
    kube.lists = []
    now = [1000.0]
    controller = Controller(kube, clock=lambda: now[0])
    seen: list[dict[str, Any]] = []  # what the operator's kopf index would hold
    controller.follow(lambda namespace, name: list(seen) if (namespace, name) == (NAMESPACE, "signs") else [])
    cluster.runner.paused = True  # Jobs stay as created until the test lets them run
    try:
        await cluster.apply(tiny_training(rounds=1))
        assert (await controller.reconcile(NAMESPACE, "signs")).phase == "Initializing"
        assert kube.lists == []  # nothing to observe yet: the init Job was just created

        seen[:] = await cluster.jobs()  # the watch reports the init Job, not started yet
        now[0] += 1
        await controller.reconcile(NAMESPACE, "signs")
        assert kube.lists == ["pods"]  # a running Job the engine waits for: its Pod is looked at once...
        now[0] += POD_CHECK_SECONDS / 2
        await controller.reconcile(NAMESPACE, "signs")
        assert kube.lists == ["pods"]  # ...and not again before POD_CHECK_SECONDS

        cluster.runner.paused = False
        while not any(j.get("status", {}).get("completionTime") for j in seen):
            await asyncio.sleep(0.1)
            seen[:] = await cluster.jobs()
        outcome = await controller.reconcile(NAMESPACE, "signs")
        assert kube.lists == ["pods", "pods"]  # it finished: its Pod has the exit code and the message
        assert outcome.phase == "Running"  # so round 1 started from what the watch had reported
        assert [j["metadata"]["name"] for j in await cluster.jobs() if "r0001" in j["metadata"]["name"]]
        assert "jobs" not in kube.lists
    finally:
        kube.close()
