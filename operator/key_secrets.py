"""Immutable Secrets of keys that the operator makes once: created if absent, kept if usable, never written again.

Secure aggregation's keys live in two kinds of them: a training's client keys (`secure_secrets`) and a
site's master secret (`site_secrets`). A key that changed while a round is in flight would break that
round's unmasking, so both are made the same way: create; on 409 read the one there and keep it
when it holds what it must, remove it when it is an earlier incarnation's of the same name (deleted,
not yet collected) and create again, refuse anyone else's. Secrets are read by name only, never
listed or watched.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

from fedtrain.operator.kube import ApiError, Kube, Paths


def held_key_bytes(secret: dict[str, Any], key: str) -> int:
    """How many bytes the Secret's ``key`` holds; -1 when it has none or it is not base64."""
    try:
        return len(base64.b64decode((secret.get("data") or {})[key], validate=True))
    except (KeyError, binascii.Error):
        return -1


async def create_once(kube: Kube, wanted: dict[str, Any], earlier: Callable[[dict[str, Any]], bool],
                      problem: Callable[[dict[str, Any]], str], refuse: Callable[[str], Exception],
                      holder: str) -> None:
    """``wanted`` there, or a usable one of its name: ``refuse(problem)`` for one that is not, named by ``problem``.

    ``earlier``: whether a Secret of the name is an earlier ``holder``'s (a training, a participation),
    which this one replaces.
    """
    meta = wanted["metadata"]
    collection = Paths.core(meta["namespace"], "secrets")
    path = f"{collection}/{meta['name']}"
    for _ in range(2):  # the second time after removing an earlier incarnation's Secret
        try:
            await kube.create(collection, wanted)
            return
        except ApiError as error:
            if error.status != 409:
                raise
        existing = await kube.get(path)
        if not earlier(existing):
            found = problem(existing)
            if found:
                raise refuse(found)
            return
        await kube.delete(path)
    raise ApiError(409, "Conflict", f"{path} of an earlier {holder} of this name is still being deleted",
                   f"POST {collection}")
