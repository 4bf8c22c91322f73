"""A small asynchronous Kubernetes REST client over plain dicts, for the few calls the operator makes.

It rides on the official `kubernetes` client's configuration and transport (in-cluster service
account, kubeconfig, token refresh, TLS), calling paths directly and keeping JSON as dicts: the
operator builds and reads manifests as data, so typed models would only be converted back and
forth. Calls run in a thread, so the kopf event loop never blocks on the network.
"""

from __future__ import annotations

import asyncio
import functools
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kubernetes
import urllib3

from fedtrain.spec import API_VERSION, GROUP, KIND, PLURAL, VERSION

MERGE_PATCH = "application/merge-patch+json"


# Answers that may change by themselves: not there yet, changed meanwhile, too many requests. Any
# other 4xx (403: the operator lacks an RBAC rule; 400/422: the object is invalid) comes back the same
# on every retry.
RETRYABLE_CLIENT_ERRORS = (404, 409, 429)

# Calls in flight at once: each waits on the network in a thread of its own, with a pooled connection.
# asyncio's shared pool has only a few threads on a small node (cores + 4), so with many trainings
# one training's next Jobs would queue behind every other training's reads.
CALLS_IN_FLIGHT = 16


class ApiError(Exception):
    """An API call that failed, with the HTTP status (404, 409, 403, 422...) and the server's message.

    ``status`` is 0 when the server could not be reached at all.
    """

    def __init__(self, status: int, reason: str, message: str, request: str = "") -> None:
        super().__init__(f"{request + ': ' if request else ''}{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.request = request  # "POST /apis/batch/v1/namespaces/x/jobs"

    @property
    def permanent(self) -> bool:
        """A refusal that retrying cannot change (any 4xx but 404, 409, 429); 5xx and lost connections pass."""
        return 400 <= self.status < 500 and self.status not in RETRYABLE_CLIENT_ERRORS


@dataclass(frozen=True)
class Paths:
    """Where things live in the API."""

    @staticmethod
    def training(namespace: str, name: str = "") -> str:
        """A FederatedTraining, or the collection of a namespace."""
        base = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
        return f"{base}/{name}" if name else base

    @staticmethod
    def jobs(namespace: str, name: str = "") -> str:
        """A Job, or the collection of a namespace."""
        return f"/apis/batch/v1/namespaces/{namespace}/jobs" + (f"/{name}" if name else "")

    @staticmethod
    def core(namespace: str, plural: str, name: str = "") -> str:
        """A core/v1 object (pods, events, persistentvolumeclaims...), or its collection."""
        return f"/api/v1/namespaces/{namespace}/{plural}" + (f"/{name}" if name else "")

    @staticmethod
    def profile(name: str) -> str:
        """A Kubeflow Profile (cluster-scoped)."""
        return f"/apis/kubeflow.org/v1/profiles/{name}"

    @staticmethod
    def namespace(name: str) -> str:
        """A Namespace (its annotations say which trainings may run clients there)."""
        return f"/api/v1/namespaces/{name}"


def load_configuration() -> None:
    """In-cluster service account first, else the kubeconfig (``$KUBECONFIG`` or ``~/.kube/config``)."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()


class Kube:
    """JSON in, JSON out; failures raise `ApiError`."""

    def __init__(self, client: kubernetes.client.ApiClient) -> None:
        self.client = client
        self.threads = ThreadPoolExecutor(max_workers=CALLS_IN_FLIGHT, thread_name_prefix="kube")

    @classmethod
    def from_environment(cls) -> Kube:
        """A client configured like kubectl would be (see `load_configuration`), pooling `CALLS_IN_FLIGHT`."""
        load_configuration()
        configuration = kubernetes.client.Configuration.get_default_copy()
        configuration.connection_pool_maxsize = CALLS_IN_FLIGHT
        return cls(kubernetes.client.ApiClient(configuration))

    def close(self) -> None:
        """Release the connection pool and the threads."""
        self.client.close()
        self.threads.shutdown(wait=False)

    async def call(self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None,
                   content_type: str = "application/json") -> dict[str, Any]:
        """One API call, off the event loop."""
        call = functools.partial(self._call, method, path, body, query or {}, content_type)
        return await asyncio.get_running_loop().run_in_executor(self.threads, call)

    def _call(self, method: str, path: str, body: Any, query: dict[str, str], content_type: str) -> dict[str, Any]:
        try:
            response = self.client.call_api(
                path, method, query_params=list(query.items()),
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body, auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True)
        except kubernetes.client.ApiException as error:
            raise _api_error(error, f"{method} {path}") from None
        except (urllib3.exceptions.HTTPError, OSError) as error:  # refused, reset, timed out, TLS
            raise ApiError(0, "Unreachable", str(error), f"{method} {path}") from None
        data = response.data
        return json.loads(data) if data else {}

    async def get(self, path: str) -> dict[str, Any]:
        """GET one object."""
        return await self.call("GET", path)

    async def list(self, path: str, selector: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """The items of a collection, optionally with a label selector."""
        query = {"labelSelector": ",".join(f"{k}={v}" for k, v in selector.items())} if selector else None
        return list((await self.call("GET", path, query=query)).get("items") or [])

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a new object; an existing one raises `ApiError` 409."""
        return await self.call("POST", path, body)

    async def get_or_create(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """The existing object named in ``body``, or None after creating it (or finding it created meanwhile)."""
        try:
            return await self.get(f"{path}/{body['metadata']['name']}")
        except ApiError as error:
            if error.status != 404:
                raise
        try:
            await self.create(path, body)
        except ApiError as error:
            if error.status != 409:
                raise
        return None

    async def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        """JSON merge patch (RFC 7386): a ``metadata.resourceVersion`` in it makes it conditional (409 if stale)."""
        return await self.call("PATCH", path, patch, content_type=MERGE_PATCH)

    async def delete(self, path: str, propagation: str = "Background") -> None:
        """Delete an object and (by default) its dependents; an absent one is not an error."""
        try:
            await self.call("DELETE", path, {"propagationPolicy": propagation})
        except ApiError as error:
            if error.status != 404:
                raise

    async def post_event(self, involved: dict[str, Any], reason: str, message: str, warning: bool = False) -> None:
        """A core/v1 Event about ``involved`` (what ``kubectl describe`` lists)."""
        meta = involved["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": involved.get("apiVersion", API_VERSION),
                               "kind": involved.get("kind", KIND), "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid", "")},
            "reason": reason, "message": message[:1024], "type": "Warning" if warning else "Normal",
            "source": {"component": "fedtrain-operator"}, "reportingComponent": "fedtrain.io/operator",
            "reportingInstance": "fedtrain-operator",
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        await self.create(Paths.core(meta["namespace"], "events"), event)


def _api_error(error: kubernetes.client.ApiException, request: str) -> ApiError:
    message = str(error.reason or "")
    try:
        payload = json.loads(error.body or "{}")
        message = payload.get("message") or message
    except (TypeError, ValueError):
        pass
    return ApiError(int(error.status or 0), str(error.reason or ""), message, request)
