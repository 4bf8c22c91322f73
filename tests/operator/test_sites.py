"""Remote sites on two clusters: a coordinator's training and sites' FederatedParticipations, meeting in S3 only.

The coordinator cluster runs the training with the operator in the test's event loop; the site
cluster is a second API server with its own Job runner and its own operator, a separate ``kopf run``
process. They share nothing but the moto S3 server, where IAM is enforced: the coordinator's key
may use the bucket, each site's key only what `fedtrain.sites.bucket_policy.site_policy` grants it.
Each site's data is a synthetic GTSRB tree on its own claim, which the site's Jobs mount read-only.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from fedtrain.contract.errors import BadDataError
from fedtrain.contract.sitetask import Posting, SiteTask, TrainSettings, encode, parse_posting, parse_result
from fedtrain.contract.storage import Store, open_store
from fedtrain.local.executor import ForkServer
from fedtrain.sites.bucket_policy import site_policy
from fedtrain.worker.data.synth import SynthConfig, generate
from tests.conftest import S3Server
from tests.operator.cluster import ApiServer, Sabotage
from tests.operator.conftest import NAMESPACE, Cluster, SiteCluster, tiny_training
from tests.operator.test_operator import _rbac_rules, _verb

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(300)]
PREFIX = "sites"
CLAIM = "signs-data"
SITES = {"munich": "site-munich", "hamburg": "site-hamburg"}  # site -> its namespace in the site cluster


def secret(namespace: str, name: str, key_id: str, key: str) -> dict[str, Any]:
    data = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": key}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def store_spec(s3: S3Server, secret_name: str) -> dict[str, Any]:
    return {"endpoint": s3.endpoint, "bucket": s3.bucket, "prefix": PREFIX, "region": "us-east-1",
            "credentialsSecret": {"name": secret_name}}


def coordinated(name: str, s3: S3Server, mlflow: str, sites: list[str], **spec: Any) -> dict[str, Any]:
    """A 2-round training with in-cluster client hq and remote ``sites``, weights in S3."""
    entries = [{"name": "hq"}, *({"name": site, "site": {}} for site in sites)]
    manifest = tiny_training(name, clients={"count": len(entries), "list": entries},
                             mlflow={"experiment": "operator-sites", "trackingUri": mlflow}, **spec)
    manifest["spec"]["storage"] = {"s3": store_spec(s3, "fedtrain-s3")}
    return manifest


def participation(site: str, training_id: str, s3: S3Server, **spec: Any) -> dict[str, Any]:
    """The site's FederatedParticipation, as the site's own people write it."""
    return {"apiVersion": "fedtrain.io/v1alpha1", "kind": "FederatedParticipation",
            "metadata": {"name": "signs", "namespace": SITES[site]},
            "spec": {"site": site, "training": {"id": training_id}, "store": {"s3": store_spec(s3, "site-s3")},
                     "data": {"claimName": CLAIM, "path": "gtsrb"}, "pollSeconds": 1,
                     "worker": {"image": "fedtrain/worker:test", "device": "cpu"}, **spec}}


async def start_training(cluster: Cluster, manifest: dict[str, Any], s3: S3Server) -> str:
    """Apply the training with the coordinator's Secret; its id once the operator published it."""
    await cluster.request("POST", f"/api/v1/namespaces/{NAMESPACE}/secrets",
                          secret(NAMESPACE, "fedtrain-s3", s3.access_key_id, s3.secret_access_key))
    await cluster.start_operator()
    await cluster.apply(manifest)
    found = await cluster.wait_for(manifest["metadata"]["name"], lambda r: bool(r.get("status", {}).get("trainingId")),
                                   timeout=60)
    return str(found["status"]["trainingId"])


async def join(site_cluster: SiteCluster, site: str, training_id: str, s3: S3Server, seed: int,
               **spec: Any) -> tuple[Path, tuple[str, str]]:
    """Give the site its own IAM user (the site policy), Secret and data, and apply its participation."""
    namespace = SITES[site]
    keys = s3.user(f"{site}-{seed}", site_policy(s3.bucket, PREFIX, training_id, site))
    await site_cluster.request("POST", f"/api/v1/namespaces/{namespace}/secrets", secret(namespace, "site-s3", *keys))
    home = site_cluster.runner.claim_dir(namespace, CLAIM) / "gtsrb"
    generate(home, SynthConfig(per_class=4, test_per_class=2, frames_per_track=2, seed=seed, max_size=32))
    await site_cluster.apply(participation(site, training_id, s3, **spec))
    return home, keys


