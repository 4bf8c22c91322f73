"""How the operator fails a training, retries what is temporary, and leaves finished trainings alone."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import kmock
import pytest
import pytest_asyncio

from fedtrain.engine.status import TrainingStatus
from fedtrain.operator import metrics
from fedtrain.operator.controller import Controller
from fedtrain.operator.kube import ApiError, Kube
from fedtrain.operator.loops import Backoff
from fedtrain.operator.status import write_status
from tests.operator.conftest import NAMESPACE, TRAININGS, Cluster, condition, tiny_training

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(300)]


@pytest_asyncio.fixture
async def controller(cluster: Cluster) -> AsyncIterator[Controller]:
    """The operator's controller alone, without kopf: a test calls its passes one by one."""
    kube = Kube.from_environment()
    try:
        yield Controller(kube)
    finally:
        kube.close()


def refuse(cluster: Cluster, monkeypatch: pytest.MonkeyPatch, method: str, path_part: str, status: int,
           message: str, times: int | None = None) -> list[str]:
    """Make the test API server answer ``status`` to the operator's matching requests (``times`` of them, or all).

    Only the operator's own client (the kubernetes library) is refused, not the test's Job runner.
    Returns the list of refused requests, which grows as the server refuses them.
    """
    server, refused = cluster.server, []
    original = server._handle

    async def handle(request: Any) -> Any:
        verb = str(getattr(request.method, "value", request.method)).upper()
        ours = request.headers.get("User-Agent", "").startswith("OpenAPI-Generator")
        if ours and verb == method and path_part in request.url.path and (times is None or len(refused) < times):
            refused.append(f"{verb} {request.url.path}")
            reason = {403: "Forbidden", 422: "Invalid", 503: "ServiceUnavailable"}.get(status, "Error")
            raise kmock.KubernetesError(status, reason, message)
        return await original(request)

    monkeypatch.setattr(server, "_handle", handle)
    return refused


def finished_count(phase: str) -> float:
    return metrics.TRAININGS_FINISHED.labels(NAMESPACE, phase)._value.get()


async def test_a_spec_the_cluster_cannot_run_fails_once_through_the_engine(cluster: Cluster,
                                                                           controller: Controller) -> None:
    manifest = tiny_training()
    manifest["spec"]["storage"] = {"local": "/tmp/x"}
    await cluster.apply(manifest)
    before = finished_count("Failed")
    outcome = await controller.reconcile(NAMESPACE, "signs")
    assert not outcome.active and outcome.phase == "Failed"
    failed = await cluster.training("signs")
    assert failed["status"]["reason"] == "InvalidSpec" and "spec.storage" in failed["status"]["message"]
    assert condition(failed, "Failed")["status"] == "True"
    assert condition(failed, "Running")["status"] == "False"
    assert failed["status"]["observedGeneration"] == failed["metadata"]["generation"]
    assert finished_count("Failed") == before + 1  # counted, like a failed round
    await controller.reconcile(NAMESPACE, "signs")
    assert finished_count("Failed") == before + 1  # and only once
    assert [e["reason"] for e in await cluster.events()] == ["InvalidSpec"]


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
async def test_a_finished_training_is_never_judged_again(cluster: Cluster, controller: Controller,
                                                         phase: str) -> None:
    """A finished training whose spec no longer runs here (a profile's defaults removed, say) stays as it was."""
    await cluster.apply(tiny_training())
    resource = await cluster.training("signs")
    final = TrainingStatus(phase=phase, current_round=2, total_rounds=2, progress="2/2", accuracy=0.5,
                           message="2 rounds", reason=None if phase == "Succeeded" else "QuorumMissed")
    await write_status(controller.kube, resource, final)
    await cluster.request("PATCH", f"{TRAININGS}/signs",
                          {"spec": {"storage": {"persistentVolumeClaim": None, "local": "/tmp/x"}}}, status=200)
    stored = (await cluster.training("signs"))["status"]
    outcome = await controller.reconcile(NAMESPACE, "signs")
    assert not outcome.active and outcome.phase == phase
    assert (await cluster.training("signs"))["status"] == stored
    assert await cluster.events() == []


async def test_a_forbidden_request_fails_the_training_with_the_servers_message(
        cluster: Cluster, controller: Controller, monkeypatch: pytest.MonkeyPatch) -> None:
    message = ('persistentvolumeclaims is forbidden: User "system:serviceaccount:fedtrain-system:fedtrain-operator" '
               'cannot create resource "persistentvolumeclaims" in API group "" in the namespace "team-signs"')
    refused = refuse(cluster, monkeypatch, "POST", "/persistentvolumeclaims", 403, message)
    manifest = tiny_training()
    manifest["spec"]["storage"] = {"create": {"size": "1Gi"}}
    await cluster.apply(manifest)
    before = finished_count("Failed")
    outcome = await controller.reconcile(NAMESPACE, "signs")
    assert outcome.phase == "Failed" and len(refused) == 1  # not retried: the same request gets the same answer
    status = (await cluster.training("signs"))["status"]
    assert status["reason"] == "Forbidden"
    assert message in status["message"] and "POST /api/v1/namespaces/team-signs/persistentvolumeclaims" in \
        status["message"] and "deploy/rbac.yaml" in status["message"]
    assert finished_count("Failed") == before + 1
    assert await cluster.jobs() == []


