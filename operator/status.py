"""The one place the operator writes a training's ``.status``.

Writes go to the status subresource as a JSON merge patch computed from the status the decision
started from, so keys that disappeared are removed (merge patch deletes with ``null``). The patch
carries the ``resourceVersion`` that status was read at: if anybody changed the resource since, the
API server answers 409 Conflict and nothing is written; the controller then reads the resource
again and decides anew. So a decision taken on stale data is never stored.
"""

from __future__ import annotations

from typing import Any

from fedtrain.engine.status import TrainingStatus
from fedtrain.operator.kube import ApiError, Kube, Paths


class Conflict(Exception):
    """The resource changed since it was read: read it again and decide again."""


def merge_patch(old: Any, new: Any) -> Any:
    """The RFC 7386 merge patch that turns ``old`` into ``new`` (lists are replaced whole)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            patch[key] = merge_patch(old[key], value)
    return patch


def read_status(resource: dict[str, Any]) -> TrainingStatus:
    """The engine's status from a resource (a fresh one when the resource has none yet)."""
    return TrainingStatus.model_validate(resource.get("status") or {})


async def write_status(kube: Kube, resource: dict[str, Any], status: TrainingStatus) -> dict[str, Any] | None:
    """Store ``status`` if it differs from the resource's; returns the updated resource, or None if unchanged.

    Raises `Conflict` when the resource changed since it was read, and `ApiError` for other failures.
    """
    before = resource.get("status") or {}
    patch = merge_patch(before, status.to_json())
    if not patch:
        return None
    meta = resource["metadata"]
    body = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": patch}
    try:
        return await kube.merge_patch(Paths.training(meta["namespace"], meta["name"]) + "/status", body)
    except ApiError as error:
        if error.status == 409:
            raise Conflict(error.message) from None
        raise
