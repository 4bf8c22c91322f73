"""Jobs built for engine tasks, and observations read back from Jobs and Pods, as plain data."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import pytest

from fedtrain.engine.status import Task
from fedtrain.operator.jobs import (
    MAX_NAME,
    Owner,
    claim_manifest,
    claim_name,
    cleanup_job_manifest,
    job_manifest,
    job_name,
    observe,
    placement,
    secure_clients,
    secure_secret_manifest,
    training_selector,
)
from fedtrain.spec import parse_spec
from fedtrain.tasks import worker_arguments

SPEC = parse_spec({
    "roundDeadlineSeconds": 900,
    "clients": {"list": [{"name": "munich", "resources": {"limits": {"nvidia.com/gpu": 1}},
                          "nodeSelector": {"gpu": "a100"}}, {"name": "berlin"}]},
    "worker": {"image": "registry.local/fedtrain/worker:1", "resources": {"requests": {"cpu": "1"}},
               "tolerations": [{"key": "fl", "operator": "Exists"}]},
})
OWNER = Owner("signs", "team-a", "4f1c-uid")


def test_names_are_deterministic_and_fit_63_characters() -> None:
    assert job_name("signs", "r0001-munich-a1") == "signs-r0001-munich-a1"
    long = job_name("a" * 40, "r0001-" + "b" * 40 + "-a1")
    assert len(long) <= MAX_NAME and long == job_name("a" * 40, "r0001-" + "b" * 40 + "-a1")
    assert long != job_name("a" * 40, "r0001-" + "b" * 40 + "-a2")  # attempts stay distinct after cutting


def test_client_job_has_owner_labels_scheduling_storage_and_deadline() -> None:
    task = Task("r0002-munich-a1", "train", 2, "munich")
    job = job_manifest(task, SPEC, OWNER, ["train", "--round", "2"], "fl-store")
    meta, pod = job["metadata"], job["spec"]["template"]["spec"]
    assert meta["name"] == "signs-r0002-munich-a1" and meta["namespace"] == "team-a"
    # An Istio sidecar (Kubeflow profile namespaces inject one) would keep the Job from ever completing.
    assert job["spec"]["template"]["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    assert meta["ownerReferences"] == [{"apiVersion": "fedtrain.io/v1alpha1", "kind": "FederatedTraining",
                                        "name": "signs", "uid": "4f1c-uid", "controller": True,
                                        "blockOwnerDeletion": True}]
    assert meta["labels"]["fedtrain.io/training"] == "signs" and meta["labels"]["fedtrain.io/client"] == "munich"
    assert meta["labels"]["fedtrain.io/round"] == "2" and meta["annotations"]["fedtrain.io/task-id"] == task.id
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] == 900
    container = pod["containers"][0]
    assert container["args"] == ["train", "--round", "2"] and container["image"] == "registry.local/fedtrain/worker:1"
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 1}}  # the client's own, not the default
    assert pod["nodeSelector"] == {"gpu": "a100"} and pod["tolerations"] == [{"key": "fl", "operator": "Exists"}]
    assert pod["volumes"][0] == {"name": "store", "persistentVolumeClaim": {"claimName": "fl-store"}}
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert pod["automountServiceAccountToken"] is False and pod["serviceAccountName"] == "fedtrain-worker"


def test_aggregation_job_uses_defaults_and_has_no_deadline() -> None:
    job = job_manifest(Task("r0002-aggregate-a1", "aggregate", 2), SPEC, OWNER, ["aggregate"], "fl-store")
    assert "activeDeadlineSeconds" not in job["spec"]
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"] == {"requests": {"cpu": "1"}}
    assert "fedtrain.io/client" not in job["metadata"]["labels"]


SECURE = parse_spec({
    "clients": {"list": [{"name": "munich"}, {"name": "berlin"},
                         {"name": "hamburg", "namespace": "city-hamburg", "data": {"claimName": "signs"}}]},
    "privacy": {"clipNorm": 5.0, "secureAggregation": {"threshold": 2}},
    "storage": {"s3": {"bucket": "weights", "credentialsSecret": {"name": "s3"}}},
    "mlflow": {"trackingUri": "http://mlflow:5000"},
})


def secret_volumes(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in job["spec"]["template"]["spec"]["volumes"] if "secret" in v]


@pytest.mark.parametrize("kind", ["train", "keys", "shares", "unmask"])
@pytest.mark.parametrize(("client", "namespace", "secret"), [("munich", "team-a", "signs-secure"),
                                                             ("hamburg", "city-hamburg", "team-a-signs-secure")])
def test_a_secure_clients_jobs_mount_its_own_key_read_only_where_its_arguments_look(
        kind: Literal["train", "keys", "shares", "unmask"], client: str, namespace: str, secret: str) -> None:
    task = Task(f"x0003-{client}-a1", kind, 3, client)
    arguments = worker_arguments(task, SECURE, placement(SECURE, OWNER))
    job = job_manifest(task, SECURE, OWNER, arguments, None)
    assert job["metadata"]["namespace"] == namespace  # a client's stages run where it trains, beside its key
    pod = job["spec"]["template"]["spec"]
    assert secret_volumes(job) == [{"name": "secure-secret", "secret": {
        "secretName": secret, "defaultMode": 0o440, "items": [{"key": f"{client}.key", "path": f"{client}.key"}]}}]
    mounts = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "secure-secret"]
    assert mounts == [{"name": "secure-secret", "mountPath": "/var/run/fedtrain/secure", "readOnly": True}]
    path = arguments[arguments.index("--secret-file") + 1]
    assert path == f"{mounts[0]['mountPath']}/{client}.key" and "--secret-provided" in arguments
    # Root-owned, group fsGroup, mode 0440: the worker (uid and gid 1000) reads it through its group alone.
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"] == 1000
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("task", [Task("init-a1", "init"), Task("r0003-aggregate-a1", "aggregate", 3),
                                  Task("finalize-a1", "finalize", 3)])
def test_no_secret_is_mounted_by_the_training_s_own_jobs(task: Task) -> None:
    job = job_manifest(task, SECURE, OWNER, worker_arguments(task, SECURE, placement(SECURE, OWNER),
                                                             {"munich": 1}), None)
    assert secret_volumes(job) == [] and job["metadata"]["namespace"] == "team-a"
    assert "--secret-file" not in job["spec"]["template"]["spec"]["containers"][0]["args"]


def test_a_plain_trainings_client_mounts_no_secret() -> None:
    assert secret_volumes(job_manifest(Task("r0002-munich-a1", "train", 2, "munich"), SPEC, OWNER, [], "s")) == []
    assert secure_clients(SPEC, OWNER) == {}


def test_one_secret_per_namespace_holds_a_key_per_client_there_owned_or_labelled() -> None:
    assert secure_clients(SECURE, OWNER) == {"team-a": ["munich", "berlin"], "city-hamburg": ["hamburg"]}
    own = secure_secret_manifest(OWNER, "team-a", {"munich": b"m" * 32, "berlin": b"b" * 32})
    assert own["immutable"] is True and own["type"] == "Opaque"
    assert own["metadata"]["name"] == "signs-secure" and own["metadata"]["namespace"] == "team-a"
    assert own["data"] == {"berlin.key": "YmJi" * 10 + "YmI=", "munich.key": "bW1t" * 10 + "bW0="}
    assert own["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    assert own["metadata"]["labels"] == {"fedtrain.io/training": "signs", "app.kubernetes.io/managed-by":
                                         "fedtrain-operator", "fedtrain.io/training-uid": OWNER.uid}
    foreign = secure_secret_manifest(OWNER, "city-hamburg", {"hamburg": b"h" * 32})
    assert "ownerReferences" not in foreign["metadata"]  # owners cannot cross namespaces: the finalizer deletes it
    assert foreign["metadata"]["name"] == "team-a-signs-secure"
    assert foreign["metadata"]["labels"]["fedtrain.io/training-namespace"] == "team-a"
    with_a_site = parse_spec({**SECURE.model_dump(by_alias=True, exclude_none=True), "clients": {"list": [
        {"name": "munich"}, {"name": "berlin"}, {"name": "far", "site": {}}]}})
    assert secure_clients(with_a_site, OWNER) == {"team-a": ["munich", "berlin"]}  # a site keeps its own secret


def job(condition: str | None, reason: str = "", message: str = "") -> dict:
    conditions = [{"type": condition, "status": "True", "reason": reason, "message": message}] if condition else []
    return {"status": {"conditions": conditions}}


def pod(state: dict | None = None, scheduled: dict | None = None) -> dict:
    status: dict = {"containerStatuses": [{"name": "worker", "state": state or {}}]}
    if scheduled:
        status["conditions"] = [scheduled]
    return {"status": status}


def test_completed_job_gives_the_termination_message() -> None:
    result = {"round": 2, "accuracy": 0.8, "accepted": ["munich"]}
    seen = observe(job("Complete"), [pod({"terminated": {"exitCode": 0, "message": json.dumps(result)}})])
    assert seen.state == "succeeded" and seen.output == result


@pytest.mark.parametrize(("the_job", "the_pod", "code", "reason"), [
    (job("Failed", "BackoffLimitExceeded"), pod({"terminated": {"exitCode": 3, "reason": "Error",
                                                                "message": "GT-00007.csv: missing"}}),
     3, "GT-00007.csv: missing"),
    (job("Failed", "BackoffLimitExceeded"), pod({"terminated": {"exitCode": 137, "reason": "OOMKilled"}}),
     137, "OOMKilled"),
    (job("Failed", "DeadlineExceeded", "Job was active longer than specified deadline"), pod(),
     None, "DeadlineExceeded: Job was active longer than specified deadline"),
])
def test_failed_jobs_carry_exit_code_and_reason(the_job: dict, the_pod: dict, code: int | None, reason: str) -> None:
    seen = observe(the_job, [the_pod])
    assert seen.state == "failed" and seen.exit_code == code and seen.reason == reason


def test_image_pull_errors_fail_the_task_instead_of_waiting_forever() -> None:
    seen = observe(job(None), [pod({"waiting": {"reason": "ImagePullBackOff", "message": "not found"}})])
    assert seen.state == "failed" and seen.reason == "ImagePullBackOff: not found"


def test_unschedulable_pods_keep_running_with_the_reason() -> None:
    scheduled = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": "0/3 nodes have enough nvidia.com/gpu"}
    seen = observe(job(None), [pod(scheduled=scheduled)])
    assert seen.state == "running" and seen.reason == "Unschedulable: 0/3 nodes have enough nvidia.com/gpu"
    assert observe(job(None), []).state == "running"


def test_profile_defaults_fill_only_what_a_spec_leaves_out() -> None:
    from fedtrain.operator.profiles import apply_defaults

    defaults = {"storageClaim": "fedtrain-store", "mlflowExperiment": "team-a/{training}",
                "mlflowTrackingUri": "http://mlflow:5000"}
    filled = apply_defaults({"clients": {"count": 2}, "storage": {"reclaimPolicy": "Delete"}}, defaults, "signs")
    assert filled["storage"] == {"reclaimPolicy": "Delete", "persistentVolumeClaim": {"claimName": "fedtrain-store"}}
    assert filled["mlflow"] == {"experiment": "team-a/signs", "trackingUri": "http://mlflow:5000"}
    own = {"clients": {"count": 2}, "storage": {"create": {"size": "1Gi"}},
           "mlflow": {"experiment": "mine", "trackingUri": "http://other"}}
    assert apply_defaults(own, defaults, "signs") == own
    in_a_bucket = {"clients": {"count": 2}, "storage": {"s3": {"bucket": "weights"}}}
    assert apply_defaults(in_a_bucket, defaults, "signs")["storage"] == in_a_bucket["storage"]  # no claim beside it
    image = {"workerImage": "registry.example/worker:1"}
    assert apply_defaults({"worker": {"image": None}}, image, "signs")["worker"]["image"] == "registry.example/worker:1"
    assert apply_defaults({"worker": {"image": "mine:2"}}, image, "signs")["worker"]["image"] == "mine:2"
    assert apply_defaults({"clients": {"count": 2}}, {}, "signs") == {"clients": {"count": 2}}


def test_profile_provisioning_from_annotations() -> None:
    from fedtrain.operator.profiles import provision

    profile = {"metadata": {"name": "team-a", "uid": "p-uid", "annotations": {
        "fedtrain.io/storage-size": "50Gi", "fedtrain.io/storage-access-mode": "ReadWriteMany",
        "fedtrain.io/mlflow-experiments": "sometimes"}}}
    wanted = provision(profile)
    assert wanted.namespace == "team-a"
    assert [o["kind"] for o in wanted.objects] == ["ServiceAccount", "PersistentVolumeClaim", "ConfigMap"]
    assert wanted.objects[1]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert wanted.objects[2]["data"] == {"storageClaim": "fedtrain-store"}
    assert wanted.problems == ["fedtrain.io/mlflow-experiments: 'sometimes' is not 'per-training'; trainings keep "
                               "their own experiment"]
    assert all(o["metadata"]["ownerReferences"][0]["uid"] == "p-uid" and o["metadata"]["namespace"] == "team-a"
               for o in wanted.objects)


LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@pytest.mark.parametrize("name", ["s", "a" * 40, "b" * 63, "c" * 64, "d-" * 120 + "e", "x." * 126 + "y"])
def test_every_derived_name_and_label_fits_whatever_the_trainings_name(name: str) -> None:
    """Admission refuses names over 40 characters, but a name longer than that must still give valid objects."""
    spec = parse_spec({"clients": {"list": [{"name": "c" * 40, "namespace": "n" * 63, "data": {"claimName": "d"}},
                                            {"name": "local"}]},
                       "storage": {"s3": {"bucket": "weights", "credentialsSecret": {"name": "s3"}}},
                       "mlflow": {"trackingUri": "http://mlflow:5000"}})
    created = parse_spec({"clients": {"count": 2}, "storage": {"create": {"size": "1Gi"}}})
    owner = Owner(name, "m" * 63, "0b7e1a52-6c1f-4a8e-9a57-3c0f1f6a2b11")
    manifests = [job_manifest(Task(f"r9999-{'c' * 40}-a10", "train", 9999, "c" * 40, 10), spec, owner, [], None),
                 job_manifest(Task("r9999-aggregate-a10", "aggregate", 9999, None, 10), spec, owner, [], None),
                 claim_manifest(created, owner), cleanup_job_manifest(created, owner, claim_name(created, owner.name)),
                 secure_secret_manifest(owner, owner.namespace, {"local": bytes(32)}),
                 secure_secret_manifest(owner, "n" * 63, {"c" * 40: bytes(32)})]
    for manifest in manifests:
        meta = manifest["metadata"]
        assert len(meta["name"]) <= MAX_NAME and LABEL_VALUE.match(meta["name"]), meta["name"]
        for value in [*meta["labels"].values(), *training_selector(owner).values()]:
            assert len(value) <= MAX_NAME and LABEL_VALUE.match(value), value
    job = manifests[0]
    assert job["spec"]["template"]["metadata"]["labels"] == job["metadata"]["labels"]
    assert job["metadata"]["annotations"]["fedtrain.io/training"] == name  # the whole name, for the wake-up
    assert training_selector(owner).items() <= job["metadata"]["labels"].items()
