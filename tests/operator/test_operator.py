"""The kopf operator against a real HTTP Kubernetes API (kmock) whose Jobs run as local processes."""

from __future__ import annotations

import asyncio
import base64
import copy
from typing import Any

import pytest

from tests.operator.cluster import Sabotage
from tests.operator.conftest import NAMESPACE, Cluster, condition, tiny_training
from tests.operator.test_profiles import delete_profile, eventually, exercise_profile

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(400)]


def phase(resource: dict[str, Any]) -> str:
    return str(resource.get("status", {}).get("phase", ""))


def finished(resource: dict[str, Any]) -> bool:
    return phase(resource) in ("Succeeded", "Failed")


async def test_two_clients_two_rounds_to_succeeded(cluster: Cluster, mlflow_server: str) -> None:
    manifest = tiny_training(mlflow={"trackingUri": mlflow_server, "registeredModelName": "operator-signs"})
    await cluster.start_operator()
    await cluster.apply(manifest)
    done = await cluster.wait_for("signs", finished)
    status = done["status"]
    assert status["phase"] == "Succeeded", status
    assert status["progress"] == "2/2"
    assert status["currentRound"] == 2
    assert [r["round"] for r in status["rounds"]] == [1, 2]
    assert all(r.get("accepted") == ["client-00", "client-01"] for r in status["rounds"]), status["rounds"]
    assert 0.0 <= status["accuracy"] <= 1.0 and status["bestAccuracy"] >= status["accuracy"] - 1e-9
    assert status["modelVersion"] == "1" and status["modelUri"].startswith("models:/operator-signs/")
    assert status["observedGeneration"] == done["metadata"]["generation"]
    assert condition(done, "Succeeded")["status"] == "True"
    assert condition(done, "Running")["status"] == "False"

    # One Job per client per round, one aggregation per round, plus init and finalize: nothing twice.
    ran = cluster.runner.ran
    assert len(ran) == len(set(ran)) == 1 + 2 * (2 + 1) + 1
    jobs = await cluster.jobs()
    for job in jobs:
        owner = job["metadata"]["ownerReferences"][0]
        assert owner["kind"] == "FederatedTraining" and owner["uid"] == done["metadata"]["uid"]
        assert job["spec"]["backoffLimit"] == 0
        assert job["metadata"]["labels"]["fedtrain.io/training"] == "signs"
    reasons = [e["reason"] for e in await cluster.events()]
    assert reasons.count("RoundCompleted") == 2 and reasons.count("TrainingCompleted") == 1


