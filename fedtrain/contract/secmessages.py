"""Secure aggregation's messages as they travel: each client's key advertisement, shares and reveal, parsed strictly.

`fedtrain.worker.secagg` makes and uses these messages; this module only says what one must be
(exact JSON types, bounded sizes, names that are DNS labels, keys that are usable X25519 points)
and that it belongs to the round's `Context`. Kept apart so that whoever only relays or checks
messages needs neither numpy nor the secret-sharing library: the coordinator's relay parses each
site's messages before it passes them on inside a site's task (`fedtrain.contract.sitetask`), and
the operator image holds no numpy.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, TypeVar

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedtrain.contract.errors import BadDataError, BadInputError
from fedtrain.contract.wire import MAX_ATTEMPT, MAX_ROUND, NAME_PATTERN, SHA256_PATTERN, problems

SECAGG_VERSION = 1
DOMAIN = "fedtrain-secagg"  # first field of every label: no other protocol's key or AAD collides with ours

# A share set is a client and its neighbours; the spec allows at most 128 clients a round
# (spec.SECURE_MAX_CLIENTS), the wire a little more.
MAX_SHARE_SET = 256
ADVERTISEMENT_LIMIT = 4 * 1024
SHARES_LIMIT = 128 * 1024  # 256 entries of a 63-character name and a 128-character ciphertext, with room
REVEAL_LIMIT = 128 * 1024  # two maps of at most 256 entries of a name and a 48-character share
KEY_BYTES = 32

Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]
Base64 = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]*={0,2}$", max_length=256)]


class SecAggRefused(BadDataError):
    """A secure-aggregation message refused: forged, replayed, malformed, or of another context; names the sender."""


class ThresholdNotMet(SecAggRefused):
    """Fewer than the threshold of parties or shares took part; the reason says how many of how many."""


@dataclass(frozen=True)
class Context:
    """What every key derivation and every AAD is bound to: a message of another training, round or attempt fails."""

    training: str
    round: int
    attempt: int

    def __post_init__(self) -> None:
        if not self.training or not 1 <= self.round <= MAX_ROUND or not 1 <= self.attempt <= MAX_ATTEMPT:
            raise BadInputError(f"secure aggregation context {self}: needs a training name, a round within "
                                f"1..{MAX_ROUND} and an attempt within 1..{MAX_ATTEMPT}")

    def label(self, *parts: str) -> bytes:
        """Version, training, round, attempt and ``parts``, each length-prefixed: no two label lists encode alike."""
        fields = (DOMAIN, str(SECAGG_VERSION), self.training, str(self.round), str(self.attempt), *parts)
        return b"".join(len(data).to_bytes(4, "big") + data for data in (text.encode() for text in fields))


def share_sets(clients: Sequence[str], neighbours: int, seed: str) -> dict[str, tuple[str, ...]]:
    """Each client's share set (itself and its neighbours) in a symmetric graph, SecAgg+'s ring of Bell et al.

    The clients sit on a ring in an order seeded by ``seed`` (public randomness: the coordinator
    and every client compute the same graph), each linked to ``neighbours / 2`` clients on each
    side (an odd count is rounded up). ``neighbours >= len(clients) - 1`` is the complete graph,
    classic SecAgg. At least one neighbour: a client alone in its set masks with its self seed only,
    which the survivors reveal.
    """
    if len(set(clients)) != len(clients) or not clients:
        raise BadInputError(f"secure aggregation needs distinct clients, got {list(clients)}")
    if neighbours < 1:
        raise BadInputError(f"secure aggregation needs at least one neighbour per client, got {neighbours}")
    ring = sorted(clients)
    random.Random(seed).shuffle(ring)
    side = (neighbours + 1) // 2
    if neighbours >= len(ring) - 1 or 2 * side >= len(ring) - 1:
        everyone = tuple(sorted(clients))
        return {client: everyone for client in clients}
    sets: dict[str, tuple[str, ...]] = {}
    for position, client in enumerate(ring):
        linked = {ring[(position + step) % len(ring)] for step in range(-side, side + 1)}
        sets[client] = tuple(sorted(linked))
    return {client: sets[client] for client in clients}


def round_share_sets(advertised: Sequence[str], neighbours: int | None, seed: int, round_number: int,
                     attempt: int) -> dict[str, tuple[str, ...]]:
    """The share graph of one round attempt, as every party computes it: over who advertised, seeded by the round.

    ``neighbours`` None is classic SecAgg (everyone shares with everyone).
    """
    degree = neighbours if neighbours is not None else len(advertised)
    return share_sets(advertised, degree, f"{seed}/{round_number}/{attempt}")


def b64(data: bytes) -> str:
    """Standard base64 text of ``data``."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, size: int, what: str) -> bytes:
    """Canonical base64 of exactly ``size`` bytes, or `SecAggRefused` naming ``what``.

    Canonical (it re-encodes to itself), so no two texts carry the same bytes.
    """
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise SecAggRefused(f"{what}: not base64 ({error})") from error
    if b64(data) != text:
        raise SecAggRefused(f"{what}: not canonical base64")
    if len(data) != size:
        raise SecAggRefused(f"{what}: {len(data)} bytes, expected {size}")
    return data


