"""A test cluster: kmock's Kubernetes emulator made closer to a real API server, and a Job runner.

`ApiServer` fills in what kmock 0.8 leaves out and the operator relies on a real server for:
uid, resourceVersion and generation; ``generateName``; 409 on a stale ``resourceVersion`` in a
patch; the status subresource (a patch to ``/status`` changes only status, a patch to the object
never changes status); label selectors on lists; and the garbage collector (deleting an owner
deletes its dependents). It is as strict as a real API server where kmock accepts anything
(`tests.apiserver_rules`): every write of a FederatedTraining is admitted against the checked-in
CRD (unknown fields refused with ``fieldValidation=Strict``, else pruned; defaults; the OpenAPI
schema; CEL rules, transition rules against the stored object), and every object's name, labels
and annotations are validated, with the real server's 400/422 answers. These are fixture-side
workarounds: product code speaks plain Kubernetes.

`JobRunner` plays the job controller and the kubelet: for every Job its watch reports it creates the
Pod, runs the container's command as a local process (through the same fork server as `fedtrain
run`) with ``/store`` mapped to a directory and secret volumes written as the kubelet writes them
(`tests.operator.secret_volumes`), and reports Pod and Job status, termination message
included, back through the API as the real ones would, as soon as the process exits. ``sabotage``
makes chosen Jobs fail or hang.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import re
import shutil
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import jsonpatch
import kmock
from kmock._internal import apps, dicts, dsl, enums, rendering

from fedtrain.contract.errors import EXIT_INTERNAL
from fedtrain.local.executor import ForkServer
from tests.apiserver_rules import Refused, admit, load_crd, refuse_object
from tests.containers.kubelet import Kubelet, own_volume
from tests.operator import secret_volumes

RESOURCES = {
    "fedtrain.io/v1alpha1/federatedtrainings": kmock.ResourceInfo(
        kind="FederatedTraining", singular="federatedtraining", namespaced=True, shortnames={"ft"},
        subresources={"status"}, verbs={"create", "delete", "get", "list", "patch", "update", "watch"}),
    "fedtrain.io/v1alpha1/federatedparticipations": kmock.ResourceInfo(
        kind="FederatedParticipation", singular="federatedparticipation", namespaced=True, shortnames={"fp"},
        subresources={"status"}, verbs={"create", "delete", "get", "list", "patch", "update", "watch"}),
    "batch/v1/jobs": kmock.ResourceInfo(kind="Job", singular="job", namespaced=True, subresources={"status"},
                                        verbs={"create", "delete", "get", "list", "patch", "watch"}),
    "v1/pods": kmock.ResourceInfo(kind="Pod", singular="pod", namespaced=True, subresources={"status"},
                                  verbs={"create", "delete", "get", "list", "patch", "watch"}),
    "v1/events": kmock.ResourceInfo(kind="Event", singular="event", namespaced=True,
                                    verbs={"create", "get", "list", "watch"}),
    "v1/serviceaccounts": kmock.ResourceInfo(kind="ServiceAccount", singular="serviceaccount", namespaced=True,
                                             verbs={"create", "delete", "get", "list", "patch", "watch"}),
    "v1/persistentvolumeclaims": kmock.ResourceInfo(kind="PersistentVolumeClaim", singular="persistentvolumeclaim",
                                                    namespaced=True,
                                                    verbs={"create", "delete", "get", "list", "watch"}),
    "v1/configmaps": kmock.ResourceInfo(kind="ConfigMap", singular="configmap", namespaced=True,
                                        verbs={"create", "delete", "get", "list", "patch", "watch"}),
    "kubeflow.org/v1/profiles": kmock.ResourceInfo(kind="Profile", singular="profile", namespaced=False,
                                                   verbs={"create", "delete", "get", "list", "patch", "watch"}),
    # kopf waits for namespaces to be discoverable even when it watches cluster-wide (and then never lists them).
    "v1/namespaces": kmock.ResourceInfo(kind="Namespace", singular="namespace", namespaced=False,
                                        verbs={"get", "list", "watch"}),
    "v1/secrets": kmock.ResourceInfo(kind="Secret", singular="secret", namespaced=True,
                                     verbs={"create", "delete", "get", "list", "patch"}),
    "apiextensions.k8s.io/v1/customresourcedefinitions": kmock.ResourceInfo(
        kind="CustomResourceDefinition", singular="customresourcedefinition", namespaced=False,
        verbs={"get", "list", "watch"}),
}
STATUS_RESOURCES = ("federatedtrainings", "federatedparticipations", "jobs", "pods")
PARTICIPATION_CRD = Path(__file__).parents[2] / "crds" / "federatedparticipations.fedtrain.io.yaml"
Key = tuple[Any, Any, Any]  # (resource, namespace or None, name): where kmock stores an object
WRITES = (enums.action.CREATE, enums.action.UPDATE, enums.action.DELETE)


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def matches(selector: str, labels: dict[str, str]) -> bool:
    """Equality-based label selectors (``a=b,c``), as the operator uses them."""
    for term in filter(None, selector.split(",")):
        key, sep, value = term.partition("=")
        if (sep and labels.get(key) != value) or (not sep and key not in labels):
            return False
    return True


# The field labels every resource can be selected by (apimachinery's DefaultMetaV1FieldSelectorConversion);
# some kinds add their own (a Pod's spec.nodeName, status.phase), which nothing here asks for.
FIELD_LABELS = ("metadata.name", "metadata.namespace")
FIELD_TERM = re.compile(r"^([^=!]+)(==|=|!=)(.*)$")


def field_selector_problem(selector: str) -> str | None:
    """The API server's 400 message for a field selector it cannot serve, or None."""
    for term in filter(None, selector.split(",")):
        parsed = FIELD_TERM.match(term)
        if parsed is None:
            return f"invalid selector: '{selector}'; can't understand '{term}'"
        if parsed.group(1) not in FIELD_LABELS:
            return f"field label not supported: {parsed.group(1)}"
    return None


