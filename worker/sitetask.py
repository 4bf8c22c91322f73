"""What a coordinator asks of a site, and what the site answers: two small JSON documents in the store.

The coordinator writes a site's current task to ``sites/<site>/task.json`` (`Layout.site_task`);
the site answers in ``sites/<site>/results/<task id>.json``. Nothing else crosses between the
organisations but the global models and the site's update. A task carries everything the site's
policy judges (strategy, architecture, rounds, epochs, privacy) and everything its worker needs
(which global model, with its sha256, and the training settings), plus a sha256 of itself: a task
that was cut short or altered in the store is refused, as is a global model whose bytes differ
from the digest the coordinator vouched for.

Kept free of torch and numpy: the operator and the local runner build and read these documents.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from fedtrain.worker.errors import BadDataError

PROTOCOL_VERSION = 1
TaskKind = Literal["train", "evaluate"]
ResultState = Literal["succeeded", "failed"]


@dataclass(frozen=True)
class TrainSettings:
    """How the site trains in a round (the coordinator's spec.training, with the client's overrides)."""

    epochs: int = 1
    batch_size: int = 32
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: str = "none"
    restart_epochs: int = 1
    mu: float = 0.0  # FedProx
    clip_norm: float | None = None  # central DP: the update is clipped before it leaves


@dataclass(frozen=True)
class PrivacySettings:
    """The coordinator's central DP, so that a site can require it and bound the budget it accepts."""

    clip_norm: float
    noise_multiplier: float
    delta: float
    sampling_rate: float


@dataclass(frozen=True)
class SiteTask:
    """One task for one site: train on the global model of ``round - 1``, or evaluate that of ``round``."""

    id: str
    kind: TaskKind
    round: int
    site: str
    training: str  # "<namespace>/<name>" of the coordinator's resource, for people reading the site's status
    total_rounds: int
    strategy: str
    architecture: str
    global_key: str
    global_sha256: str
    deadline: float  # unix seconds after which the coordinator no longer waits for the answer
    seed: int = 0
    train: TrainSettings | None = None
    privacy: PrivacySettings | None = None
    roi_crop: bool = True
    version: int = PROTOCOL_VERSION

    def to_json(self) -> dict[str, Any]:
        """The document, with its digest."""
        body = asdict(self)
        return {**body, "digest": digest(body)}


@dataclass(frozen=True)
class Posting:
    """What ``task.json`` holds: the current task, or none, and where the training stands."""

    phase: str  # the coordinator's phase: Running, Succeeded, Failed...
    task: SiteTask | None = None
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        """``{"phase": ..., "task": {...} | null, "message": ...}``."""
        return {"phase": self.phase, "task": self.task.to_json() if self.task else None, "message": self.message}


@dataclass(frozen=True)
class SiteResult:
    """A site's answer to one task: done (with its output) or failed (refused by policy included)."""

    task: str
    site: str
    state: ResultState
    exit_code: int | None = None
    reason: str | None = None
    output: dict[str, Any] = field(default_factory=dict)
    version: int = PROTOCOL_VERSION

    def to_json(self) -> dict[str, Any]:
        """The document as JSON data."""
        return asdict(self)


def digest(body: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a task without its digest."""
    canonical = json.dumps({k: v for k, v in body.items() if k != "digest"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def encode(document: Posting | SiteResult) -> bytes:
    """Bytes to store (stable, so that an unchanged posting is recognised and not written again)."""
    return (json.dumps(document.to_json(), indent=1, sort_keys=True) + "\n").encode()


def _object(data: bytes, where: str) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except ValueError as error:
        raise BadDataError(f"{where}: not valid JSON ({error})") from error
    if not isinstance(value, dict):
        raise BadDataError(f"{where}: expected a JSON object")
    return value


def parse_task(value: dict[str, Any], where: str = "task") -> SiteTask:
    """A task from its JSON data; `BadDataError` when the version, the fields or the digest are wrong."""
    if value.get("version") != PROTOCOL_VERSION:
        raise BadDataError(f"{where}: protocol version {value.get('version')!r}, this site speaks "
                           f"{PROTOCOL_VERSION}; upgrade the site or the coordinator so both match")
    if value.get("digest") != digest(value):
        raise BadDataError(f"{where}: its sha256 does not match its content; it was altered or cut short in the "
                           "store, so it is refused")
    body = {k: v for k, v in value.items() if k != "digest"}
    try:
        train = TrainSettings(**body.pop("train")) if body.get("train") else None
        privacy = PrivacySettings(**body.pop("privacy")) if body.get("privacy") else None
        body.pop("train", None)
        body.pop("privacy", None)
        return SiteTask(**body, train=train, privacy=privacy)
    except TypeError as error:
        raise BadDataError(f"{where}: not a task of protocol version {PROTOCOL_VERSION} ({error})") from error


def parse_posting(data: bytes, where: str = "task.json") -> Posting:
    """``task.json`` as written by the coordinator."""
    value = _object(data, where)
    task = value.get("task")
    return Posting(str(value.get("phase", "")), parse_task(task, where) if isinstance(task, dict) else None,
                   str(value.get("message", "")))


def parse_result(data: bytes, where: str = "result") -> SiteResult:
    """A site's answer; `BadDataError` when it is not one."""
    value = _object(data, where)
    if value.get("state") not in ("succeeded", "failed"):
        raise BadDataError(f"{where}: state must be succeeded or failed, not {value.get('state')!r}")
    try:
        return SiteResult(**value)
    except TypeError as error:
        raise BadDataError(f"{where}: not a site result ({error})") from error