async def test_invalid_spec_fails_with_the_field_named(cluster: Cluster) -> None:
    manifest = tiny_training(storage={"local": "/tmp/x"})
    manifest["spec"]["storage"] = {"local": "/tmp/x"}
    await cluster.start_operator()
    await cluster.apply(manifest)
    done = await cluster.wait_for("signs", finished, timeout=30)
    failed = condition(done, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "InvalidSpec"
    assert "spec.storage" in failed["message"] and "persistentVolumeClaim" in failed["message"]
    assert await cluster.jobs() == []


async def test_client_failing_above_quorum_is_dropped_and_training_goes_on(
        cluster: Cluster, sabotage: dict[str, Sabotage]) -> None:
    sabotage["r0001-client-02"] = Sabotage(exit_code=1, message="Traceback: simulated crash")
    manifest = tiny_training(rounds=1, clients={"count": 3, "minSuccessful": 2, "maxRetries": 0})
    await cluster.start_operator()
    await cluster.apply(manifest)
    done = await cluster.wait_for("signs", finished)
    assert phase(done) == "Succeeded", done["status"]
    record = done["status"]["rounds"][0]
    assert record["clients"]["client-02"]["state"] == "failed"
    assert "simulated crash" in record["clients"]["client-02"]["reason"]
    assert record["accepted"] == ["client-00", "client-01"]
    assert condition(done, "Degraded")["status"] == "True"
    assert [e for e in await cluster.events() if e["reason"] == "ClientFailed" and e["type"] == "Warning"]


async def test_clients_failing_below_quorum_fail_the_training_with_the_cause(
        cluster: Cluster, sabotage: dict[str, Sabotage]) -> None:
    sabotage["client-01"] = Sabotage(waiting="ImagePullBackOff")
    sabotage["client-02"] = Sabotage(waiting="ImagePullBackOff")
    manifest = tiny_training(rounds=1, clients={"count": 3, "minSuccessful": 2})
    await cluster.start_operator()
    await cluster.apply(manifest)
    done = await cluster.wait_for("signs", finished, timeout=60)
    failed = condition(done, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "ImagePullBackOff", failed
    assert "client-01" in failed["message"] and "client-02" in failed["message"]
    assert "failed: failed" not in failed["message"], failed  # the executor's reason, not a second "failed"
    async def none_stuck() -> bool:  # the status is written first, then the stuck Jobs are deleted
        return not [j for j in await cluster.jobs() if "client-01" in j["metadata"]["name"]]

    await eventually(none_stuck)  # deleted: a Pod that cannot pull its image would wait forever


async def _round_one_running(cluster: Cluster) -> None:
    await cluster.wait_for("signs", lambda r: r.get("status", {}).get("currentRound", 0) >= 1, timeout=120)


async def test_suspend_stops_new_jobs_and_resume_finishes(cluster: Cluster) -> None:
    await cluster.start_operator()
    await cluster.apply(tiny_training(rounds=3))
    await _round_one_running(cluster)
    await cluster.request("PATCH", f"/apis/fedtrain.io/v1alpha1/namespaces/{NAMESPACE}/federatedtrainings/signs",
                          {"spec": {"suspend": True}}, status=200)
    suspended = await cluster.wait_for("signs", lambda r: phase(r) == "Suspended", timeout=120)
    assert condition(suspended, "Suspended")["status"] == "True"
    started = len(cluster.runner.ran)
    assert not cluster.runner.running
    await cluster.wait_for("signs", lambda r: phase(r) == "Suspended", timeout=5)
    assert len(cluster.runner.ran) == started  # nothing new while suspended
    await cluster.request("PATCH", f"/apis/fedtrain.io/v1alpha1/namespaces/{NAMESPACE}/federatedtrainings/signs",
                          {"spec": {"suspend": False}}, status=200)
    done = await cluster.wait_for("signs", finished)
    assert phase(done) == "Succeeded" and done["status"]["progress"] == "3/3"
    assert len(cluster.runner.ran) == len(set(cluster.runner.ran)) == 1 + 3 * 3 + 1


@pytest.mark.slow
async def test_operator_killed_mid_round_finishes_without_duplicates(cluster: Cluster) -> None:
    """kopf cancelled mid-round, then started again.

    Events are posted after the status write that they report, at most once: a kill between the two
    loses that round's Event (it used to be asserted as exactly 3, which failed when the kill fell
    there). Still out of the default suite until it has a longer record; run it with ``-m slow``.
    Restart safety stays covered by the controller-level kill test below.
    """
    await cluster.start_operator()
    await cluster.apply(tiny_training(rounds=3))
    await cluster.wait_for("signs", lambda r: r.get("status", {}).get("currentRound", 0) >= 2, timeout=180)
    await cluster.stop_operator(graceful=False)
    await cluster.start_operator()
    done = await cluster.wait_for("signs", finished)
    assert phase(done) == "Succeeded" and done["status"]["progress"] == "3/3"
    assert [r["round"] for r in done["status"]["rounds"]] == [1, 2, 3]
    assert len(cluster.runner.ran) == len(set(cluster.runner.ran)) == 1 + 3 * 3 + 1
    reasons = [e["reason"] for e in await cluster.events()]
    assert 2 <= reasons.count("RoundCompleted") <= 3  # never twice; one may be lost to the kill


async def test_deletion_removes_jobs_and_the_directory_when_asked(cluster: Cluster) -> None:
    await cluster.start_operator()
    await cluster.apply(tiny_training(rounds=5, storage={"reclaimPolicy": "Delete"}))
    resource = await cluster.wait_for("signs", lambda r: r.get("status", {}).get("currentRound", 0) >= 1,
                                      timeout=120)
    uid = resource["metadata"]["uid"]
    directory = cluster.runner.store / NAMESPACE / f"signs-{uid[:8]}"
    assert directory.is_dir()
    await cluster.request("DELETE", f"/apis/fedtrain.io/v1alpha1/namespaces/{NAMESPACE}/federatedtrainings/signs")
    for _ in range(600):
        answer = await cluster.request("GET", f"/apis/fedtrain.io/v1alpha1/namespaces/{NAMESPACE}/"
                                              "federatedtrainings/signs")
        if answer.get("code") == 404:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the training was not deleted")
    assert not directory.exists()
    assert await cluster.jobs() == []


class Killed(Exception):
    """The simulated end of an operator process."""


@pytest.mark.slow  # 13 controller deaths in a 3-round training: about 45 s; the default suite keeps under 15 minutes
async def test_controller_killed_after_any_write_resumes_without_loss_or_duplicates(cluster: Cluster) -> None:
    """Each operator 'life' dies right after its k-th write to the API (k = 1, 2, 3, 1, 2, 3...).

    That covers a death between storing the status and creating the Jobs it asked for, between two Job
    creations, and after the Jobs but before the Events. A new controller, knowing nothing, continues.
    """
    from fedtrain.operator.controller import Controller
    from fedtrain.operator.kube import Kube

    class DyingKube(Kube):
        budget = 0

        async def call(self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None,
                       content_type: str = "application/json") -> dict[str, Any]:
            answer = await super().call(method, path, body, query, content_type)
            if method != "GET":
                self.budget -= 1
                if self.budget <= 0:
                    raise Killed(f"{method} {path}")
            return answer

    await cluster.apply(tiny_training(rounds=3))
    lives = 0
    while True:
        kube = DyingKube.from_environment()
        kube.budget = 1 + lives % 3
        controller = Controller(kube)
        lives += 1
        try:
            while True:
                outcome = await controller.reconcile(NAMESPACE, "signs")
                if not outcome.active:
                    break
                await asyncio.sleep(0.1)
            break
        except Killed:
            continue
        finally:
            kube.close()
    done = await cluster.training("signs")
    assert lives > 10  # it really died many times
    assert phase(done) == "Succeeded", done["status"]
    assert [r["round"] for r in done["status"]["rounds"]] == [1, 2, 3]
    assert len(cluster.runner.ran) == len(set(cluster.runner.ran)) == 1 + 3 * 3 + 1


async def test_stale_status_is_never_written(cluster: Cluster) -> None:
    from fedtrain.engine.status import TrainingStatus
    from fedtrain.operator.kube import Kube
    from fedtrain.operator.status import Conflict, write_status

    await cluster.apply(tiny_training())
    first = await cluster.training("signs")
    kube = Kube.from_environment()
    try:
        await write_status(kube, first, TrainingStatus(phase="Running", message="first writer"))
        with pytest.raises(Conflict):
            await write_status(kube, first, TrainingStatus(phase="Failed", message="stale writer"))
    finally:
        kube.close()
    assert (await cluster.training("signs"))["status"]["message"] == "first writer"


def _rbac_rules() -> set[tuple[str, str]]:
    """(resource[/subresource], verb) pairs the operator's ClusterRole grants."""
    import yaml

    from tests.operator.conftest import ROOT

    documents = yaml.safe_load_all((ROOT / "deploy" / "rbac.yaml").read_text())
    role = next(d for d in documents if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "fedtrain-operator")
    return {(resource, verb) for rule in role["rules"] for resource in rule["resources"] for verb in rule["verbs"]}


def _verb(request: Any) -> str:
    method = str(request.method.value if hasattr(request.method, "value") else request.method).upper()
    if method == "GET":
        return "watch" if request.params.get("watch") in ("true", "1") else ("get" if request.name else "list")
    return {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]


async def secure_training_deleted(cluster: Cluster, foreign: dict[str, Any]) -> None:
    """A secure training with a client in an opted-in namespace gets a key Secret there and in its own, then is
    deleted: the finalizer deletes the one its owner reference cannot reach."""
    cluster.server.add_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": "opted", "annotations": {"fedtrain.io/accept-trainings": NAMESPACE}}})
    secured = copy.deepcopy(foreign)
    secured["metadata"]["name"] = "secured"
    secured["spec"]["clients"] = {"list": [{"name": "far", "namespace": "opted", "data": {"claimName": "d"}},
                                           {"name": "near"}]}
    secured["spec"]["privacy"] = {"clipNorm": 5.0, "secureAggregation": {"threshold": 2}}
    await cluster.apply(secured)  # its init finds no Secret s3 for the store's keys and fails: that is enough here
    assert phase(await cluster.wait_for("secured", finished)) == "Failed"
    there = "/api/v1/namespaces/opted/secrets/team-signs-secured-secure"
    assert sorted((await cluster.request("GET", there, status=200))["data"]) == ["far.key"]
    here = f"/api/v1/namespaces/{NAMESPACE}/secrets/secured-secure"
    assert sorted((await cluster.request("GET", here, status=200))["data"]) == ["near.key"]
    await cluster.request("DELETE", f"/apis/fedtrain.io/v1alpha1/namespaces/{NAMESPACE}/federatedtrainings/secured")

    async def secrets_gone() -> bool:  # the finalizer's (there) and the garbage collector's (here)
        return all([(await cluster.request("GET", path)).get("code") == 404 for path in (there, here)])
    await eventually(secrets_gone, timeout=30)


async def test_operator_uses_exactly_what_its_rbac_grants(cluster: Cluster) -> None:
    """Every call the operator (kopf and its own client) makes is granted by deploy/rbac.yaml, and every grant is used.

    Two trainings (one with a claim the operator creates, one whose directory is removed on deletion), a secure one
    with a client in another namespace (created, then deleted) and the life of a Kubeflow profile exercise every
    rule.

    One exception, granted for a real API server only: ``federatedtrainings/finalizers: update``, which the
    OwnerReferencesPermissionEnforcement admission plugin requires for owner references with blockOwnerDeletion.
    """
    await cluster.start_operator()
    created = tiny_training("created", rounds=1)
    created["spec"]["storage"] = {"create": {"size": "1Gi"}}
    await cluster.apply(created)
    await cluster.apply(tiny_training("removed", rounds=1, storage={"reclaimPolicy": "Delete"}))
    assert phase(await cluster.wait_for("created", finished)) == "Succeeded"
    assert phase(await cluster.wait_for("removed", finished)) == "Succeeded"
    claims = await cluster.list(f"/api/v1/namespaces/{NAMESPACE}/persistentvolumeclaims")
    assert [c["metadata"]["name"] for c in claims] == ["created-store"]
    assert claims[0]["metadata"]["ownerReferences"][0]["name"] == "created"
    assert claims[0]["spec"]["resources"]["requests"]["storage"] == "1Gi"
    await cluster.request("DELETE", f"/apis/fedtrain.io/v1alpha1/namespaces/{NAMESPACE}/federatedtrainings/removed")

    async def removed_is_gone() -> bool:  # the finalizer ran: its calls are part of what is checked below
        return (await cluster.training("removed")).get("code") == 404
    await eventually(removed_is_gone, timeout=30)
    cluster.server.add_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "elsewhere"}})
    foreign = tiny_training("foreign", rounds=1, mlflow={"trackingUri": "http://x"})
    foreign["spec"]["clients"] = {"list": [{"name": "far", "namespace": "elsewhere", "data": {"claimName": "d"}}]}
    foreign["spec"]["storage"] = {"s3": {"bucket": "weights", "credentialsSecret": {"name": "s3"}}}
    await cluster.apply(foreign)  # a client namespace that has not opted in: read, refused
    assert (await cluster.wait_for("foreign", finished))["status"]["reason"] == "ClientNamespaceNotAllowed"
    await secure_training_deleted(cluster, foreign)  # secure aggregation's key Secrets: made, then deleted
    await cluster.request("POST", f"/api/v1/namespaces/{NAMESPACE}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "half-s3"},
        "data": {"AWS_ACCESS_KEY_ID": base64.b64encode(b"key").decode()}}, status=200)
    sited = tiny_training("sited", rounds=1, mlflow={"trackingUri": "http://x"})
    sited["spec"]["clients"] = {"list": [{"name": "hq"}, {"name": "munich", "site": {}}]}
    sited["spec"]["storage"] = {"s3": {"bucket": "weights", "credentialsSecret": {"name": "half-s3"}}}
    await cluster.apply(sited)  # remote sites: the store's Secret is read by name, and lacks the secret key
    refused = (await cluster.wait_for("sited", finished))["status"]
    assert refused["reason"] == "BadInput" and "has no key AWS_SECRET_ACCESS_KEY" in refused["message"]
    await exercise_profile(cluster)  # Kubeflow profiles: provision, repair, update, clean up
    await delete_profile(cluster)
    used: set[tuple[str, str]] = set()
    for request in list(cluster.server._requests):
        agent = request.headers.get("User-Agent", "")
        ours = agent.startswith("kopf/") or agent.startswith("OpenAPI-Generator")
        parts = request.url.path.strip("/").split("/")
        if ours and parts[:3] == ["api", "v1", "namespaces"] and len(parts) == 4:  # kmock routes these nowhere
            used.add(("namespaces", _verb(request) if request.name else "get"))
            continue
        if request.resource is None or not isinstance(request.resource.plural, str) or not ours:
            continue
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        used.add((resource, _verb(request)))
    granted = _rbac_rules()
    assert used <= granted, f"used but not granted: {sorted(used - granted)}"
    # The site role's grants are checked where a site's operator runs (tests/operator/test_sites.py).
    from tests.operator.test_sites import SITE_OPERATOR_GRANTS  # that module imports this one

    site_only = SITE_OPERATOR_GRANTS - {("secrets", "get")} | {("federatedparticipations/finalizers", "update")}
    unused = granted - used - {("federatedtrainings/finalizers", "update")} - site_only
    assert unused == set(), f"granted but never used: {sorted(unused)}"