def public_key(data: bytes, what: str) -> X25519PublicKey:
    """An X25519 public key that agrees a secret with someone: low-order points (all-zero secret) are refused."""
    key = X25519PublicKey.from_public_bytes(data)
    try:
        _PROBE.exchange(key)
    except ValueError as error:
        raise SecAggRefused(f"{what}: a low-order X25519 point, which agrees the same secret with everyone") from error
    return key


_PROBE = X25519PrivateKey.from_private_bytes(hashlib.sha256(b"fedtrain-secagg-probe").digest())


class Message(BaseModel):
    """One client's message of one context: exact JSON types, nothing unknown, immutable."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    version: int
    training: Annotated[str, Field(min_length=1, max_length=253)]
    round: Annotated[int, Field(ge=1, le=MAX_ROUND)]
    attempt: Annotated[int, Field(ge=1, le=MAX_ATTEMPT)]

    def to_bytes(self) -> bytes:
        """Compact JSON, what the store holds."""
        return self.model_dump_json().encode()

    def context_matches(self, context: Context) -> bool:
        """Whether the message says it belongs to ``context`` (the cryptography checks it too)."""
        return (self.version, self.training, self.round, self.attempt) == \
            (SECAGG_VERSION, context.training, context.round, context.attempt)


_M = TypeVar("_M", bound=Message)


def parse_message(model: type[_M], data: bytes, limit: int, context: Context, what: str) -> _M:
    """``data`` as a ``model`` of ``context``, bounded and strict; `SecAggRefused` naming ``what`` otherwise."""
    if len(data) > limit:
        raise SecAggRefused(f"{what}: {len(data)} bytes, more than the {limit} allowed; refused unread")
    try:
        found = json.loads(data)
    except (ValueError, RecursionError):
        found = None  # the strict parse says what is wrong
    if isinstance(found, dict) and found.get("version", SECAGG_VERSION) != SECAGG_VERSION:
        raise SecAggRefused(f"{what}: secure aggregation version {found.get('version')!r}, this side speaks "
                            f"{SECAGG_VERSION}: coordinator and clients run different releases")
    try:
        message = model.model_validate_json(data)
    except ValidationError as error:
        raise SecAggRefused(f"{what}: {problems(error)}") from error
    check_context(message, context, what)
    return message


def check_context(message: Message, context: Context, what: str) -> None:
    """Refuse a message that says it belongs to another training, round or attempt."""
    if not message.context_matches(context):
        raise SecAggRefused(f"{what}: of training {message.training!r}, round {message.round}, attempt "
                            f"{message.attempt}, not of {context.training!r}, round {context.round}, attempt "
                            f"{context.attempt}: stale or replayed")


class Advertisement(Message):
    """A client's public keys for one context and a commitment to its self seed (sha256 over label and seed)."""

    client: Name
    encryption_key: Base64
    masking_key: Base64
    seed_commitment: Annotated[str, Field(pattern=SHA256_PATTERN)]

    @classmethod
    def parse(cls, data: bytes, context: Context, client: str) -> Advertisement:
        """``client``'s advertisement of ``context``; `SecAggRefused` naming the client otherwise."""
        what = f"{client}'s key advertisement"
        advertisement = parse_message(cls, data, ADVERTISEMENT_LIMIT, context, what)
        advertisement.check(context, client)
        return advertisement

    def check(self, context: Context, client: str) -> None:
        """Refuse an advertisement that is not ``client``'s of ``context``, or whose keys are no usable keys."""
        what = f"{client}'s key advertisement"
        check_context(self, context, what)
        if self.client != client:
            raise SecAggRefused(f"{what}: names client {self.client!r}")
        self.encryption_public()
        self.masking_public()

    def encryption_public(self) -> X25519PublicKey:
        """The key its shares are encrypted to."""
        what = f"{self.client}'s key advertisement: encryption key"
        return public_key(unb64(self.encryption_key, KEY_BYTES, what), what)

    def masking_public(self) -> X25519PublicKey:
        """The key its pairwise masks are agreed with."""
        what = f"{self.client}'s key advertisement: masking key"
        return public_key(unb64(self.masking_key, KEY_BYTES, what), what)


