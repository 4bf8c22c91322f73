"""The coordinator's side of the site relay: postings out to remote sites, their answers in, and the end.

Remote sites share only an object store with the coordinator (`fedtrain.sites.relay.SiteRelay`
posts tasks and reads answers there). This module keeps one relay per training, opened with the
store credentials of the training's Secret, runs its blocking store calls off the event loop, and
tells the sites when the training fails, finishes or is deleted, once per process and best effort.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from fedtrain.contract.errors import BadDataError, BadInputError, TemporaryStorageError
from fedtrain.contract.sitetask import DELETED
from fedtrain.contract.storage import open_store
from fedtrain.engine.status import Event, Reason, TrainingStatus
from fedtrain.operator.jobs import Owner, placement
from fedtrain.operator.storeaccess import secret_environment
from fedtrain.operator.training_api import Refusal, TrainingApi
from fedtrain.sites.relay import SiteRelay
from fedtrain.spec import FederatedTrainingSpec, SpecError, parse_spec
from fedtrain.tasks import secure_identity

log = logging.getLogger("fedtrain.operator")


class SiteRelays:
    """Each training's `SiteRelay`, and which ends this process has told the sites."""

    def __init__(self, api: TrainingApi) -> None:
        self.api = api
        self._relays: dict[str, SiteRelay] = {}  # by training uid: what each has posted, checksums read
        self._ended: set[tuple[str, str]] = set()  # (uid, phase or Deleted) this process posted to the sites

    def forget(self, namespace: str, name: str) -> None:
        """The training's loop ended: drop its relay."""
        for uid, relay in list(self._relays.items()):
            if relay.training == f"{namespace}/{name}":
                del self._relays[uid]

    async def relay(self, spec: FederatedTrainingSpec, owner: Owner) -> SiteRelay:
        """The training's relay, with the store credentials of its Secret (read when the relay is made)."""
        relay = self._relays.get(owner.uid)
        if relay is None or relay.spec != spec:
            try:
                environment = await self.store_environment(spec, owner.namespace)
            except BadInputError as error:  # the Secret lacks a key the spec names
                raise Refusal(Reason.BAD_INPUT, str(error)) from None
            where = placement(spec, owner)
            store = await asyncio.to_thread(open_store, where.workdir, environment)
            relay = SiteRelay(store, spec, f"{owner.namespace}/{owner.name}", secure_identity(where))
            self._relays[owner.uid] = relay
        return relay

    async def store_environment(self, spec: FederatedTrainingSpec, namespace: str) -> dict[str, str]:
        """The store's environment for the relay: the spec's settings, its Secret's keys, its CA bundle."""
        s3 = spec.storage.s3
        assert s3 is not None  # `kubernetes_problems` requires it with sites
        environment, _ = await secret_environment(self.api.kube, namespace, s3, "spec.storage.s3.credentialsSecret")
        return environment

    @staticmethod
    async def exchange(call: Callable[[TrainingStatus], Any], status: TrainingStatus) -> Any:
        """Run a relay call off the event loop; a store down for a moment costs this pass its site news only.

        Refused credentials or a missing bucket fail the training (`Refusal`), as they would fail its Jobs.
        """
        try:
            return await asyncio.to_thread(call, status)
        except TemporaryStorageError as error:
            log.warning("the store did not answer about the sites: %s", error)
            return {}
        except BadInputError as error:
            raise Refusal(Reason.BAD_INPUT, f"remote sites: {error}") from None
        except BadDataError as error:
            raise Refusal(Reason.BAD_DATA, f"remote sites: {error}") from None

    async def repost_end(self, resource: dict[str, Any], owner: Owner, status: TrainingStatus) -> None:
        """Post a finished training's end to its sites once per process: a crash between status and posting lost it."""
        if (owner.uid, status.phase) in self._ended or not (resource.get("spec") or {}).get("clients", {}).get("list"):
            return
        self._ended.add((owner.uid, status.phase))
        try:
            spec = parse_spec(await self.api.effective_spec(owner.namespace, owner.name, resource.get("spec") or {},
                                                            status), f"{owner.namespace}/{owner.name}")
        except SpecError:
            return  # it never ran, so no site was told anything
        if spec.clients.sites():
            await self.tell(resource, spec, owner, lambda relay: relay.publish(status))

    async def tell_deleted(self, resource: dict[str, Any], spec: FederatedTrainingSpec, owner: Owner) -> None:
        """Tell the sites the training is deleted, once: a finalizer that waits for its Jobs comes back every 2 s."""
        if (owner.uid, DELETED) in self._ended:
            return
        self._ended.add((owner.uid, DELETED))
        await self.tell(resource, spec, owner, lambda relay: relay.end())

    async def tell(self, resource: dict[str, Any], spec: FederatedTrainingSpec, owner: Owner,
                   call: Callable[[SiteRelay], None]) -> bool:
        """Post the training's end to its sites (`SiteRelay.publish` or `SiteRelay.end`); True when done or none.

        Best effort: a training that failed or is being deleted must not wait on its store, so a
        store or Secret that cannot be reached is a Warning Event (the sites then stop at their
        tasks' deadlines), not an error.
        """
        if not spec.clients.sites() or spec.storage.s3 is None:
            return True
        try:
            relay = await self.relay(spec, owner)
            await asyncio.to_thread(call, relay)
            return True
        except (Refusal, TemporaryStorageError, BadInputError, BadDataError) as error:
            message = error.message if isinstance(error, Refusal) else str(error)
            await self.api.post(resource, Event(Reason.SITES_NOT_TOLD, f"the sites were not told that the training "
                                                                       f"ended: {message}", warning=True))
            return False
