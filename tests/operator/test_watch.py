"""Passes that follow Jobs and Pods from the watches: no lists, unless a Job's end comes before its Pod's."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fedtrain.operator.controller import Controller
from fedtrain.operator.jobs import pod_view
from fedtrain.operator.kube import Kube
from tests.operator.conftest import NAMESPACE, TRAININGS, Cluster, tiny_training

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(300)]


class CountingKube(Kube):
    """Counts the reads the controller makes: collections by kind, objects by name."""

    lists: list[str]
    gets: list[str]

    async def list(self, path: str, selector: dict[str, str] | None = None) -> list[dict[str, Any]]:
        self.lists.append(path.rsplit("/", 1)[-1])
        return await super().list(path, selector)

    async def get(self, path: str) -> dict[str, Any]:
        self.gets.append(path.rsplit("/", 1)[-1])
        return await super().get(path)


async def test_jobs_and_pods_come_from_the_watch_and_pods_are_listed_only_when_the_watch_lags(
        cluster: Cluster) -> None:
    kube = CountingKube.from_environment()
    kube.lists, kube.gets = [], []
    controller = Controller(kube)
    jobs_seen: list[dict[str, Any]] = []  # what the operator's kopf indexes would hold
    pods_seen: list[dict[str, Any]] = []
    training: dict[str, Any] = {}
    controller.follow(lambda namespace, name: list(jobs_seen) if (namespace, name) == (NAMESPACE, "signs") else [],
                      lambda uid: list(pods_seen) if uid == training["metadata"]["uid"] else [])
    cluster.runner.paused = True  # Jobs stay as created until the test lets them run
    try:
        training.update(await cluster.apply(tiny_training(rounds=1)))
        assert (await controller.reconcile(NAMESPACE, "signs")).phase == "Initializing"
        jobs_seen[:] = await cluster.jobs()  # the watch reports the init Job, not started yet
        await controller.reconcile(NAMESPACE, "signs")
        assert kube.lists == []  # a running Job and no Pod yet: nothing to list

        cluster.runner.paused = False
        while not any(j.get("status", {}).get("completionTime") for j in jobs_seen):
            await asyncio.sleep(0.1)
            jobs_seen[:] = await cluster.jobs()
        assert (await controller.reconcile(NAMESPACE, "signs")).phase == "Running"
        assert kube.lists == ["pods"]  # the Job's end came before its Pod's: the Pods were listed, once
        round_one = [j for j in await cluster.jobs() if "r0001" in j["metadata"]["name"]]
        assert round_one, "round 1 started from the init task's output, read from the listed Pod"

        while not all(j.get("status", {}).get("completionTime") for j in round_one):
            await asyncio.sleep(0.1)
            round_one = [j for j in await cluster.jobs() if "r0001" in j["metadata"]["name"]]
        jobs_seen[:] = await cluster.jobs()
        pods_seen[:] = [pod_view(p) for p in await cluster.list(f"/api/v1/namespaces/{NAMESPACE}/pods")]
        await controller.reconcile(NAMESPACE, "signs")
        assert kube.lists == ["pods"]  # the watch had every Pod's end: nothing listed
        assert any("aggregate" in j["metadata"]["name"] for j in await cluster.jobs()), "the round moved on"
        assert "jobs" not in kube.lists
    finally:
        kube.close()


async def test_a_pass_decides_from_the_watchs_copy_and_reads_the_training_only_after_a_conflict(
        cluster: Cluster) -> None:
    kube = CountingKube.from_environment()
    kube.lists, kube.gets = [], []
    controller = Controller(kube)
    jobs_seen: list[dict[str, Any]] = []
    pods_seen: list[dict[str, Any]] = []
    controller.follow(lambda namespace, name: list(jobs_seen), lambda uid: list(pods_seen))
    cluster.runner.paused = True
    try:
        created = await cluster.apply(tiny_training(rounds=1))
        watched = lambda: created  # noqa: E731  (the watch delivers nothing after the creation)
        assert (await controller.reconcile(NAMESPACE, "signs", watched)).phase == "Initializing"
        assert (await controller.reconcile(NAMESPACE, "signs", watched)).phase == "Initializing"
        assert "signs" not in kube.gets  # the second pass took its own write's answer, not the watch's older copy

        # Another writer moves the training on; the watch has not delivered that either.
        await cluster.request("PATCH", f"{TRAININGS}/signs", {"metadata": {"labels": {"team": "signs"}}}, status=200)
        cluster.runner.paused = False
        while not any(j.get("status", {}).get("completionTime") for j in jobs_seen):
            await asyncio.sleep(0.1)
            jobs_seen[:] = await cluster.jobs()
        pods_seen[:] = [pod_view(p) for p in await cluster.list(f"/api/v1/namespaces/{NAMESPACE}/pods")]
        assert (await controller.reconcile(NAMESPACE, "signs", watched)).phase == "Running"
        assert kube.gets.count("signs") == 1  # the stale copy's write met a 409; the retry read the training once
        assert (await cluster.training("signs"))["metadata"]["labels"]["team"] == "signs"
    finally:
        kube.close()
