"""What a secure round's site task carries of the other clients: their messages, read once, parsed, relayed.

A site reads nothing but the global models and its own folder, so the coordinator relays inside
the task (`SecureSettings`) what a stage needs of the others: the advertisements of the members of
the site's share set (shares), of those members that shared (masked training, unmasking), and each
sender's ciphertext addressed to the site (unmasking), trimmed to that one entry. Every message
is read from where its client wrote it (a site's in its own folder), within its size limit, and
parsed against the round attempt's context before it is relayed. Each is read once per process:
it is relayed as first read, so two versions of one sender's shares are never out at once, and a
pass does not read the same files again.

A site's answer that it finished a stage counts only if the stage's message is in its folder and
parses (`refusal`); otherwise the site failed that stage, with the parse error as its reason, and
leaves the next roster as any client whose stage failed; the round goes on above the threshold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fedtrain.contract.errors import BadDataError
from fedtrain.contract.layout import Layout
from fedtrain.contract.secmessages import (
    ADVERTISEMENT_LIMIT,
    REVEAL_LIMIT,
    SHARES_LIMIT,
    Advertisement,
    Context,
    Message,
    Reveal,
    SharesMessage,
    round_share_sets,
)
from fedtrain.contract.sitetask import SecureSettings, TaskKind
from fedtrain.contract.storage import Store
from fedtrain.contract.tensorfile import MASKED_HEADER_LIMIT, check_masked, element_count
from fedtrain.spec import FederatedTrainingSpec, SecureAggregationSpec
from fedtrain.tasks import weight_unit

# Each stage's message: its file in the client's folder of the round attempt, its size limit, its parser.
STAGE_MESSAGES: dict[str, tuple[str, int, Callable[[bytes, Context, str], Message]]] = {
    "keys": ("keys.json", ADVERTISEMENT_LIMIT, Advertisement.parse),
    "shares": ("shares.json", SHARES_LIMIT, SharesMessage.parse),
    "unmask": ("reveal.json", REVEAL_LIMIT, Reveal.parse),
}
MASKED_UPDATE = "masked.safetensors"  # a masked training's upload (its length bounds the aggregation's read)
GLOBAL_MODEL_LIMIT = 2 * 1024**3  # the coordinator's own global model, read once per round for its element count


@dataclass(frozen=True)
class SecureAssignment:
    """One site task of a secure round: the stage, the round attempt and the roster the engine fixed for it."""

    site: str
    kind: TaskKind
    round: int
    round_attempt: int
    advertised: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()
    survivors: tuple[str, ...] = ()


@dataclass
class SecureInbox:
    """Reads, checks and caches the round's messages, and builds each site task's ``secure`` block from them."""

    store: Store
    spec: FederatedTrainingSpec
    identity: str  # the training identity every key and message is bound to (`fedtrain.tasks.secure_identity`)
    cache: dict[tuple[int, int, str, str], Message] = field(default_factory=dict)
    lengths: dict[int, int] = field(default_factory=dict)  # round -> elements of its masked vectors

    @property
    def layout(self) -> Layout:
        """Keys of the clients' messages: a site's are in its own folder."""
        return Layout(frozenset(self.spec.clients.sites()))

    @property
    def secure(self) -> SecureAggregationSpec:
        """privacy.secureAggregation (a secure assignment exists only with it)."""
        privacy = self.spec.privacy
        assert privacy is not None and privacy.secure_aggregation is not None
        return privacy.secure_aggregation

    def settings(self, wanted: SecureAssignment) -> SecureSettings:
        """The task's ``secure`` block: the round's settings, the rosters, the messages the stage needs."""
        privacy = self.spec.privacy
        assert privacy is not None
        members = self.members(wanted)
        advertisements = {c: m for c, m in self.readable(wanted, members, "keys").items()
                          if isinstance(m, Advertisement)}
        shares = {c: m.addressed_to(wanted.site) for c, m in self.readable(wanted, members, "shares").items()
                  if isinstance(m, SharesMessage)} if wanted.kind == "unmask" else {}
        return SecureSettings(
            identity=self.identity, round_attempt=wanted.round_attempt, threshold=self.secure.threshold,
            clip_norm=privacy.clip_norm, weight_unit=weight_unit(self.spec), neighbours=self.secure.neighbours,
            equal_weights=privacy.differential, advertised=wanted.advertised, peers=wanted.peers,
            survivors=wanted.survivors, advertisements=advertisements, shares=shares)

    def members(self, wanted: SecureAssignment) -> tuple[str, ...]:
        """The others whose messages the stage needs: the site's share set, less who did not share (past sharing)."""
        if wanted.kind == "keys" or wanted.site not in wanted.advertised:
            return ()
        sets = round_share_sets(wanted.advertised, self.secure.neighbours, self.spec.seed, wanted.round,
                                wanted.round_attempt)
        members = [m for m in sets.get(wanted.site, ()) if m != wanted.site]
        if wanted.kind != "shares":
            members = [m for m in members if m in wanted.peers]
        return tuple(members)

    def readable(self, wanted: SecureAssignment, clients: tuple[str, ...], stage: str) -> dict[str, Message]:
        """The stage's messages of ``clients`` that parse; one that does not is left out (the site's stage says so).

        Each had parsed when its stage was counted; only a store that lost or changed it since,
        seen by a new coordinator process, leaves one out.
        """
        found: dict[str, Message] = {}
        for client in clients:
            try:
                found[client] = self.message(wanted, client, stage)
            except BadDataError:
                continue
        return found

    def message(self, wanted: SecureAssignment, client: str, stage: str) -> Message:
        """``client``'s message of ``stage`` in the round attempt, read within its limit, parsed, cached."""
        name, limit, parse = STAGE_MESSAGES[stage]
        key = (wanted.round, wanted.round_attempt, client, name)
        if key not in self.cache:
            where = self.layout.secure_message(wanted.round, wanted.round_attempt, client, name)
            context = Context(self.identity, wanted.round, wanted.round_attempt)
            self.cache[key] = parse(self.store.read_bounded(where, limit), context, client)
        return self.cache[key]

    def refusal(self, wanted: SecureAssignment) -> str | None:
        """Why a site's answer that it finished its stage does not count (its message missing or not one); or None.

        A masked update is checked whole (its length against the global model's): once the survivors
        reveal, nobody can take a survivor's vector out of the sum again.
        """
        if wanted.kind == "train":
            key = self.layout.secure_message(wanted.round, wanted.round_attempt, wanted.site, MASKED_UPDATE)
            try:
                length = self.masked_length(wanted.round)
                check_masked(self.store.read_bounded(key, 4 * length + MASKED_HEADER_LIMIT), length,
                             self.store.describe(key))
            except BadDataError as error:
                return str(error)
            return None
        if wanted.kind not in STAGE_MESSAGES:
            return None
        try:
            self.message(wanted, wanted.site, wanted.kind)
        except BadDataError as error:
            return str(error)
        return None

    def masked_length(self, round_number: int) -> int:
        """Elements of a masked vector in ``round_number``: the round's base model's values and the weight."""
        if round_number not in self.lengths:
            key = self.layout.global_weights(round_number - 1)
            data = self.store.read_bounded(key, GLOBAL_MODEL_LIMIT)
            self.lengths[round_number] = element_count(data, self.store.describe(key)) + 1
        return self.lengths[round_number]

    def forget_before(self, round_number: int) -> None:
        """Drop the messages of rounds before ``round_number``: no task will relay them again."""
        self.cache = {key: message for key, message in self.cache.items() if key[0] >= round_number}
        self.lengths = {number: length for number, length in self.lengths.items() if number >= round_number}
