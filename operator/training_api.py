"""What every job of the controller asks the API server about a training, and how a training is refused.

The reconcile pass (`fedtrain.operator.controller`), the site relay (`fedtrain.operator.site_relays`)
and deletion (`fedtrain.operator.deletion`) all need a training's effective spec (its namespace's
defaults filled in), its worker Jobs and Pods wherever they run, and a way to post an Event: they
share one `TrainingApi` so that each is done one way.
"""

from __future__ import annotations

import logging
from typing import Any

from fedtrain.engine.status import Event, TrainingStatus
from fedtrain.operator.jobs import (
    LABEL_TRAINING_NAMESPACE,
    LABEL_TRAINING_UID,
    Owner,
    operator_worker_image,
    training_selector,
)
from fedtrain.operator.kube import ApiError, Kube, Paths
from fedtrain.operator.profiles import DEFAULTS_CONFIGMAP, WORKER_IMAGE_DEFAULT, apply_defaults
from fedtrain.spec import STORAGE_KINDS, FederatedTrainingSpec

log = logging.getLogger("fedtrain.operator")


class Refusal(Exception):
    """Something outside the rounds that the training cannot get past: it fails with ``reason``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def owned_by(item: dict[str, Any], uid: str) -> bool:
    """Whether an object belongs to this incarnation of the training (a recreated one has a new uid).

    Jobs in a client's namespace cannot have an owner reference to the training: their label says.
    """
    meta = item.get("metadata", {})
    return any(ref.get("uid") == uid for ref in meta.get("ownerReferences") or []) or \
        (meta.get("labels") or {}).get(LABEL_TRAINING_UID) == uid


class TrainingApi:
    """A training's spec, worker objects and Events, through ``kube``."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    async def effective_spec(self, namespace: str, name: str, raw_spec: dict[str, Any],
                             status: TrainingStatus) -> dict[str, Any]:
        """The spec with the namespace's ``fedtrain-defaults`` filled in where it is silent (profiles).

        The operator's own worker image (`operator_worker_image`) counts as a default beneath the
        namespace's. The ConfigMap is read once, at the first pass that needs it, and its data kept in ``status``
        (stored with the pass's decision): later passes fill in the same values without reading it, so
        an edit to the defaults never moves a running training's storage or experiment. A training
        applied right after its defaults still finds them: that first read goes to the API server.
        """
        silent = not any(k in (raw_spec.get("storage") or {}) for k in STORAGE_KINDS)
        mlflow = raw_spec.get("mlflow") or {}
        image_silent = (raw_spec.get("worker") or {}).get("image") is None
        if not (silent or image_silent or "experiment" not in mlflow or "trackingUri" not in mlflow):
            return raw_spec
        if status.namespace_defaults is None:
            status.namespace_defaults = {WORKER_IMAGE_DEFAULT: operator_worker_image(),
                                         **await self._namespace_defaults(namespace)}
        elif WORKER_IMAGE_DEFAULT not in status.namespace_defaults:  # kept by an operator that had no such default
            status.namespace_defaults = {WORKER_IMAGE_DEFAULT: operator_worker_image(), **status.namespace_defaults}
        return apply_defaults(raw_spec, status.namespace_defaults, name)

    async def _namespace_defaults(self, namespace: str) -> dict[str, str]:
        """The data of the namespace's ``fedtrain-defaults`` ({} when there is none)."""
        try:
            defaults = await self.kube.get(Paths.core(namespace, "configmaps", DEFAULTS_CONFIGMAP))
        except ApiError as error:
            if error.status != 404:
                raise
            return {}
        return {str(k): str(v) for k, v in (defaults.get("data") or {}).items()}

    async def worker_objects(self, spec: FederatedTrainingSpec, owner: Owner
                             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The training's Jobs and Pods, listed in its namespace and in its clients' namespaces."""
        jobs: list[dict[str, Any]] = []
        for namespace, selector in self._selectors(spec, owner):
            listed = await self.kube.list(Paths.jobs(namespace), selector)
            jobs += [j for j in listed if owned_by(j, owner.uid)]
        return jobs, await self.worker_pods(spec, owner)

    async def worker_pods(self, spec: FederatedTrainingSpec, owner: Owner) -> list[dict[str, Any]]:
        """The training's Pods, in its namespace and in its clients' namespaces."""
        pods: list[dict[str, Any]] = []
        for namespace, selector in self._selectors(spec, owner):
            pods += await self.kube.list(Paths.core(namespace, "pods"), selector)
        return pods

    @staticmethod
    def _selectors(spec: FederatedTrainingSpec, owner: Owner) -> list[tuple[str, dict[str, str]]]:
        """Where a training's worker objects are, and their label selector there."""
        found = [(owner.namespace, training_selector(owner))]
        for namespace in sorted(set(spec.clients.namespaces().values()) - {owner.namespace}):
            found.append((namespace, {**training_selector(owner), LABEL_TRAINING_NAMESPACE: owner.namespace}))
        return found

    async def post(self, resource: dict[str, Any], event: Event) -> None:
        """Post ``event`` on ``resource``; an Event the API refuses is worth a log line, not a failed pass."""
        try:
            await self.kube.post_event(resource, event.reason, event.message, event.warning)
        except ApiError as error:
            log.warning("could not post event %s: %s", event.reason, error)