def fields_match(selector: str, metadata: dict[str, Any]) -> bool:
    """Field selectors over ``metadata.name`` and ``metadata.namespace`` (``=``, ``==``, ``!=``)."""
    for term in filter(None, selector.split(",")):
        parsed = FIELD_TERM.match(term)
        assert parsed is not None  # refused before (field_selector_problem)
        key, operator, value = parsed.groups()
        if (str(metadata.get(key.split(".", 1)[1]) or "") == value) == (operator == "!="):
            return False
    return True


def selected(request: rendering.Request, metadata: dict[str, Any]) -> bool:
    """Whether an object's metadata meets the request's label and field selectors."""
    return matches(request.params.get("labelSelector") or "", metadata.get("labels") or {}) and \
        fields_match(request.params.get("fieldSelector") or "", metadata)


class _FilterDispatch(apps.RawHandler):
    """kmock's choice of the reaction that serves a request, in time that does not grow with the requests served.

    kmock 0.8 asks whether a reaction sees a request by running every request the server has recorded
    through the reaction's filters until it meets this one, for each reaction: a request costs time in
    proportion to all before it (under a profiler, 0.18 s each on average over a run's first 500). For a
    chain of plain filters (all this server registers) the answer is the filters' criteria on this one
    request; anything else (slices, groups of views) keeps kmock's own check.
    """

    __slots__ = ()

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        registered = tuple(map(id, self._payloads))
        cached = self.__dict__.get("_payload_order")
        if cached is None or cached[0] != registered:  # reactions change rarely; their order costs a walk each
            cached = self.__dict__["_payload_order"] = (registered, _by_priority(self._payloads))
        for payload in cached[1]:
            if payload._disabled.is_set() or not _sees(payload._source, request):
                continue
            try:
                return await payload(request)
            except rendering.ReactionMismatchError:  # either mismatch or depletion
                payload._disabled.set()
            except NotImplementedError:  # matched, but nothing to respond with
                pass
        raise NotImplementedError("no reaction matches the request")


