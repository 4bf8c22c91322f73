"""A site's secure-aggregation master secret on Kubernetes: one Secret in the participation's namespace, made once.

Every round's keys of the site derive from this secret, so it never leaves the site: the site's
operator makes it (32 random bytes) before the first Job of a secure round's task, and only those
Jobs mount it, read-only, at `SECRETS_MOUNT`; the worker is told it is given (``--secret-provided``)
and never makes one. The Secret is immutable and owned by the participation: a key that changed
while a round is in flight would break that round's unmasking, so nothing here writes one again,
and the garbage collector deletes it with the participation. An earlier participation's Secret of
the same name (deleted, not yet collected) is replaced; anyone else's is refused, and the task is
answered as failed with the reason. Secrets are read by name only, never listed or watched.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from typing import Any

from fedtrain.contract.errors import BadInputError
from fedtrain.contract.secrets import MASTER_SECRET_BYTES, secret_file
from fedtrain.operator.jobs import LABEL_MANAGED_BY, LABEL_PARTICIPATION, MANAGER, SECRET_MODE, SECRETS_MOUNT, fit
from fedtrain.operator.key_secrets import create_once, held_key_bytes
from fedtrain.operator.kube import Kube
from fedtrain.sites.agent import SecretFile
from fedtrain.sites.participation import PARTICIPATION_KIND
from fedtrain.spec import API_VERSION

SITE_SECRET_VOLUME = "site-secret"


def site_secret_name(participation: str) -> str:
    """``<participation>-site-secure``: apart from a training's ``<training>-secure`` of the same name."""
    return fit(f"{participation}-site-secure")


def site_secret_file(site: str) -> SecretFile:
    """Where a site's Job finds the secret: its key's file in the read-only mount, given, never made."""
    return SecretFile(f"{SECRETS_MOUNT}/{secret_file(site)}", provided=True)


def site_secret_manifest(participation: dict[str, Any], site: str, key: bytes) -> dict[str, Any]:
    """The immutable Secret holding ``site``'s master secret, owned by its participation."""
    meta = participation["metadata"]
    owner = {"apiVersion": API_VERSION, "kind": PARTICIPATION_KIND, "name": meta["name"], "uid": meta["uid"],
             "controller": True, "blockOwnerDeletion": True}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "immutable": True,
            "metadata": {"name": site_secret_name(meta["name"]), "namespace": meta["namespace"],
                         "labels": {LABEL_MANAGED_BY: MANAGER, LABEL_PARTICIPATION: fit(meta["name"])},
                         "ownerReferences": [owner]},
            "data": {secret_file(site): base64.b64encode(key).decode()}}


def site_secret_volume(participation: str, site: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The volume and read-only mount that give a secure task's Job the site's key (mode 0440 to the fsGroup)."""
    volume = {"name": SITE_SECRET_VOLUME, "secret": {
        "secretName": site_secret_name(participation), "defaultMode": SECRET_MODE,
        "items": [{"key": secret_file(site), "path": secret_file(site)}]}}
    return volume, {"name": SITE_SECRET_VOLUME, "mountPath": SECRETS_MOUNT, "readOnly": True}


def _owned(secret: dict[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in (secret.get("metadata") or {}).get("ownerReferences") or [])


def site_secret_problem(secret: dict[str, Any], participation: dict[str, Any], site: str) -> str:
    """Why an existing Secret of the expected name cannot hold the site's key ("" when it can)."""
    meta = secret.get("metadata") or {}
    where = f"Secret {meta.get('namespace')}/{meta.get('name')}"
    if not _owned(secret, participation["metadata"]["uid"]):
        return (f"{where} exists and is not this participation's; the site keeps its secure-aggregation key there: "
                "delete or rename it")
    size = held_key_bytes(secret, secret_file(site))
    if size == MASTER_SECRET_BYTES:
        return ""
    held = "has none" if size < 0 else f"holds {size} bytes"
    return (f"{where} must hold a {MASTER_SECRET_BYTES}-byte key {secret_file(site)} and {held}; the operator never "
            "changes a key (that breaks a round in flight): delete the Secret to have a new one made")


def _earlier(secret: dict[str, Any], participation: dict[str, Any]) -> bool:
    """An earlier participation's Secret of this name (deleted, not yet collected), which this one replaces."""
    labels = (secret.get("metadata") or {}).get("labels") or {}
    return labels.get(LABEL_MANAGED_BY) == MANAGER and \
        labels.get(LABEL_PARTICIPATION) == fit(participation["metadata"]["name"]) and \
        not _owned(secret, participation["metadata"]["uid"])


class SiteSecrets:
    """Makes each participation's Secret once; remembers the ones it has seen, so later tasks read nothing."""

    def __init__(self, kube: Kube, random: Callable[[int], bytes] = os.urandom) -> None:
        self.kube = kube
        self.random = random
        self._ready: set[str] = set()  # participation uids whose Secret is there and holds the key

    def forget(self, uid: str) -> None:
        """The participation's loop ended."""
        self._ready.discard(uid)

    async def ensure(self, participation: dict[str, Any], site: str) -> None:
        """The Secret there, holding the site's key; `BadInputError` naming why one of that name cannot be used."""
        uid = participation["metadata"]["uid"]
        if uid in self._ready:
            return
        wanted = site_secret_manifest(participation, site, self.random(MASTER_SECRET_BYTES))
        await create_once(self.kube, wanted, lambda found: _earlier(found, participation),
                          lambda found: site_secret_problem(found, participation, site), BadInputError, "participation")
        self._ready.add(uid)