def operator_calls(server: ApiServer) -> set[tuple[str, str]]:
    """(resource[/subresource], verb) of every request the operator (kopf and its own client) made to ``server``."""
    used = set()
    for request in list(server._requests):
        agent = request.headers.get("User-Agent", "")
        if not agent.startswith(("kopf/", "OpenAPI-Generator")) or request.resource is None or \
                not isinstance(request.resource.plural, str):
            continue
        used.add((request.resource.plural + (f"/{request.subresource}" if request.subresource else ""),
                  _verb(request)))
    return used


# What only a site's operator uses of deploy/rbac.yaml (the coordinator's RBAC test sees none of it); a real API
# server also wants federatedparticipations/finalizers: update, for the Jobs' owner references to a participation.
SITE_OPERATOR_GRANTS = {("federatedparticipations", "get"), ("federatedparticipations", "patch"),
                        ("federatedparticipations/status", "patch"), ("jobs", "patch"), ("secrets", "get")}


def check_rbac(site_cluster: SiteCluster) -> None:
    """The site's operator called nothing deploy/rbac.yaml does not grant, and used each site-only grant."""
    used, granted = operator_calls(site_cluster.server), _rbac_rules()
    assert used <= granted, f"the site operator used what deploy/rbac.yaml does not grant: {sorted(used - granted)}"
    assert used >= SITE_OPERATOR_GRANTS, sorted(SITE_OPERATOR_GRANTS - used)


def finished(resource: dict[str, Any]) -> bool:
    return resource.get("status", {}).get("phase") in ("Succeeded", "Failed")


def printed(resource: dict[str, Any], crd_columns: list[dict[str, Any]]) -> dict[str, Any]:
    """What ``kubectl get`` shows: each printer column's jsonPath read from the resource."""
    shown = {}
    for column in crd_columns:
        value: Any = resource
        for part in column["jsonPath"].strip(".").split("."):
            value = value.get(part) if isinstance(value, dict) else None
        shown[column["name"]] = value
    return shown


