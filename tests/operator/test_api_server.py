"""The test cluster's API server refuses what a real one refuses (so the operator tests fail where a cluster would)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import kmock
import pytest
import pytest_asyncio

from tests.apiserver_rules import label_errors, name_errors
from tests.operator.cluster import ApiServer
from tests.operator.conftest import NAMESPACE, TRAININGS, api_request, tiny_training

pytestmark = pytest.mark.timeout(60)
CORE = f"/api/v1/namespaces/{NAMESPACE}"


@dataclass
class Api:
    """The test cluster's API server alone: no Job runs here, so no Job runner (and no fork server) starts."""

    server: ApiServer
    session: aiohttp.ClientSession

    async def request(self, method: str, path: str, body: Any = None, status: int | None = None) -> dict[str, Any]:
        return await api_request(self.session, method, path, body, status)

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", f"{TRAININGS}?fieldValidation=Strict", manifest, status=200)


@pytest_asyncio.fixture
async def api() -> AsyncIterator[Api]:
    async with ApiServer() as server, kmock.Server(server) as http, \
            aiohttp.ClientSession(base_url=str(http.url).rstrip("/")) as session:
        yield Api(server, session)


async def first_events(stream: aiohttp.ClientResponse, count: int) -> list[tuple[str, str]]:
    """The first ``count`` events of a watch stream, as (type, object name)."""
    seen: list[tuple[str, str]] = []
    async for line in stream.content:
        if line.strip():
            event = json.loads(line)
            seen.append((event["type"], event["object"]["metadata"]["name"]))
        if len(seen) == count:
            break
    return seen


async def patch(api: Api, path: str, body: Any, status: int) -> dict[str, Any]:
    return await api.request("PATCH", path, body, status=status)


@pytest.mark.asyncio
async def test_unknown_fields_are_refused_when_strict_and_pruned_with_a_warning_otherwise(api: Api) -> None:
    manifest = tiny_training()
    manifest["spec"]["modell"] = {"architecture": "tiny_cnn"}
    refused = await api.request("POST", f"{TRAININGS}?fieldValidation=Strict", manifest, status=400)
    assert refused["message"].endswith('strict decoding error: unknown field "spec.modell"')
    async with api.session.post(TRAININGS, json=manifest) as response:  # no fieldValidation: the default, Warn
        assert response.status == 200
        assert response.headers.getall("Warning") == ['299 - "unknown field \\"spec.modell\\""']
        stored = await response.json()
    assert "modell" not in stored["spec"] and stored["spec"]["strategy"]["name"] == "fedavg"  # pruned, defaulted


@pytest.mark.asyncio
async def test_updates_go_through_the_schema_and_the_transition_rules(api: Api) -> None:
    created = await api.apply(tiny_training())
    path = f"{TRAININGS}/signs"
    refused = await patch(api, path, {"spec": {"rounds": 0}}, 422)
    assert refused["message"] == ('FederatedTraining.fedtrain.io "signs" is invalid: spec.rounds: Invalid value: 0: '
                                  "spec.rounds in body should be greater than or equal to 1")
    refused = await patch(api, path, {"spec": {"model": None}}, 422)  # removing it: the default differs
    assert 'spec.model: Invalid value: "object": spec.model is immutable' in refused["message"]
    changed = await api.request("PATCH", path, [{"op": "replace", "path": "/spec/rounds", "value": 3}],
                                    status=200)  # a JSON patch, through the same admission
    assert changed["spec"]["rounds"] == 3 and changed["metadata"]["generation"] == 2
    assert changed["spec"]["model"] == created["spec"]["model"]


@pytest.mark.asyncio
async def test_status_goes_through_its_schema_and_changes_nothing_else(api: Api) -> None:
    await api.apply(tiny_training())
    path = f"{TRAININGS}/signs/status"
    refused = await patch(api, path, {"status": {"accuracy": "high"}}, 422)
    assert 'status.accuracy: Invalid value: "string": status.accuracy in body must be of type number' in \
        refused["message"]
    stored = await patch(api, path, {"status": {"accuracy": 0.5}, "spec": {"rounds": 7}}, 200)
    assert stored["status"]["accuracy"] == 0.5 and stored["spec"]["rounds"] == 2
    assert stored["metadata"]["generation"] == 1


@pytest.mark.asyncio
async def test_a_name_over_the_crds_limit_is_refused_at_admission(api: Api) -> None:
    refused = await api.request("POST", TRAININGS, tiny_training("n" * 41), status=422)
    assert refused["message"].startswith(f'FederatedTraining.fedtrain.io "{"n" * 41}" is invalid: <nil>: '
                                         'Invalid value: "object": metadata.name must be at most 40 characters')


