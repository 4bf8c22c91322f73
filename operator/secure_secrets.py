"""The Secrets holding a secure training's client keys: made once per training and namespace, never changed.

Each namespace where a secure training's in-cluster clients run gets one Secret (`secure_secret_manifest`)
with a 32-byte random master secret per client of that namespace. It is created if absent and kept
if present: a key that changed while a round is in flight would break that round's unmasking, so
nothing here ever writes one again. The operator reads such a Secret only to check it after a
create answered 409 (a restarted operator, another pass), and never lists or watches Secrets.

In the training's namespace the Secret is owned by the training (the garbage collector deletes it);
in a client's namespace it cannot be (owners cannot cross namespaces), so the finalizer deletes it
(`delete_foreign_secrets`), as it deletes the Jobs there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from fedtrain.contract.secrets import MASTER_SECRET_BYTES, secret_file
from fedtrain.engine.status import Reason
from fedtrain.operator.jobs import (
    LABEL_MANAGED_BY,
    LABEL_TRAINING,
    LABEL_TRAINING_NAMESPACE,
    MANAGER,
    Owner,
    fit,
    secure_clients,
    secure_secret_manifest,
    secure_secret_name,
)
from fedtrain.operator.key_secrets import create_once, held_key_bytes
from fedtrain.operator.kube import ApiError, Kube, Paths
from fedtrain.operator.training_api import Refusal, owned_by
from fedtrain.spec import FederatedTrainingSpec


def secret_problem(secret: dict[str, Any], owner: Owner, clients: list[str]) -> str:
    """Why an existing Secret of the expected name cannot serve the training's clients ("" when it can)."""
    meta = secret.get("metadata") or {}
    where = f"Secret {meta.get('namespace')}/{meta.get('name')}"
    if not owned_by(secret, owner.uid):
        return (f"{where} exists and is not this training's; secure aggregation keeps its clients' keys there: "
                "delete or rename it")
    for client in clients:
        size = held_key_bytes(secret, secret_file(client))
        if size != MASTER_SECRET_BYTES:
            held = "has none" if size < 0 else f"holds {size} bytes"
            return (f"{where} must hold a {MASTER_SECRET_BYTES}-byte key {secret_file(client)} for client {client} "
                    f"and {held}; the operator never changes a key (that breaks a round in flight): delete the "
                    "Secret to have a new one made (a secure round then in flight fails)")
    return ""


def earlier_incarnation(secret: dict[str, Any], owner: Owner, namespace: str) -> bool:
    """Whether a Secret not owned by this training is an earlier training's of the same name, left to be removed."""
    labels = (secret.get("metadata") or {}).get("labels") or {}
    foreign = namespace != owner.namespace
    return (labels.get(LABEL_MANAGED_BY) == MANAGER and labels.get(LABEL_TRAINING) == fit(owner.name)
            and labels.get(LABEL_TRAINING_NAMESPACE) == (owner.namespace if foreign else None)
            and not owned_by(secret, owner.uid))


class SecureSecrets:
    """Makes the Secrets of `secure_clients` once; remembers which this process has seen, so a pass reads nothing."""

    def __init__(self, kube: Kube, random: Callable[[int], bytes] = os.urandom) -> None:
        self.kube = kube
        self.random = random
        self._ready: set[tuple[str, str, str, str]] = set()  # (training namespace, name, uid, Secret's namespace)

    def forget(self, namespace: str, name: str) -> None:
        """The training's loop ended: drop what this process remembered of it."""
        self._ready = {k for k in self._ready if k[:2] != (namespace, name)}

    async def ensure(self, spec: FederatedTrainingSpec, owner: Owner) -> None:
        """Every namespace's Secret there, holding each of its clients' keys; `Refusal` when one cannot be used.

        An earlier training's Secret of the same name (deleted, its Secret not yet collected) is removed
        and a new one made; anyone else's is refused.
        """
        for namespace, clients in sorted(secure_clients(spec, owner).items()):
            remembered = (owner.namespace, owner.name, owner.uid, namespace)
            if remembered in self._ready:
                continue
            await self._ensure(owner, namespace, clients)
            self._ready.add(remembered)

    async def _ensure(self, owner: Owner, namespace: str, clients: list[str]) -> None:
        wanted = secure_secret_manifest(owner, namespace, {c: self.random(MASTER_SECRET_BYTES) for c in clients})
        await create_once(self.kube, wanted, lambda found: earlier_incarnation(found, owner, namespace),
                          lambda found: secret_problem(found, owner, clients),
                          lambda problem: Refusal(Reason.SECURE_SECRET, problem), "training")


async def delete_foreign_secrets(kube: Kube, spec: FederatedTrainingSpec, owner: Owner) -> None:
    """On deletion: remove the training's Secrets in client namespaces (the one in its own goes with it)."""
    for namespace in sorted(secure_clients(spec, owner)):
        if namespace == owner.namespace:
            continue
        path = Paths.core(namespace, "secrets", secure_secret_name(owner, namespace))
        try:
            existing = await kube.get(path)
        except ApiError as error:
            if error.status != 404:
                raise
            continue
        if owned_by(existing, owner.uid):
            await kube.delete(path)