@pytest.mark.slow  # about 3.5 min on two busy cores
async def test_a_training_with_a_local_client_and_two_sites_succeeds(
        cluster: Cluster, site_cluster: SiteCluster, s3_server: S3Server, mlflow_server: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDTRAIN_SITE_POLL_SECONDS", "1")
    training_id = await start_training(
        cluster, coordinated("signs-sites", s3_server, mlflow_server, ["munich", "hamburg"]), s3_server)
    await site_cluster.start_operator()
    homes = {site: (await join(site_cluster, site, training_id, s3_server, seed))[0]
             for seed, site in enumerate(SITES, start=11)}

    done = await cluster.wait_for("signs-sites", finished, timeout=280)
    status = done["status"]
    assert status["phase"] == "Succeeded", (status.get("reason"), status.get("message"))
    assert 0.0 <= status["federatedAccuracy"] <= 1.0
    for record in status["rounds"]:
        assert set(record["siteScores"]) == set(SITES), record
        assert record["federated"]["examples"] == sum(s["examples"] for s in record["siteScores"].values())
        assert {record["clients"][s]["state"] for s in SITES} == {"succeeded"}
    for home in homes.values():
        assert str(home) not in json.dumps(done)  # no site path reaches the coordinator

    columns = site_cluster.server.crds["federatedparticipations"]["spec"]["versions"][0]["additionalPrinterColumns"]
    for site, namespace in SITES.items():
        fp = await site_cluster.wait_for(namespace, "signs", lambda r: r.get("status", {}).get("phase") == "Completed")
        shown = printed(fp, columns)
        assert (shown["Training"], shown["Phase"], shown["Rounds"]) == (training_id, "Completed", 2), shown
        assert 0.0 <= shown["Accuracy"] <= 1.0
        jobs = await site_cluster.list(f"/apis/batch/v1/namespaces/{namespace}/jobs")
        # round 2's training also scores round 1's model; the last round's model has an evaluation of its own
        assert sorted(j["metadata"]["name"] for j in jobs) == sorted(
            [f"signs-r0001-{site}-a1", f"signs-r0002-{site}-a1", f"signs-e0002-{site}-a1"])
        pod = jobs[0]["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "fedtrain-worker" and pod["securityContext"]["runAsNonRoot"]
        assert {"name": "site-data", "persistentVolumeClaim": {"claimName": CLAIM, "readOnly": True}} in pod["volumes"]
        refs = [e["valueFrom"]["secretKeyRef"]["name"] for e in pod["containers"][0]["env"] if "valueFrom" in e]
        assert refs == ["site-s3", "site-s3"]

    check_rbac(site_cluster)

    store = open_store(f"s3://{s3_server.bucket}/{PREFIX}/{training_id}", s3_server.environment())
    for site in SITES:
        update = json.loads(store.read_bytes(f"sites/{site}/round-0002/update-a1.json"))
        assert update["num_examples"] > 0
        assert json.loads(store.read_bytes(f"sites/{site}/round-0002/evaluation.json"))["examples"] == 43 * 2


@pytest.mark.slow  # about 3 min on two busy cores
async def test_a_site_refuses_a_strategy_outside_its_policy_and_the_training_goes_on(
        cluster: Cluster, site_cluster: SiteCluster, s3_server: S3Server, mlflow_server: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDTRAIN_SITE_POLL_SECONDS", "1")
    manifest = coordinated("signs-refused", s3_server, mlflow_server, ["munich"])
    manifest["spec"]["clients"]["minSuccessful"] = 1
    training_id = await start_training(cluster, manifest, s3_server)
    await site_cluster.start_operator()
    await join(site_cluster, "munich", training_id, s3_server, 21, policy={"strategies": ["fedprox"]})

    fp = await site_cluster.wait_for("site-munich", "signs", lambda r: bool(r.get("status", {}).get("lastRefusal")))
    assert "strategy fedavg is not accepted (spec.policy.strategies: fedprox)" in fp["status"]["lastRefusal"]
    events = await site_cluster.list("/api/v1/namespaces/site-munich/events")
    assert any(e["reason"] == "TaskRefused" and e["type"] == "Warning" and "spec.policy.strategies" in e["message"]
               for e in events), events

    done = await cluster.wait_for("signs-refused", finished, timeout=200)
    status = done["status"]
    assert status["phase"] == "Succeeded", (status.get("reason"), status.get("message"))
    munich = status["rounds"][0]["clients"]["munich"]
    assert (munich["state"], munich["exitCode"]) == ("failed", 77), munich
    assert "spec.policy.strategies" in munich["reason"]
    coordinator_events: Any = await cluster.events()  # (Cluster.list shadows the builtin in its annotations)
    assert any(e["reason"] == "ClientFailed" and "munich failed: exit code 77 (refused by the site)" in e["message"]
               and "spec.policy.strategies" in e["message"] for e in coordinator_events), \
        [(e["reason"], e["message"]) for e in coordinator_events]
    assert await site_cluster.list("/apis/batch/v1/namespaces/site-munich/jobs") == []  # nothing touched its data


async def test_a_silent_site_is_dropped_at_the_round_deadline(cluster: Cluster, s3_server: S3Server,
                                                              mlflow_server: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDTRAIN_SITE_POLL_SECONDS", "1")
    manifest = coordinated("signs-silent", s3_server, mlflow_server, [], roundDeadlineSeconds=10, rounds=1)
    manifest["spec"]["clients"] = {"count": 2, "minSuccessful": 1,
                                   "list": [{"name": "hq"}, {"name": "hamburg", "site": {"evaluate": False}}]}
    if cluster.runner.forks is None:  # torch's import in the Job runner's fork server is no part of the 10 s
        cluster.runner.forks = await asyncio.to_thread(ForkServer, [])
    await start_training(cluster, manifest, s3_server)
    done = await cluster.wait_for("signs-silent", finished, timeout=120)
    status = done["status"]
    assert status["phase"] == "Succeeded", (status.get("reason"), status.get("message"))
    for record in status["rounds"]:
        assert record["clients"]["hamburg"]["state"] == "dropped", record
        assert record["clients"]["hq"]["state"] == "succeeded"


# Task id prefix -> (what the hostile site writes as its answer's output, the reason expected). Round 1's model is
# scored by round 2's training task, whose refusal takes the score it carries with it (a NaN here); round 2's,
# the last, by an evaluation task of its own.
HOSTILE_ANSWERS = {
    "r0001": ([1, 2, 3], "output: Input should be an object"),
    "e0001": (None, "claims 1000000000 examples"),
    "r0002": ({"num_examples": 10**9, "metrics": {}, "sha256": "a" * 64,
               "evaluation": {"examples": 40, "accuracy": float("nan"), "loss": 0.1}}, "claims 1000000000 examples"),
    "e0002": ({"examples": 10**18, "accuracy": 7.0, "loss": 0.0}, "accuracy: Input should be less than or equal to 1"),
}


def play_hostile_site(store: Store, stop: threading.Event) -> None:
    """Answer each task posted to site ``evil`` once, with the lie of its kind and round, under its own key."""
    answered: set[str] = set()
    while not stop.wait(0.3):
        try:
            task = parse_posting(store.read_bytes("sites/evil/task.json")).task
        except BadDataError:  # not posted yet
            continue
        if task is None or task.id in answered:
            continue
        output, _ = HOSTILE_ANSWERS[task.id[:5]]
        document = {"task": task.id, "site": "evil", "state": "succeeded", "exit_code": 0, "output": output}
        store.write_bytes(f"sites/evil/results/{task.id}.json", json.dumps(document).encode())
        answered.add(task.id)


async def test_a_hostile_site_is_refused_answer_by_answer_and_the_training_succeeds(
        cluster: Cluster, s3_server: S3Server, mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing but its own key: a list for an output, 10^9 examples (with NaN figures), 7.0 over 10^18 examples."""
    monkeypatch.setenv("FEDTRAIN_SITE_POLL_SECONDS", "1")
    manifest = coordinated("signs-hostile", s3_server, mlflow_server, [])
    manifest["spec"]["clients"] = {"count": 2, "minSuccessful": 1, "list": [{"name": "hq"}, {"name": "evil",
                                                                                            "site": {}}]}
    if cluster.runner.forks is None:
        cluster.runner.forks = await asyncio.to_thread(ForkServer, [])
    training_id = await start_training(cluster, manifest, s3_server)
    keys = s3_server.user("evil-hostile", site_policy(s3_server.bucket, PREFIX, training_id, "evil"))
    environment = {**s3_server.environment("evil's key"), "AWS_ACCESS_KEY_ID": keys[0],
                   "AWS_SECRET_ACCESS_KEY": keys[1]}
    evil = open_store(f"s3://{s3_server.bucket}/{PREFIX}/{training_id}", environment)
    stop = threading.Event()
    site = threading.Thread(target=play_hostile_site, args=(evil, stop), daemon=True)
    site.start()
    try:
        done = await cluster.wait_for("signs-hostile", finished, timeout=180)
    finally:
        stop.set()
    status = done["status"]
    assert status["phase"] == "Succeeded", (status.get("reason"), status.get("message"))
    for record in status["rounds"]:
        number = record["round"]
        training, evaluation = record["clients"]["evil"], record["evaluations"]["evil"]
        assert training["state"] == evaluation["state"] == "failed" and training["exitCode"] == 3
        assert HOSTILE_ANSWERS[f"r{number:04d}"][1] in training["reason"], training
        assert HOSTILE_ANSWERS[f"e{number:04d}"][1] in evaluation["reason"], evaluation
        assert record["clients"]["hq"]["state"] == "succeeded" and "federated" not in record
    assert 0 <= status["bestAccuracy"] <= 1 and "federatedAccuracy" not in status
    events: Any = await cluster.events()
    assert any(e["reason"] == "SiteEvaluationFailed" and "less than or equal to 1" in e["message"] for e in events), \
        [(e["reason"], e["message"]) for e in events]


async def test_a_site_key_cannot_touch_another_sites_keys(s3_server: S3Server) -> None:
    import boto3
    from botocore.exceptions import ClientError

    training_id = "team-signs/keys-0123abcd"
    keys = s3_server.user("munich-keys", site_policy(s3_server.bucket, PREFIX, training_id, "munich"))
    munich = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                          aws_access_key_id=keys[0], aws_secret_access_key=keys[1])
    base = f"{PREFIX}/{training_id}"
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=f"{base}/sites/hamburg/round-0001/update-a1.json",
                                  Body=b"{}")
    munich.put_object(Bucket=s3_server.bucket, Key=f"{base}/sites/munich/round-0001/update-a1.json", Body=b"{}")
    calls: list[Callable[[], Any]] = [
        lambda: munich.put_object(Bucket=s3_server.bucket, Body=b"x",
                                  Key=f"{base}/sites/hamburg/round-0001/update-a1.safetensors"),
        lambda: munich.get_object(Bucket=s3_server.bucket, Key=f"{base}/sites/hamburg/round-0001/update-a1.json"),
        lambda: munich.put_object(Bucket=s3_server.bucket, Key=f"{base}/round-0001/global.safetensors", Body=b"x")]
    # No listing outside its own folder: other sites', the training's root, other trainings', the bucket.
    for prefix in (f"{base}/sites/hamburg/", f"{base}/sites/", f"{base}/", f"{base}/sites/munich",
                   f"{PREFIX}/team-signs/other-0123abcd/sites/munich/", f"{PREFIX}/"):
        calls.append(functools.partial(munich.list_objects_v2, Bucket=s3_server.bucket, Prefix=prefix))
    calls.append(lambda: munich.list_objects_v2(Bucket=s3_server.bucket))
    for call in calls:
        with pytest.raises(ClientError) as refused:
            call()
        assert refused.value.response["Error"]["Code"] == "AccessDenied"
    own = munich.list_objects_v2(Bucket=s3_server.bucket, Prefix=f"{base}/sites/munich/")
    assert [item["Key"] for item in own["Contents"]] == [f"{base}/sites/munich/round-0001/update-a1.json"]
    # As on AWS, a missing key of its own is a 403 to a HEAD (its listing grant needs a prefix); the store
    # finds it missing by listing it.
    with pytest.raises(ClientError) as refused:
        munich.head_object(Bucket=s3_server.bucket, Key=f"{base}/sites/munich/task.json")
    assert refused.value.response["Error"]["Code"] == "403"
    environment = {**s3_server.environment("munich's key"), "AWS_ACCESS_KEY_ID": keys[0],
                   "AWS_SECRET_ACCESS_KEY": keys[1]}
    assert open_store(f"s3://{s3_server.bucket}/{base}", environment).exists("sites/munich/task.json") is False


async def test_a_failed_site_job_is_answered_with_its_exit_code_and_no_site_path(
        site_cluster: SiteCluster, s3_server: S3Server) -> None:
    """The coordinator is played by the test: it posts a task with its own key; the site's Job fails."""
    import time

    training_id = "team-signs/failing-0badc0de"
    coordinator = open_store(f"s3://{s3_server.bucket}/{PREFIX}/{training_id}", s3_server.environment())
    task = SiteTask(id="r0001-munich-a1", kind="train", round=1, site="munich", training="team-signs/failing",
                    total_rounds=2, strategy="fedavg", architecture="tiny_cnn",
                    global_key="round-0000/global.safetensors", global_sha256="0" * 64, deadline=time.time() + 600,
                    train=TrainSettings())
    coordinator.write_bytes("sites/munich/task.json", encode(Posting("Running", task)))
    site_cluster.sabotage["r0001-munich"] = Sabotage(
        exit_code=3, message="cannot decode /site-data/gtsrb/Final_Training/Images/00007/00000_00001.ppm")
    await site_cluster.start_operator()
    await join(site_cluster, "munich", training_id, s3_server, 41)

    result_key = "sites/munich/results/r0001-munich-a1.json"
    await poll(lambda: asyncio.to_thread(coordinator.exists, result_key), bool, timeout=60)
    answer = parse_result(coordinator.read_bytes(result_key))
    assert (answer.state, answer.exit_code) == ("failed", 3)
    assert answer.reason == "cannot decode <site data>"
    fp = await site_cluster.wait_for("site-munich", "signs", lambda r: r.get("status", {}).get("phase") == "Failed")
    assert "/site-data" not in json.dumps(fp["status"]) and "<site data>" in fp["status"]["message"]
    assert len(site_cluster.runner.ran) == 1  # answered: never started again

    coordinator.write_bytes("sites/munich/task.json", encode(Posting("Succeeded", None, "done")))
    fp = await site_cluster.wait_for("site-munich", "signs", lambda r: r.get("status", {}).get("phase") == "Completed")
    assert fp["status"]["trainingPhase"] == "Succeeded"
    check_rbac(site_cluster)


async def test_a_withdrawn_task_is_cancelled_and_a_task_outside_the_policy_refused(
        site_cluster: SiteCluster, s3_server: S3Server) -> None:
    """The coordinator, played by the test, withdraws a running task, then asks for more epochs than the site allows."""
    import time

    training_id = "team-signs/policy-0ddba11e"
    coordinator = open_store(f"s3://{s3_server.bucket}/{PREFIX}/{training_id}", s3_server.environment())

    def task(ident: str, epochs: int) -> SiteTask:
        return SiteTask(id=ident, kind="train", round=1, site="munich", attempt=int(ident.rsplit("-a", 1)[1]),
                        training="team-signs/policy", total_rounds=2,
                        strategy="fedavg", architecture="tiny_cnn", global_key="round-0000/global.safetensors",
                        global_sha256="0" * 64, deadline=time.time() + 600, train=TrainSettings(epochs=epochs))

    coordinator.write_bytes("sites/munich/task.json", encode(Posting("Running", task("r0001-munich-a1", 1))))
    site_cluster.sabotage["r0001-munich"] = Sabotage(unschedulable=True)  # runs until deleted
    await site_cluster.start_operator()
    await join(site_cluster, "munich", training_id, s3_server, 51, policy={"maxLocalEpochs": 2})
    jobs = "/apis/batch/v1/namespaces/site-munich/jobs"
    await poll(lambda: site_cluster.list(jobs), lambda found: len(found) == 1)

    coordinator.write_bytes("sites/munich/task.json", encode(Posting("Running", None)))
    await poll(lambda: site_cluster.list(jobs), lambda found: not found)
    fp = await site_cluster.wait_for("site-munich", "signs", lambda r: "cancelled task r0001-munich-a1" in
                                     r.get("status", {}).get("message", ""))
    assert fp["status"]["phase"] == "Withdrawn"
    assert {c["type"]: c["reason"] for c in fp["status"]["conditions"]}["Participating"] == "Withdrawn"
    assert not coordinator.exists("sites/munich/results/r0001-munich-a1.json")  # withdrawn: nobody waits for it

    coordinator.write_bytes("sites/munich/task.json", encode(Posting("Running", task("r0001-munich-a2", 3))))
    result_key = "sites/munich/results/r0001-munich-a2.json"
    await poll(lambda: asyncio.to_thread(coordinator.exists, result_key), bool, timeout=60)
    answer = parse_result(coordinator.read_bytes(result_key))
    assert (answer.state, answer.exit_code) == ("failed", 77)
    assert answer.reason == ("refused: the round asks for 3 local epochs, more than spec.policy.maxLocalEpochs (2)")
    fp = await site_cluster.wait_for("site-munich", "signs", lambda r: r.get("status", {}).get("phase") == "Refused")
    assert "spec.policy.maxLocalEpochs" in fp["status"]["lastRefusal"]
    assert await site_cluster.list(jobs) == [] and len(site_cluster.runner.ran) == 0


async def test_a_deleted_training_tells_its_site_which_cancels_its_job(
        cluster: Cluster, site_cluster: SiteCluster, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleted while the site's Job runs: its posting says so, the Job goes, the participation shows it."""
    monkeypatch.setenv("FEDTRAIN_SITE_POLL_SECONDS", "1")
    site_cluster.sabotage["r0001-munich"] = Sabotage(unschedulable=True)  # runs until deleted
    manifest = coordinated("signs-deleted", s3_server, "http://127.0.0.1:9", ["munich"])  # finalize never runs
    training_id = await start_training(cluster, manifest, s3_server)
    await site_cluster.start_operator()
    await join(site_cluster, "munich", training_id, s3_server, 61)
    jobs = "/apis/batch/v1/namespaces/site-munich/jobs"
    await poll(lambda: site_cluster.list(jobs), lambda found: len(found) == 1)

    await cluster.request("DELETE", f"/apis/fedtrain.io/v1alpha1/namespaces/{NAMESPACE}/federatedtrainings/"
                                    "signs-deleted")
    coordinator = open_store(f"s3://{s3_server.bucket}/{PREFIX}/{training_id}", s3_server.environment())
    posting = await poll(lambda: asyncio.to_thread(lambda: parse_posting(coordinator.read_bytes(
        "sites/munich/task.json"))), lambda found: found.phase == "Deleted", timeout=30)
    assert posting.task is None
    await poll(lambda: site_cluster.list(jobs), lambda found: not found)
    fp = await site_cluster.wait_for("site-munich", "signs", lambda r: r.get("status", {}).get("phase") == "Deleted")
    ended = {c["type"]: c for c in fp["status"]["conditions"]}["Ended"]
    assert (ended["status"], ended["reason"]) == ("True", "TrainingDeleted")
    assert fp["status"]["trainingPhase"] == "Deleted"
    assert "cancelled task r0001-munich-a1" in fp["status"]["message"] or "Deleted" in fp["status"]["message"]
    assert not coordinator.exists("sites/munich/results/r0001-munich-a1.json")


@pytest.mark.slow  # about 2 min on two busy cores
async def test_a_site_operator_killed_mid_task_uploads_once(
        cluster: Cluster, site_cluster: SiteCluster, s3_server: S3Server, mlflow_server: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDTRAIN_SITE_POLL_SECONDS", "1")
    admin = s3_server.client()
    admin.put_bucket_versioning(Bucket=s3_server.bucket, VersioningConfiguration={"Status": "Enabled"})
    try:
        training_id = await start_training(cluster, coordinated("signs-restart", s3_server, mlflow_server,
                                                                ["munich"]), s3_server)
        await site_cluster.start_operator()
        await join(site_cluster, "munich", training_id, s3_server, 71)  # 31 is test_secure_sites' munich
        jobs = "/apis/batch/v1/namespaces/site-munich/jobs"
        started = await poll(lambda: site_cluster.list(jobs), lambda found: bool(found))
        await site_cluster.stop_operator(graceful=False)  # killed while the round's Job runs
        assert not started[0].get("status", {}).get("conditions"), "the Job ended before the operator was killed"
        await poll(lambda: site_cluster.list(jobs), lambda found: all(j.get("status", {}).get("conditions")
                                                                      for j in found))
        await site_cluster.start_operator()
        done = await cluster.wait_for("signs-restart", finished, timeout=200)
        assert done["status"]["phase"] == "Succeeded", (done["status"].get("reason"), done["status"].get("message"))
        fp = await site_cluster.wait_for("site-munich", "signs", lambda r: r.get("status", {}).get("phase")
                                         == "Completed")
        assert fp["status"]["roundsDone"] == 2
        assert sorted(site_cluster.runner.ran) == sorted(set(site_cluster.runner.ran))  # every task's Job ran once
        for round_number in (1, 2):
            key = f"{PREFIX}/{training_id}/sites/munich/round-{round_number:04d}/update-a1.safetensors"
            versions = admin.list_object_versions(Bucket=s3_server.bucket, Prefix=key).get("Versions", [])
            assert len([v for v in versions if v["Key"] == key]) == 1, versions
    finally:
        admin.put_bucket_versioning(Bucket=s3_server.bucket, VersioningConfiguration={"Status": "Suspended"})


async def poll(read: Callable[[], Awaitable[Any]], check: Callable[[Any], bool], timeout: float = 120) -> Any:
    """``await read()`` until ``check`` holds for what it returns (a deadline, not a sleep standing in)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = await read()
        if check(found):
            return found
        assert asyncio.get_running_loop().time() < deadline, f"timed out; last: {found}"
        await asyncio.sleep(0.1)