async def test_an_invalid_status_fails_the_training_with_the_servers_message(
        cluster: Cluster, controller: Controller, monkeypatch: pytest.MonkeyPatch) -> None:
    message = 'FederatedTraining.fedtrain.io "signs" is invalid: status.phase: Unsupported value: "Initializing"'
    refuse(cluster, monkeypatch, "PATCH", "/federatedtrainings/signs/status", 422, message, times=1)
    await cluster.apply(tiny_training())
    outcome = await controller.reconcile(NAMESPACE, "signs")
    assert outcome.phase == "Failed"
    status = (await cluster.training("signs"))["status"]
    assert status["reason"] == "ApiRejected" and message in status["message"] and "422" in status["message"]
    assert await cluster.jobs() == []  # the refused decision was not acted on


async def test_a_failure_outside_the_rounds_cancels_the_running_jobs(
        cluster: Cluster, controller: Controller, monkeypatch: pytest.MonkeyPatch) -> None:
    """The spec cannot even be read (403 on the profile defaults): the round's Jobs are found by label."""
    await cluster.apply(tiny_training())
    while (await controller.reconcile(NAMESPACE, "signs")).phase != "Running":
        await asyncio.sleep(0.1)  # init runs as a local process; the pass that sees it done starts round 1
    assert [j for j in await cluster.jobs() if "r0001" in j["metadata"]["name"]]
    # As a training started by an operator that kept no defaults in the status: its next pass reads them.
    await cluster.request("PATCH", f"{TRAININGS}/signs/status", {"status": {"namespaceDefaults": None}}, status=200)
    refuse(cluster, monkeypatch, "GET", "/configmaps/fedtrain-defaults", 403, 'configmaps "fedtrain-defaults" is '
           'forbidden: User "system:serviceaccount:fedtrain-system:fedtrain-operator" cannot get resource')
    outcome = await controller.reconcile(NAMESPACE, "signs")
    assert outcome.phase == "Failed"
    assert (await cluster.training("signs"))["status"]["reason"] == "Forbidden"
    left = [j["metadata"]["name"] for j in await cluster.jobs() if "r0001" in j["metadata"]["name"]
            and not j["metadata"].get("deletionTimestamp")]
    assert left == []


async def test_temporary_errors_are_retried_and_change_nothing(cluster: Cluster, controller: Controller,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    await cluster.apply(tiny_training())
    refused = refuse(cluster, monkeypatch, "GET", "/jobs", 503, "etcdserver: leader changed", times=2)
    for _ in range(2):
        with pytest.raises(ApiError) as raised:
            await controller.reconcile(NAMESPACE, "signs")
        assert not raised.value.permanent and raised.value.status == 503
    assert "status" not in await cluster.training("signs")  # nothing was written from a half-seen cluster
    assert (await controller.reconcile(NAMESPACE, "signs")).phase == "Initializing"
    assert len(refused) == 2


async def test_an_unreachable_server_is_a_temporary_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once the socket closes
    import kubernetes

    configuration = kubernetes.client.Configuration()
    configuration.host = f"http://127.0.0.1:{port}"
    configuration.retries = 0
    kube = Kube(kubernetes.client.ApiClient(configuration))
    try:
        with pytest.raises(ApiError) as raised:
            await kube.get(f"/apis/fedtrain.io/v1alpha1/namespaces/{NAMESPACE}/federatedtrainings/signs")
    finally:
        kube.close()
    assert raised.value.status == 0 and not raised.value.permanent
    assert raised.value.request.startswith("GET /apis/fedtrain.io/")


@pytest.mark.filterwarnings("ignore:The test <Function")  # a plain function among asyncio tests
def test_backoff_doubles_up_to_a_minute_and_resets() -> None:
    backoff = Backoff()
    assert [backoff.next() for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    backoff.reset()
    assert backoff.next() == 1


async def _until(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_daemons_end_with_their_training_and_stop_at_once(cluster: Cluster,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """A finished training's loop ends; deleting a running one, or stopping the operator, stops its loop at once.

    kopf logs "... is cancelled. Will escalate." when a daemon outlives its cancellation timeout.
    """
    caplog.set_level(logging.DEBUG, logger="kopf")

    def exits(name: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if "Daemon 'rounds'" in r.getMessage()
                and ("succeeded" in r.getMessage() or "exited" in r.getMessage())
                and getattr(r, "k8s_ref", {}).get("name") == name]

    await cluster.start_operator()
    await cluster.apply(tiny_training("short", rounds=1))
    await cluster.wait_for("short", lambda r: r.get("status", {}).get("phase") == "Succeeded")
    await _until(lambda: bool(exits("short")), "the finished training's loop to end")

    await cluster.apply(tiny_training("deleted", rounds=5))
    await cluster.wait_for("deleted", lambda r: r.get("status", {}).get("currentRound", 0) >= 1)
    await cluster.request("DELETE", f"{TRAININGS}/deleted", status=200)
    await _until(lambda: bool(exits("deleted")), "the deleted training's loop to end")

    await cluster.apply(tiny_training("running", rounds=5))
    await cluster.wait_for("running", lambda r: r.get("status", {}).get("currentRound", 0) >= 1)
    await cluster.stop_operator()
    assert exits("running")
    escalated = [r.getMessage() for r in caplog.records if "Will escalate" in r.getMessage()]
    assert escalated == []