class SharesMessage(Message):
    """A sender's Shamir shares, one AES-GCM ciphertext (base64 of nonce and ciphertext) per recipient."""

    sender: Name
    threshold: Annotated[int, Field(ge=2, le=MAX_SHARE_SET)]
    ciphertexts: Annotated[dict[Name, Base64], Field(max_length=MAX_SHARE_SET)]

    @classmethod
    def parse(cls, data: bytes, context: Context, sender: str) -> SharesMessage:
        """``sender``'s shares of ``context``; `SecAggRefused` naming the sender otherwise."""
        message = parse_message(cls, data, SHARES_LIMIT, context, f"{sender}'s shares")
        message.check(context, sender)
        return message

    def check(self, context: Context, sender: str) -> None:
        """Refuse shares that are not ``sender``'s of ``context``."""
        check_context(self, context, f"{sender}'s shares")
        if self.sender != sender:
            raise SecAggRefused(f"{sender}'s shares: name sender {self.sender!r}")

    def addressed_to(self, recipient: str) -> SharesMessage:
        """The message with only ``recipient``'s ciphertext: what may be relayed to that recipient alone.

        Its AES-GCM AAD binds the sender, the recipient and the context, so whoever relays it can
        drop entries but cannot forge or redirect one.
        """
        kept = {recipient: self.ciphertexts[recipient]} if recipient in self.ciphertexts else {}
        return self.model_copy(update={"ciphertexts": kept})


class Reveal(Message):
    """What one survivor reveals: per sender, the share of its self seed or of its masking key, never both."""

    client: Name
    seeds: Annotated[dict[Name, Base64], Field(max_length=MAX_SHARE_SET)]
    masking_keys: Annotated[dict[Name, Base64], Field(max_length=MAX_SHARE_SET)]

    @classmethod
    def parse(cls, data: bytes, context: Context, client: str) -> Reveal:
        """``client``'s reveal of ``context``; `SecAggRefused` naming the client otherwise."""
        what = f"{client}'s reveal"
        message = parse_message(cls, data, REVEAL_LIMIT, context, what)
        if message.client != client:
            raise SecAggRefused(f"{what}: names client {message.client!r}")
        both = sorted(set(message.seeds) & set(message.masking_keys))
        if both:
            raise SecAggRefused(f"{what}: reveals both shares of {', '.join(both)}")
        return message