class ApiServer(kmock.KubernetesEmulator, _FilterDispatch):
    """kmock's emulator with the real API server's bookkeeping and admission (see the module docstring)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.versions = itertools.count(1)
        for key, info in RESOURCES.items():
            self.resources[key] = info
        # plural -> the CRD its writes are admitted against
        self.crds = {"federatedtrainings": load_crd(), "federatedparticipations": load_crd(PARTICIPATION_CRD)}
        self.warnings: list[str] = []  # what Warn field validation told clients (unknown fields pruned)
        self.refusals: list[str] = []  # every 400/422 admission answered, for a test to read
        self._writes = asyncio.Lock()

    def _current(self, request: rendering.Request) -> dict[str, Any] | None:
        obj = self._stored(request.resource, request.namespace, request.name)
        return None if obj is None or obj.deleted else dict(obj.raw)

    async def _handle(self, request: rendering.Request) -> Any:
        namespace_answer = self._namespaces(request)
        if namespace_answer is not None:
            return aiohttp.web.json_response(namespace_answer)
        problem = field_selector_problem(request.params.get("fieldSelector") or "")
        if problem is not None:
            raise kmock.KubernetesError(400, "BadRequest", problem)
        if request.resource is None or request.action not in WRITES:
            return await self._serve(request)
        # One write at a time, as etcd's compare-and-swap would: each is admitted against the object it replaces
        # (a deletion too, or a patch computed before it could overwrite its deletionTimestamp).
        async with self._writes:
            if request.action == enums.action.DELETE or request.data is None:
                return await self._serve(request)
            told = len(self.warnings)
            try:
                admitted = self._admit(request)
            except Refused as refused:
                if refused.code in (400, 422):
                    self.refusals.append(refused.message)
                raise kmock.KubernetesError(refused.code, refused.reason, refused.message,
                                            refused.status(*self._kind(request), request.name or "")) from refused
            response = await self._serve(admitted)
            for warning in self.warnings[told:]:  # how the real server words them (RFC 7234 warn-code 299)
                response.headers.add("Warning", f"299 - {json.dumps(warning)}")
            return response

    async def _serve(self, request: rendering.Request) -> Any:
        before = self._current(request) if request.name and request.action in WRITES else None
        try:
            return await super()._handle(request)
        finally:
            if request.resource is not None and request.action in WRITES:
                await self._after_write(request, before)

    def _kind(self, request: rendering.Request) -> tuple[str, str]:
        """The request's kind and API group (``""`` for the core group)."""
        assert request.resource is not None
        for key, info in RESOURCES.items():
            if key.rsplit("/", 1)[-1] == request.resource.plural:
                return str(info.kind), key.split("/")[0] if key.count("/") == 2 else ""
        return str(request.resource.plural), ""

    def _admit(self, request: rendering.Request) -> rendering.Request:
        """The request as the server carries it out: custom resources admitted whole, names and labels checked."""
        assert request.resource is not None
        kind, group = self._kind(request)
        crd = self.crds.get(str(request.resource.plural))
        if request.action == enums.action.CREATE and isinstance(request.data, dict):
            self._on_create(request)
            if crd is not None:
                return _with_data(request, self._admit_custom(crd, request, None, request.data))
            refuse_object(kind, group, request.data)
            return request
        current = self._current(request)
        if current is None:
            return request  # kmock answers 404
        if crd is not None:
            candidate = self._patched(current, request)
            replaced = self._admit_custom(crd, request, current, candidate)
            return _with_data(request, [{"op": "replace", "path": "", "value": replaced}])
        if isinstance(request.data, dict):
            self._on_patch(request)
        elif isinstance(request.data, list):
            self._on_json_patch(request)
        refuse_object(kind, group, dict(dicts.patch_dict(current, request.data)), current)
        return request

    def _patched(self, current: dict[str, Any], request: rendering.Request) -> dict[str, Any]:
        """The object a patch asks for (409 on a stale resourceVersion; 422 on a failed JSON-patch test)."""
        if isinstance(request.data, list):
            try:
                return dict(jsonpatch.apply_patch(current, request.data, in_place=False))
            except jsonpatch.JsonPatchException as failed:
                raise Refused(422, "Invalid", f"the server rejected our request due to an error in our request: "
                                              f"{failed}") from failed
        self._check_version(current, request.data)
        return dict(dicts.patch_dict(current, request.data))

    def _admit_custom(self, crd: dict[str, Any], request: rendering.Request, current: dict[str, Any] | None,
                      candidate: dict[str, Any]) -> dict[str, Any]:
        """`admit`, then the bookkeeping: a new resourceVersion, and a new generation when more than meta changed."""
        warnings: list[str] = []
        admitted = admit(crd, candidate, current, request.params.get("fieldValidation", "Warn"),
                         request.subresource, warnings)
        self.warnings += warnings
        if current is not None:
            meta = admitted["metadata"]
            for key in ("uid", "creationTimestamp", "generation", "namespace", "name"):
                if key in current["metadata"]:
                    meta[key] = current["metadata"][key]
            meta["resourceVersion"] = str(next(self.versions))
            if _content(admitted) != _content(current):
                meta["generation"] = int(current["metadata"].get("generation", 1)) + 1
        return admitted

    @property
    def namespace_objects(self) -> dict[str, dict[str, Any]]:
        """Namespaces by name (see `_namespaces`)."""
        found: dict[str, dict[str, Any]] = self.__dict__.setdefault("_namespace_objects", {})
        return found

    def add_namespace(self, namespace: dict[str, Any]) -> None:
        """What ``kubectl create namespace`` would do (the fixture's way around kmock)."""
        namespace["metadata"].update(uid=str(uuid.uuid4()), resourceVersion=str(next(self.versions)))
        self.namespace_objects[namespace["metadata"]["name"]] = namespace

    def _namespaces(self, request: rendering.Request) -> dict[str, Any] | None:
        """Namespaces by name: kmock 0.8 reads ``/api/v1/namespaces[/x]`` as a namespace prefix and fails.

        Worked around here, in the fixture: tests add them with `add_namespace` (kmock cannot even
        parse the POST), and GET reads one (the operator only reads them).
        """
        parts = request.url.path.strip("/").split("/")
        if parts[:3] != ["api", "v1", "namespaces"] or len(parts) > 4:
            return None
        known = self.namespace_objects
        if len(parts) == 4 and parts[3] in known and request.method == enums.method.GET:
            return known[parts[3]]
        if len(parts) == 4 and request.method == enums.method.GET:
            raise kmock.KubernetesError(404, "NotFound", f'namespaces "{parts[3]}" not found')
        return None

    def _on_create(self, request: rendering.Request) -> None:
        meta = request.data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        meta.setdefault("namespace", request.namespace)
        meta.update(uid=str(uuid.uuid4()), resourceVersion=str(next(self.versions)), generation=1,
                    creationTimestamp=now())

    @staticmethod
    def _check_version(current: dict[str, Any], patch: dict[str, Any]) -> None:
        wanted = (patch.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and wanted != current["metadata"].get("resourceVersion"):
            raise Refused(409, "Conflict", f"the object has been modified; please apply your changes to the latest "
                                           f"version (have {wanted}, is {current['metadata'].get('resourceVersion')})")

    def _on_patch(self, request: rendering.Request) -> None:
        current = self._current(request)
        if current is None:
            return  # kmock answers 404
        patch = request.data
        self._check_version(current, patch)
        plural = request.resource.plural if request.resource else None
        if request.subresource == "status":
            for key in list(patch):
                if key != "status":
                    del patch[key]
        elif plural in STATUS_RESOURCES:
            patch.pop("status", None)
        meta = patch.setdefault("metadata", {})
        meta["resourceVersion"] = str(next(self.versions))
        if "spec" in patch and request.subresource != "status":
            meta["generation"] = int(current["metadata"].get("generation", 1)) + 1

    def _on_json_patch(self, request: rendering.Request) -> None:
        """RFC 6902: a failed ``test`` is 422 (kopf tests resourceVersion this way); else a new version."""
        current = self._current(request)
        if current is None:
            return
        for op in [o for o in request.data if o.get("op") == "test"]:
            value: Any = current
            for part in op["path"].strip("/").split("/"):
                value = value.get(part) if isinstance(value, dict) else None
            if value != op.get("value"):
                raise Refused(422, "Invalid", f"the server rejected our request due to an error in our request: "
                                              f"test failed at {op['path']}")
            request.data.remove(op)
        request.data.append({"op": "replace", "path": "/metadata/resourceVersion", "value": str(next(self.versions))})

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[Any]:
        """Every object as ADDED, then every change, with nothing lost in between, filtered by the selectors.

        kmock 0.8 joins the change stream only after sending the snapshot, so a change made while the
        snapshot was being sent never reached the watcher (a Job created then was never run). Here the
        position in the stream is taken under the same lock as the snapshot, as a real server's
        resourceVersion would.
        """
        assert request.resource is not None
        bus = self._buses[request.resource]
        async with self._lock:
            marker = await bus.mark()
            snapshot = [obj.raw for (resource, namespace, name), obj in self.objects.items()
                        if resource == request.resource and not obj.deleted and _watched(request, namespace, name)]
        try:
            yield b""  # the headers, once the position is taken: a client that has them misses nothing after
            for raw in snapshot:
                if selected(request, raw["metadata"]):
                    yield {"type": "ADDED", "object": raw}
            async for event in bus.stream(since=marker):
                meta = event.get("object", {}).get("metadata", {})
                if _watched(request, meta.get("namespace"), meta.get("name")) and selected(request, meta):
                    yield event
        finally:
            await bus.unmark(marker)

    # Objects by resource and by owner, kept as they are written, so that no request reads every object
    # the server ever stored (kmock keeps deleted ones too): reads, lists and the collector stay O(answer).

    def _stored(self, resource: Any, namespace: str | None, name: str | None) -> Any:
        """The stored object (deleted ones included) at a key, or None."""
        key: Any = (resource, namespace, name)  # kmock's key type does not admit a cluster-wide (None) namespace
        return self.objects[key] if name is not None and key in self.objects else None

    @property
    def _by_resource(self) -> dict[Any, dict[tuple[Any, Any], None]]:
        """Resource -> (namespace, name) of every object ever stored, in creation order."""
        found: dict[Any, dict[tuple[Any, Any], None]] = self.__dict__.setdefault("_by_resource_index", {})
        return found

    @property
    def _dependents(self) -> dict[str, set[Key]]:
        """Owner uid -> the keys of objects that named it in their ownerReferences."""
        found: dict[str, set[Key]] = self.__dict__.setdefault("_dependents_index", {})
        return found

    async def _serve_fetch(self, request: rendering.Request) -> Any:
        obj = self._stored(request.resource, request.namespace, request.name)
        if obj is None or obj.deleted:
            raise kmock.KubernetesError(404, "NotFound", f'{request.resource.plural if request.resource else ""} '
                                                         f'"{request.name}" not found')
        return obj.raw

    async def _serve_create(self, request: rendering.Request) -> Any:
        meta = request.data.get("metadata", {})
        return self._stored(request.resource, request.namespace or meta.get("namespace"), meta.get("name")).raw

    async def _serve_update(self, request: rendering.Request) -> Any:
        return self._stored(request.resource, request.namespace, request.name).last.raw

    async def _serve_delete(self, request: rendering.Request) -> Any:
        return self._stored(request.resource, request.namespace, request.name).last.raw

    async def _serve_list(self, request: rendering.Request) -> Any:
        if request.resource not in self._get_resources():
            raise kmock.KubernetesError(404, "NotFound", "the server could not find the requested resource")
        items = []
        for namespace, name in self._by_resource.get(request.resource, {}):
            if request.namespace is None or namespace == request.namespace:
                obj = self._stored(request.resource, namespace, name)
                if not obj.deleted and selected(request, obj.raw["metadata"]):
                    items.append(obj.raw)
        return {"metadata": {"resourceVersion": str(next(self.versions))}, "items": items}

    def _get_resources(self) -> list[Any]:
        """The declared resources and those of stored objects (kmock reads every object's key for these)."""
        return list(set(kmock.KubernetesScaffold._get_resources(self)) | set(self._by_resource))

    async def _after_write(self, request: rendering.Request, before: dict[str, Any] | None) -> None:
        """Index what was written; collect garbage as the real collector would.

        A deleted object's dependents go (background propagation, down the chain); an object created
        or adopted with owners that are all gone goes too (a Pod made for a Job deleted a moment before).
        """
        assert request.resource is not None
        if request.action == enums.action.CREATE:
            meta = request.data.get("metadata", {}) if isinstance(request.data, dict) else {}
            key: Key = (request.resource, request.namespace or meta.get("namespace"), meta.get("name"))
        else:
            key = (request.resource, request.namespace, request.name)
        obj = self._stored(*key)
        if obj is None:
            return
        async with self._lock:
            self._by_resource.setdefault(request.resource, {})[key[1:]] = None
            if obj.deleted:
                if before is not None:
                    await self._cascade(before["metadata"].get("uid"))
                return
            references = obj.raw["metadata"].get("ownerReferences") or []
            for reference in references:
                self._dependents.setdefault(reference.get("uid"), set()).add(key)
            if references and not any(self._owner_alive(reference, key[1]) for reference in references):
                await self._remove(key)

    def _owner_alive(self, reference: dict[str, Any], namespace: str | None) -> bool:
        """Whether the object an ownerReference names exists with that uid (same namespace, or cluster-wide)."""
        for name, info in RESOURCES.items():
            group_version, plural = name.rsplit("/", 1)
            if info.kind == reference.get("kind") and group_version == reference.get("apiVersion"):
                group, _, version = group_version.rpartition("/")
                owner = self._stored(kmock.resource(group, version, plural), namespace if info.namespaced else None,
                                     reference.get("name"))
                return owner is not None and not owner.deleted and owner.raw["metadata"].get("uid") == reference.get(
                    "uid")
        return False

    async def _remove(self, key: Key) -> None:
        """Delete one object as the collector does (a DELETED event), then its own dependents."""
        obj = self._stored(*key)
        raw = obj.raw
        obj.delete()
        await self._buses[key[0]].put({"type": "DELETED", "object": raw})
        await self._cascade(raw["metadata"].get("uid"))

    async def _cascade(self, uid: str | None) -> None:
        """The dependents of a deleted owner whose owners are now all gone (called with the objects' lock held)."""
        for key in sorted(self._dependents.pop(uid or "", set()), key=str):
            obj = self._stored(*key)
            if obj.deleted:
                continue
            references = obj.raw["metadata"].get("ownerReferences") or []
            if not any(self._owner_alive(reference, key[1]) for reference in references):
                await self._remove(key)


def _by_priority(payloads: list[Any]) -> list[Any]:
    """The reactions in kmock's order: highest priority first, priorities of unequal depth padded with zeros."""
    depth = max((len(p.priorities) for p in payloads), default=0)
    return sorted(payloads, key=lambda p: tuple(-x for x in p.priorities) + (0,) * (depth - len(p.priorities)))


def _sees(view: Any, request: rendering.Request) -> bool:
    """Whether a request passes a reaction's chain of views (kmock's own check for anything but plain filters)."""
    chain = view
    while not isinstance(chain, dsl.Root):
        if type(chain) is dsl.Filter:
            if not chain.criteria(request):
                return False
        elif type(chain) is not dsl.Priority:
            return request in view  # slices and groups depend on other requests: kmock decides
        chain = chain._source
    return True


def _watched(request: rendering.Request, namespace: str | None, name: str | None) -> bool:
    """Whether a watch request covers an object (a request without a namespace covers all of them)."""
    return (request.namespace is None or namespace == request.namespace) and (request.name is None or
                                                                                 name == request.name)


def _with_data(request: rendering.Request, data: Any) -> rendering.Request:
    """The request with the body the server carries out (kmock matches reactions to the very request it recorded)."""
    object.__setattr__(request, "data", data)  # kmock's Request is frozen
    return request


def _content(obj: dict[str, Any]) -> dict[str, Any]:
    """What a generation counts: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


@dataclass
class Sabotage:
    """What to do instead of running a Job: exit with ``exit_code`` (and ``message``), or hang in ``waiting``."""

    exit_code: int | None = None
    message: str = "simulated failure"
    waiting: str | None = None  # e.g. "ImagePullBackOff"
    unschedulable: bool = False


@dataclass
class Running:
    job: dict[str, Any]
    pod: str
    process: Any
    started: str
    termination_log: Path
    stderr: Path
    secrets: dict[str, secret_volumes.SecretVolume] = field(default_factory=dict)  # by volume name


@dataclass
class JobRunner:
    """The job controller and kubelet of the test cluster (see the module docstring).

    Driven as the real ones are: a watch on Jobs starts a Pod for each new Job at once and stops it
    when its Job is deleted, and the fork server's exit reports finish it at once. Each Job's Pod is
    an asyncio task of its own, so one Job's HTTP calls never wait for another's, and nothing here
    lists all Jobs or grows with their number.
    """

    api: str
    root: Path
    sabotage: Callable[[dict[str, Any]], Sabotage | None] = lambda job: None
    seen: set[str] = field(default_factory=set)
    running: dict[str, Running] = field(default_factory=dict)  # by Job uid
    ran: list[str] = field(default_factory=list)  # job names, in start order
    paused: bool = False  # set from another thread: new Jobs wait, running ones are not reported
    errors: list[str] = field(default_factory=list)
    kubelet: Kubelet | None = None  # given: each Pod runs as a container of its image (tests/containers)

    def __post_init__(self) -> None:
        self.store = self.root / "store"
        self.store.mkdir(parents=True, exist_ok=True)
        self.logs = self.root / "pods"
        self.logs.mkdir(exist_ok=True)
        self.forks: ForkServer | None = None  # started by the first Job that runs a process (see `_fork_server`)
        self.session: aiohttp.ClientSession | None = None
        self.pods: dict[str, asyncio.Task[None]] = {}  # by Job uid: the task playing its Pod
        self.exits: dict[str, asyncio.Future[int]] = {}  # by Job uid: resolved when its process exits
        self._reaped: ForkServer | None = None  # the fork server whose exit reports `_follow_exits` follows
        self._closing = threading.Event()

    async def _fork_server(self) -> ForkServer:
        """The fork server, started on first use, off the event loop: it takes seconds (torch) and many tests run
        no Job at all."""
        if self.forks is None:
            self.forks = await asyncio.to_thread(ForkServer, [])
        if self._reaped is not self.forks:  # a test may have started it for the runner
            self._reaped = self.forks
            threading.Thread(target=self._follow_exits, args=(self.forks, asyncio.get_running_loop()),
                             name="job-runner-exits", daemon=True).start()
        return self.forks

    def _follow_exits(self, forks: ForkServer, loop: asyncio.AbstractEventLoop) -> None:
        """In a thread: each exit the fork server reports wakes the loop (no polling of processes)."""
        while not self._closing.is_set():
            if forks.exited.wait(0.5):
                forks.exited.clear()  # before looking: an exit reported after this sets it again
                loop.call_soon_threadsafe(self._reap)

    def _reap(self) -> None:
        """Resolve the exit of every process that has exited."""
        for uid, waiter in list(self.exits.items()):
            running = self.running.get(uid)
            code = running.process.poll() if running is not None else None
            if code is not None and not waiter.done():
                waiter.set_result(code)

    async def run(self) -> None:
        """Until cancelled: follow the Jobs' watch, starting, finishing and stopping their Pods."""
        async with aiohttp.ClientSession(base_url=self.api) as session:
            self.session = session
            try:
                await self._watch()
            finally:
                self._closing.set()
                for task in self.pods.values():
                    task.cancel()
                for running in self.running.values():
                    running.process.terminate()
                if self.forks is not None:
                    self.forks.close()

    async def _watch(self) -> None:
        """The Jobs' watch, opened again if the server ends it (it starts with every Job as ADDED)."""
        assert self.session is not None
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        while True:
            try:
                async with self.session.get("/apis/batch/v1/jobs", params={"watch": "true"},
                                            timeout=timeout) as response:
                    async for line in response.content:
                        if line.strip():
                            self._on_event(json.loads(line))
            except aiohttp.ClientError as error:
                logging.getLogger("tests.jobrunner").warning("the Jobs' watch ended: %s", error)
            await asyncio.sleep(0.05)

    def _on_event(self, event: dict[str, Any]) -> None:
        """A new Job gets its Pod at once; a deleted one loses it (its process is killed)."""
        job = event["object"]
        uid = job["metadata"]["uid"]
        if event["type"] == "DELETED":
            task = self.pods.pop(uid, None)
            if task is not None:
                task.cancel()
            running = self.running.pop(uid, None)
            if running is not None:
                running.process.terminate()
            return
        if event["type"] in ("ADDED", "MODIFIED") and uid not in self.seen:
            self.seen.add(uid)
            self.pods[uid] = asyncio.create_task(self._pod(job), name=f"pod {job['metadata']['name']}")

    async def _pod(self, job: dict[str, Any]) -> None:
        """One Job's Pod from start to finish; a failure is kept for the test to see, and the runner goes on."""
        uid = job["metadata"]["uid"]
        try:
            await self._unpaused()
            running = await self._start(job)
            if running is None:
                return  # it waits (image pull, scheduling) until its Job is deleted
            code = await self._exit(uid, running)
            await self._unpaused()
            if self.running.pop(uid, None) is not None:
                await self._finish(running, code)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            logging.getLogger("tests.jobrunner").exception("job runner failed on %s", job["metadata"]["name"])
            self.errors.append(repr(error))
        finally:
            self.pods.pop(uid, None)
            self.exits.pop(uid, None)

    async def _unpaused(self) -> None:
        while self.paused:  # a flag another thread sets: looked at only while a Job waits for it
            await asyncio.sleep(0.05)

    async def _exit(self, uid: str, running: Running) -> int:
        """The process's exit code, as soon as it has one."""
        code = running.process.poll()
        if code is not None:
            return int(code)
        waiter = self.exits[uid] = asyncio.get_running_loop().create_future()
        self._reap()  # it may have exited before the waiter existed
        return await waiter

    async def _json(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        assert self.session is not None
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        async with self.session.request(method, path, json=body, headers=headers) as response:
            return dict(await response.json()) if response.status < 300 else {}

    def claim_dir(self, namespace: str, claim: str) -> Path:
        """The directory behind a claim other than the store (a client's own data)."""
        return self.root / "claims" / namespace / claim

    def _map(self, argument: str, mounts: dict[str, Path]) -> str:
        argument = argument.replace("sqlite:////store/", f"sqlite:///{self.store}/")
        if argument.startswith("/store/") or argument == "/store":
            return str(self.store) + argument[len("/store"):]
        for mount, folder in mounts.items():
            if argument == mount or argument.startswith(mount + "/"):
                return str(folder) + argument[len(mount):]
        return argument

    def _claim_mounts(self, namespace: str, pod_spec: dict[str, Any]) -> dict[str, Path]:
        """Mount path -> local directory, for the Pod's claims other than the store."""
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod_spec.get("volumes") or []
                  if "persistentVolumeClaim" in v and v["name"] != "store"}
        return {m["mountPath"]: self.claim_dir(namespace, claims[m["name"]])
                for m in pod_spec["containers"][0].get("volumeMounts") or [] if m["name"] in claims}

    async def _environment(self, namespace: str, container: dict[str, Any]) -> dict[str, str] | str:
        """The container's env as the kubelet resolves it, or why it cannot (CreateContainerConfigError)."""
        found: dict[str, str] = {}
        for item in container.get("env") or []:
            reference = (item.get("valueFrom") or {}).get("secretKeyRef")
            if reference is None:
                found[item["name"]] = str(item.get("value", ""))
                continue
            secret = await self._json("GET", f"/api/v1/namespaces/{namespace}/secrets/{reference['name']}")
            if reference["key"] not in (secret.get("data") or {}):
                return f"secret \"{reference['name']}\" not found" if not secret else \
                    f"couldn't find key {reference['key']} in Secret {namespace}/{reference['name']}"
            found[item["name"]] = base64.b64decode(secret["data"][reference["key"]]).decode()
        return found

    async def _start(self, job: dict[str, Any]) -> Running | None:
        """Create the Job's Pod and start its process; None when the Pod waits instead (sabotage, config)."""
        meta = job["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        template = job["spec"]["template"]
        labels = {**template["metadata"].get("labels", {}), "job-name": name, "batch.kubernetes.io/job-name": name,
                  "controller-uid": meta["uid"]}
        pod_name = f"{name}-{uuid.uuid4().hex[:5]}"
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": pod_name, "namespace": namespace, "labels": labels,
                            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                                 "uid": meta["uid"], "controller": True}]},
               "spec": template["spec"], "status": {"phase": "Pending"}}
        await self._json("POST", f"/api/v1/namespaces/{namespace}/pods", pod)
        started = now()
        await self._json("PATCH", f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}/status",
                         {"status": {"startTime": started, "active": 1}})
        plan = self.sabotage(job)
        pod_path = f"/api/v1/namespaces/{namespace}/pods/{pod_name}/status"
        if plan is not None and plan.unschedulable:
            await self._json("PATCH", pod_path, {"status": {"conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}})
            return None
        if plan is not None and plan.waiting:
            await self._json("PATCH", pod_path, {"status": {"containerStatuses": [
                {"name": "worker", "ready": False, "restartCount": 0,
                 "state": {"waiting": {"reason": plan.waiting, "message": f"Back-off pulling image "
                                                                          f"{template['spec']['containers'][0]['image']}"}}}]}})
            return None
        container = template["spec"]["containers"][0]
        try:
            secrets = await self._secret_volumes(namespace, pod_name, template["spec"], container)
        except secret_volumes.MountFailed as failed:  # the kubelet says so in an Event; the Pod waits
            await self._mount_failed(namespace, pod_name, str(failed))
            await self._json("PATCH", pod_path, {"status": {"containerStatuses": [
                {"name": "worker", "ready": False, "restartCount": 0,
                 "state": {"waiting": {"reason": "ContainerCreating"}}}]}})
            return None
        environment = await self._environment(namespace, container)
        if isinstance(environment, str):
            await self._json("PATCH", pod_path, {"status": {"containerStatuses": [
                {"name": "worker", "ready": False, "restartCount": 0,
                 "state": {"waiting": {"reason": "CreateContainerConfigError", "message": environment}}}]}})
            return None
        mounts = self._claim_mounts(namespace, template["spec"])
        mounts["/tmp"] = self.root / "scratch" / pod_name  # the Pod's emptyDir: gone when the Pod ends
        mounts.update({m["mountPath"]: secrets[m["name"]].folder for m in container.get("volumeMounts") or []
                       if m["name"] in secrets})
        argv = [self._map(a, mounts) for a in container["args"]]
        termination_log = self.logs / f"{pod_name}.termination-log"
        argv = [str(termination_log) if a == "/dev/termination-log" else a for a in argv]
        stderr = self.logs / f"{pod_name}.err"
        denied = self._denied(template["spec"], container, secrets) if self.kubelet is None else ""
        if plan is not None and plan.exit_code is not None:
            process: Any = _Exited(plan.exit_code)
            stderr.write_text(plan.message + "\n")
        elif denied:  # this machine's user could read it; the Pod's could not, and its worker would end so
            process = _Exited(EXIT_INTERNAL)
            stderr.write_text(denied + "\n")
        elif self.kubelet is not None:
            process = self._container(namespace, pod_name, template["spec"], container, environment,
                                      termination_log, stderr, secrets)
        else:
            forks = await self._fork_server()
            process = forks.start(pod_name, argv, self.logs / f"{pod_name}.out", stderr, threads=1,
                                  environment={k: v for k, v in environment.items() if k != "HOME"})
        self.ran.append(name)
        running = self.running[meta["uid"]] = Running(job, pod_name, process, started, termination_log, stderr,
                                                      secrets)
        await self._json("PATCH", pod_path, {"status": {"phase": "Running", "containerStatuses": [
            {"name": "worker", "ready": True, "restartCount": 0, "state": {"running": {"startedAt": started}}}]}})
        return running

    async def _secret_volumes(self, namespace: str, pod_name: str, pod_spec: dict[str, Any],
                              container: dict[str, Any]) -> dict[str, secret_volumes.SecretVolume]:
        """The container's secret volumes, written as the kubelet writes them (`tests.operator.secret_volumes`)."""
        mounted = {m["name"] for m in container.get("volumeMounts") or []}
        fs_group = (pod_spec.get("securityContext") or {}).get("fsGroup")
        written = {}
        for volume in pod_spec.get("volumes") or []:
            if "secret" not in volume or volume["name"] not in mounted:
                continue
            found = await self._json("GET", f"/api/v1/namespaces/{namespace}/secrets/{volume['secret']['secretName']}")
            files = secret_volumes.project(volume, found or None, fs_group)
            folder = self.root / "volumes" / pod_name / volume["name"]
            written[volume["name"]] = secret_volumes.write(volume["name"], folder, files,
                                                           chown=self.kubelet is not None)
        return written

    @staticmethod
    def _denied(pod_spec: dict[str, Any], container: dict[str, Any],
                secrets: dict[str, secret_volumes.SecretVolume]) -> str:
        """What the Pod's worker would say, unable to read a file of its secret volumes ("" when it can read them)."""
        uid, groups = secret_volumes.identity(pod_spec, container)
        where = {m["name"]: m["mountPath"] for m in container.get("volumeMounts") or []}
        for volume in secrets.values():
            for item in secret_volumes.unreadable(volume.files, uid, groups):
                return (f"PermissionError: [Errno 13] Permission denied: '{where[volume.name]}/{item.path}' (the test "
                        f"kubelet: uid {uid} with groups {sorted(groups)} cannot read a file of mode "
                        f"{item.mode:04o} owned by 0:{item.group})")
        return ""

    async def _mount_failed(self, namespace: str, pod_name: str, message: str) -> None:
        """The kubelet's FailedMount Warning on the Pod."""
        stamp = now()
        await self._json("POST", f"/api/v1/namespaces/{namespace}/events", {
            "apiVersion": "v1", "kind": "Event", "metadata": {"generateName": f"{pod_name}.", "namespace": namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": pod_name, "namespace": namespace},
            "reason": "FailedMount", "message": message, "type": "Warning", "source": {"component": "kubelet"},
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1})

    def _container(self, namespace: str, pod_name: str, pod_spec: dict[str, Any], container: dict[str, Any],
                   environment: dict[str, str], termination_log: Path, stderr: Path,
                   secrets: dict[str, secret_volumes.SecretVolume]) -> Any:
        """Start the Pod as a container (`kubelet`): its claims and emptyDirs as host folders, owned by fsGroup; its
        secret volumes as written, mounted read-only."""
        assert self.kubelet is not None
        fs_group = (pod_spec.get("securityContext") or {}).get("fsGroup")
        volumes: dict[str, Path] = {}
        for volume in pod_spec.get("volumes") or []:
            if volume["name"] in secrets:
                volumes[volume["name"]] = secrets[volume["name"]].folder
                continue
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                folder = self.store if volume["name"] == "store" else self.claim_dir(namespace, claim)
            elif "emptyDir" in volume:
                folder = self.root / "scratch" / pod_name / volume["name"]
            else:
                raise ValueError(f"{pod_name}: the container runner has no volume of kind {sorted(volume)}")
            own_volume(folder, fs_group)
            volumes[volume["name"]] = folder
        termination_log.touch()
        termination_log.chmod(0o666)
        argv = self.kubelet.run_args(pod_name, pod_spec, container, volumes, environment, termination_log,
                                     read_only=set(secrets))
        process = self.kubelet.start(pod_name, argv, self.logs / f"{pod_name}.out", stderr)
        loop = asyncio.get_running_loop()
        threading.Thread(target=lambda: (process.wait(), loop.call_soon_threadsafe(self._reap)),
                         name=f"container {pod_name}", daemon=True).start()
        return process

    async def _finish(self, running: Running, code: int) -> None:
        meta = running.job["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        for volume in running.secrets.values():  # read-only in a real Pod: a write there would have failed
            changes = volume.changed()
            if changes:
                self.errors.append(f"{running.pod} wrote into its read-only secret volume {volume.name}: {changes}")
        shutil.rmtree(self.root / "volumes" / running.pod, ignore_errors=True)
        message = running.termination_log.read_text() if running.termination_log.exists() else ""
        if code != 0 and not message and running.stderr.exists():  # terminationMessagePolicy FallbackToLogsOnError
            message = "\n".join(running.stderr.read_text().splitlines()[-80:])[-2048:]
        shutil.rmtree(self.root / "scratch" / running.pod, ignore_errors=True)
        finished = now()
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "message": message,
                      "startedAt": running.started, "finishedAt": finished}
        await self._json("PATCH", f"/api/v1/namespaces/{namespace}/pods/{running.pod}/status", {"status": {
            "phase": "Succeeded" if code == 0 else "Failed",
            "containerStatuses": [{"name": "worker", "ready": False, "restartCount": 0,
                                   "state": {"terminated": terminated}}]}})
        finished = now()  # the job controller's stamp: when it writes the Job's end, after the Pod's
        condition = {"type": "Complete" if code == 0 else "Failed", "status": "True", "lastTransitionTime": finished,
                     "reason": None if code == 0 else "BackoffLimitExceeded",
                     "message": None if code == 0 else "Job has reached the specified backoff limit"}
        await self._json("PATCH", f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}/status", {"status": {
            "active": None, "succeeded" if code == 0 else "failed": 1,
            "completionTime": finished if code == 0 else None,
            "conditions": [{k: v for k, v in condition.items() if v is not None}]}})


@dataclass
class _Exited:
    """A process that has already exited with ``code`` (a sabotaged Job)."""

    code: int

    def poll(self) -> int | None:
        return self.code

    def terminate(self) -> None:
        pass


def job_args(job: dict[str, Any]) -> list[str]:
    """The worker arguments of a Job."""
    return list(job["spec"]["template"]["spec"]["containers"][0]["args"])


def dump(value: Any) -> str:
    return json.dumps(value, indent=1, default=str)
