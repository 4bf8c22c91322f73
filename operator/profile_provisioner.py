"""Kubeflow profile provisioning through the API: make and keep what `fedtrain.operator.profiles` says a profile needs.

Apart from the trainings: a profile's namespace is provisioned whether or not a training ever runs
there, and nothing here reads or writes a FederatedTraining.
"""

from __future__ import annotations

import logging
from typing import Any

from fedtrain.operator.jobs import LABEL_MANAGED_BY, MANAGER
from fedtrain.operator.kube import ApiError, Kube, Paths
from fedtrain.operator.profiles import LABEL_PROFILE, provision

log = logging.getLogger("fedtrain.operator")
PLURALS = {"ServiceAccount": "serviceaccounts", "ConfigMap": "configmaps",
           "PersistentVolumeClaim": "persistentvolumeclaims"}


class ProfileProvisioner:
    """Provisions Kubeflow profiles' namespaces through ``kube``."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    async def provision(self, profile: dict[str, Any]) -> None:
        """Create what the profile's namespace lacks; keep the defaults ConfigMap equal to the annotations.

        An existing claim is never changed or removed here (it holds data): only created when missing.
        """
        if profile["metadata"].get("deletionTimestamp"):
            return
        wanted = provision(profile)
        for problem in wanted.problems:
            log.warning("profile %s: %s", profile["metadata"]["name"], problem)
        for manifest in wanted.objects:
            path = Paths.core(wanted.namespace, PLURALS[manifest["kind"]])
            existing = await self.kube.get_or_create(path, manifest)
            if existing is not None:
                await self._adopt(path, existing, manifest)

    async def _adopt(self, path: str, existing: dict[str, Any], wanted: dict[str, Any]) -> None:
        """Bring an existing object in line with the profile, if the operator made it.

        Ours but not yet the profile's (a worker account made for an earlier training): it gets the
        profile's labels and owner. The defaults ConfigMap gets the wanted data. Objects someone else
        made are left alone.
        """
        meta, name = existing["metadata"], existing["metadata"]["name"]
        labels = meta.get("labels") or {}
        if labels.get(LABEL_MANAGED_BY) != MANAGER:
            log.warning("%s exists and was not made by the operator; leaving it as it is", f"{path}/{name}")
            return
        patch: dict[str, Any] = {}
        if labels.get(LABEL_PROFILE) != wanted["metadata"]["labels"][LABEL_PROFILE]:
            patch["metadata"] = {"labels": wanted["metadata"]["labels"],
                                 "ownerReferences": wanted["metadata"]["ownerReferences"]}
        if wanted["kind"] == "ConfigMap" and existing.get("data") != wanted["data"]:
            patch["data"] = {**{k: None for k in existing.get("data") or {}}, **wanted["data"]}
        if patch:
            await self.kube.merge_patch(f"{path}/{name}", patch)

    async def repair(self, name: str) -> None:
        """Something of a profile's was deleted: provision the profile again if it still exists."""
        try:
            profile = await self.kube.get(Paths.profile(name))
        except ApiError as error:
            if error.status == 404:
                return
            raise
        await self.provision(profile)