@pytest.mark.asyncio
async def test_labels_and_names_of_any_object_are_checked(api: Api) -> None:
    long = "y" * 64
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
             "metadata": {"name": "store", "labels": {"fedtrain.io/training": long}}}
    refused = await api.request("POST", f"{CORE}/persistentvolumeclaims", claim, status=422)
    assert refused["message"] == (f'PersistentVolumeClaim "store" is invalid: metadata.labels: Invalid value: '
                                  f'"{long}": must be no more than 63 characters')
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j" * 64},
           "spec": {"template": {"metadata": {"labels": {}}, "spec": {"containers": []}}}}
    refused = await api.request("POST", f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs", job, status=422)
    assert "spec.template.metadata.labels: Invalid value" in refused["message"]  # its Pods' job-name label
    account: dict[str, Any] = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "Worker"}}
    refused = await api.request("POST", f"{CORE}/serviceaccounts", account, status=422)
    assert "a lowercase RFC 1123 subdomain" in refused["message"]
    account["metadata"]["name"] = "worker"
    await api.request("POST", f"{CORE}/serviceaccounts", account, status=200)
    refused = await patch(api, f"{CORE}/serviceaccounts/worker", {"metadata": {"labels": {"bad key!": "x"}}},
                          422)
    assert "name part must consist of alphanumeric characters" in refused["message"]


@pytest.mark.asyncio
async def test_secrets_are_decoded_checked_and_immutable_once_marked(api: Api) -> None:
    secret: dict[str, Any] = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "keys"}, "type": "Opaque",
                              "immutable": True, "data": {"a.key": "AAAA", "b key": "AAAA"}}
    refused = await api.request("POST", f"{CORE}/secrets", secret, status=422)
    assert refused["message"].startswith('Secret "keys" is invalid: data[b key]: Invalid value: "b key": a valid '
                                         "config key must consist of alphanumeric characters")
    secret["data"] = {"a.key": "AA*A"}
    refused = await api.request("POST", f"{CORE}/secrets", secret, status=400)
    assert refused["message"] == ('Secret in version "v1" cannot be handled as a Secret: illegal base64 data at '
                                  "input byte 2")
    secret["data"] = {"a.key": "AAAA"}
    await api.request("POST", f"{CORE}/secrets", secret, status=200)
    refused = await patch(api, f"{CORE}/secrets/keys", {"data": {"a.key": "BBBB"}}, 422)
    assert refused["message"] == 'Secret "keys" is invalid: data: Forbidden: field is immutable when `immutable` is set'
    refused = await patch(api, f"{CORE}/secrets/keys", {"immutable": False}, 422)
    assert "immutable: Forbidden: field is immutable when `immutable` is set" in refused["message"]
    await patch(api, f"{CORE}/secrets/keys", {"metadata": {"labels": {"kept": "yes"}}}, 200)  # metadata may change


@pytest.mark.asyncio
async def test_a_jobs_volumes_and_mounts_are_checked(api: Api) -> None:
    def job(volumes: list[dict[str, Any]], mounts: list[dict[str, Any]]) -> dict[str, Any]:
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"}, "spec": {"template": {
            "metadata": {"labels": {}}, "spec": {"volumes": volumes, "containers": [
                {"name": "worker", "image": "w", "volumeMounts": mounts}]}}}}

    jobs = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs"
    secret = {"name": "keys", "secret": {"secretName": "s", "defaultMode": 0o1000,
                                         "items": [{"key": "a.key", "path": "../a.key"}]}}
    refused = await api.request("POST", jobs, job([secret, {"name": "keys", "emptyDir": {}}],
                                                  [{"name": "other", "mountPath": "/x"}]), status=422)
    message = refused["message"]
    assert 'spec.template.spec.volumes[0].secret.defaultMode: Invalid value: 512: must be a number between 0 and ' \
           "0777 (octal), both inclusive" in message
    assert 'spec.template.spec.volumes[0].secret.items[0].path: Invalid value: "../a.key": must not contain \'..\'' \
        in message
    assert 'spec.template.spec.volumes[1].name: Duplicate value: "keys"' in message
    assert 'spec.template.spec.containers[0].volumeMounts[0].name: Not found: "other"' in message
    secret["secret"] = {"secretName": "s", "defaultMode": 0o440, "items": [{"key": "a.key", "path": "a.key"}]}
    await api.request("POST", jobs, job([secret], [{"name": "keys", "mountPath": "/x", "readOnly": True}]), status=200)


@pytest.mark.parametrize(("labels", "fragment"), [
    ({"a": "v" * 63}, None),
    ({"a": "v" * 64}, "must be no more than 63 characters"),
    ({"a": "-v"}, "a valid label must be an empty string"),
    ({"a": ""}, None),
    ({"example.com/" + "k" * 63: "v"}, None),
    ({"k" * 64: "v"}, "name part must be no more than 63 characters"),
    ({"Example.com/k": "v"}, "prefix part a lowercase RFC 1123 subdomain"),
])
def test_label_rules(labels: dict[str, str], fragment: str | None) -> None:
    problems = [str(e) for e in label_errors(labels)]
    assert (problems == []) if fragment is None else any(fragment in p for p in problems), problems


