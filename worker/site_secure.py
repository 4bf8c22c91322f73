"""A site's part in a secure round: its stages, with what the coordinator relayed of the others inside the task.

A site may read only the global models and its own folder, so the other clients' advertisements
and shares come in the task's ``secure`` block (`fedtrain.contract.sitetask.SecureSettings`) and
are checked here against the round attempt's context before any is used: a share relayed from
another round or training, or forged, fails authentication and is refused by name (the unmask
stage reveals the others'). The site's own messages are written to, and read back from, its own
folder (`Layout.secure_message` with the site), where the coordinator's aggregation reads them.

The site's master secret never leaves the site: `fedtrain site run` keeps it in a 0600 file of
its work directory, the site operator in a Secret of the site's namespace mounted into its Jobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtrain.contract.errors import BadDataError
from fedtrain.contract.layout import Layout
from fedtrain.contract.sitetask import REASON_KEPT, SIDECAR_LIMIT, SecureSettings, SiteTask
from fedtrain.contract.storage import Store
from fedtrain.worker.jobs import Upload
from fedtrain.worker.secagg import Advertisement, SecAggRefused, SharesMessage
from fedtrain.worker.secure import (
    Messages,
    SecureRound,
    advertise,
    masked_key_exists,
    master_secret,
    plan_for,
    reveal_shares,
    share,
    uploader,
)
from fedtrain.worker.weights import Weights, read_json


@dataclass(frozen=True)
class SiteSecret:
    """Where the site's master secret is: a file made once (0600), or given (a mounted Secret's key, only read)."""

    path: Path
    provided: bool = False

    def read(self) -> bytes:
        """The 32-byte secret; bad input when it cannot be read or is not one."""
        return master_secret(self.path, create=not self.provided)


def settings_of(task: SiteTask) -> SecureSettings:
    """The task's secure block; bad data when a secure task came without one."""
    if task.secure is None:
        raise BadDataError(f"task {task.id}: a secure round's task without its 'secure' settings")
    return task.secure


def secure_round(task: SiteTask) -> SecureRound:
    """The round attempt as the coordinator fixed it for this task: settings and rosters."""
    secure = settings_of(task)
    return SecureRound(secure.identity, task.round, secure.round_attempt, secure.threshold, secure.neighbours,
                       secure.clip_norm, task.seed, secure.weight_unit, secure.advertised, secure.peers,
                       secure.survivors)


class RelayedMessages(Messages):  # type: ignore[misc]  # mypy cannot resolve worker/ (Any)
    """The round's messages as a site sees them: the others' from the task, its own in its own folder."""

    def __init__(self, store: Store, task: SiteTask) -> None:
        super().__init__(store, Layout(sites=frozenset({task.site})), secure_round(task))
        self.site = task.site
        self.inbox = settings_of(task)

    def advertisement(self, client: str) -> Advertisement:
        """``client``'s keys: relayed in the task (checked against the round here), or the site's own."""
        if client == self.site:
            return super().advertisement(client)
        found = self.inbox.advertisements.get(client)
        if found is None:
            raise SecAggRefused(f"{client}'s key advertisement: the coordinator relayed none in the task")
        found.check(self.secure.context, client)
        return found

    def shares(self, sender: str) -> SharesMessage:
        """``sender``'s shares addressed to this site: relayed in the task (checked here), or the site's own."""
        if sender == self.site:
            return super().shares(sender)
        found = self.inbox.shares.get(sender)
        if found is None:
            raise SecAggRefused(f"{sender}'s shares: the coordinator relayed none for {self.site}")
        found.check(self.secure.context, sender)
        return found


def run_stage(store: Store, task: SiteTask, master: bytes) -> dict[str, Any]:
    """A key, share or unmask task: the stage's message written to the site's folder; the answer's output.

    The output says only what the coordinator may know: how many the site shared with, whose
    shares it opened, and which it refused and why.
    """
    messages = RelayedMessages(store, task)
    if task.kind == "keys":
        advertise(messages, task.site, master)
        return {}
    if task.kind == "shares":
        return {"recipients": share(messages, task.site, master)["recipients"]}
    if task.kind != "unmask":
        raise BadDataError(f"task {task.id}: {task.kind} is no secure aggregation stage")
    revealed = reveal_shares(messages, task.site, master)
    return {"opened": revealed["opened"], "refused": {sender: why[:REASON_KEPT]
                                                      for sender, why in revealed["refused"].items()}}


def masked_upload(store: Store, task: SiteTask, master: bytes) -> Upload:
    """The training's upload step in a secure round: weigh, clip, mask, write to the site's folder."""
    return uploader(RelayedMessages(store, task), task.site, master, settings_of(task).equal_weights)


def uploaded(store: Store, task: SiteTask, base: Weights) -> dict[str, Any] | None:
    """The answer of a masked update already in the site's folder (a site restarted mid-task), or None.

    A second update masked with the same masks would show the difference of the two, so the site
    never masks again in the same round attempt: it answers from the sidecar it wrote.
    """
    messages = RelayedMessages(store, task)
    if not masked_key_exists(messages, task.site):
        return None
    sidecar = read_json(store, messages.key(task.site, "masked.json"), SIDECAR_LIMIT)
    return masked_output({**sidecar, "length": plan_for(base, messages.secure).length})


def masked_output(result: dict[str, Any]) -> dict[str, Any]:
    """A masked training's answer: its metrics (the private figures are already gone) and the vector's length."""
    return {"metrics": dict(result.get("metrics") or {}), "length": int(result["length"])}