def test_name_rules() -> None:
    assert name_errors("ConfigMap", "a." * 126 + "b") == []  # 253 characters
    assert [e.detail for e in name_errors("ConfigMap", "a" * 254)] == ["must be no more than 253 characters"]
    assert [e.detail for e in name_errors("Namespace", "a" * 64)] == ["must be no more than 63 characters"]
    assert name_errors("Namespace", "a.b")[0].detail.startswith("a lowercase RFC 1123 label")


async def _exists(api: Api, path: str) -> bool:
    async with api.session.get(path) as response:
        return response.status == 200


@pytest.mark.asyncio
async def test_the_garbage_collector_removes_dependents_down_the_chain(api: Api) -> None:
    manifest = tiny_training()
    manifest["metadata"]["finalizers"] = ["fedtrain.io/finalizer"]
    training = await api.apply(manifest)

    def owned_by(owner: dict[str, Any]) -> list[dict[str, Any]]:
        meta = owner["metadata"]
        return [{"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": meta["name"], "uid": meta["uid"]}]

    job = await api.request("POST", f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs", {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "signs-init", "ownerReferences": owned_by(training)},
        "spec": {"template": {"metadata": {"labels": {}}, "spec": {"containers": []}}}}, status=200)
    pod: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod", "spec": {"containers": []},
                           "metadata": {"name": "signs-init-x1", "ownerReferences": owned_by(job)}}
    await api.request("POST", f"{CORE}/pods", pod, status=200)
    job_path, pod_path = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/signs-init", f"{CORE}/pods/signs-init-x1"

    await api.request("DELETE", f"{TRAININGS}/signs", status=200)  # held by its finalizer: nothing goes yet
    assert await _exists(api, f"{TRAININGS}/signs") and await _exists(api, job_path) and await _exists(api, pod_path)
    await patch(api, f"{TRAININGS}/signs", {"metadata": {"finalizers": []}}, 200)  # released: the chain goes
    assert not await _exists(api, f"{TRAININGS}/signs")
    assert not await _exists(api, job_path) and not await _exists(api, pod_path)

    pod["metadata"]["name"] = "signs-init-x2"  # made for the Job a moment after it went: collected at once
    await api.request("POST", f"{CORE}/pods", pod, status=200)
    assert not await _exists(api, f"{CORE}/pods/signs-init-x2")
    assert [p["metadata"]["name"] for p in (await api.request("GET", f"{CORE}/pods"))["items"]] == []


@pytest.mark.asyncio
async def test_a_watch_sends_what_exists_then_each_change_its_selector_matches(api: Api) -> None:
    def config_map(name: str, app: str) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": {"app": app}}}

    await api.request("POST", f"{CORE}/configmaps", config_map("before", "a"), status=200)
    await api.request("POST", f"{CORE}/configmaps", config_map("other", "b"), status=200)
    async with api.session.get(f"{CORE}/configmaps", params={"watch": "true", "labelSelector": "app=a"}) as stream:
        await api.request("POST", f"{CORE}/configmaps", config_map("skipped", "b"), status=200)
        await api.request("POST", f"{CORE}/configmaps", config_map("after", "a"), status=200)
        await api.request("DELETE", f"{CORE}/configmaps/before", status=200)
        seen = await first_events(stream, 3)
    assert seen == [("ADDED", "before"), ("ADDED", "after"), ("DELETED", "before")]


@pytest.mark.asyncio
async def test_lists_and_watches_select_by_name_and_refuse_other_fields(api: Api) -> None:
    for name in ("fedtrain-worker", "default"):
        await api.request("POST", f"{CORE}/serviceaccounts",
                          {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}}, status=200)
    listed = await api.request("GET", "/api/v1/serviceaccounts?fieldSelector=metadata.name%3Dfedtrain-worker")
    assert [a["metadata"]["name"] for a in listed["items"]] == ["fedtrain-worker"]
    others = await api.request("GET", f"{CORE}/serviceaccounts?fieldSelector=metadata.name!%3Dfedtrain-worker")
    assert [a["metadata"]["name"] for a in others["items"]] == ["default"]
    refused = await api.request("GET", f"{CORE}/serviceaccounts?fieldSelector=secrets.name%3Dx", status=400)
    assert refused["reason"] == "BadRequest" and refused["message"] == "field label not supported: secrets.name"
    await api.request("GET", f"{CORE}/serviceaccounts?fieldSelector=metadata.name", status=400)
    async with api.session.get(f"{CORE}/serviceaccounts",
                               params={"watch": "true", "fieldSelector": "metadata.name=fedtrain-worker"}) as stream:
        await api.request("DELETE", f"{CORE}/serviceaccounts/default", status=200)
        await api.request("DELETE", f"{CORE}/serviceaccounts/fedtrain-worker", status=200)
        seen = await first_events(stream, 2)
    assert seen == [("ADDED", "fedtrain-worker"), ("DELETED", "fedtrain-worker")]
