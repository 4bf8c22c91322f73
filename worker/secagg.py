"""Secure aggregation: the coordinator learns the sum of the clients' updates, never one of them.

SecAgg (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017) with SecAgg+'s sparse share sets (Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020). The parties reach each other only through the store, so
every stage is one message per client that the coordinator relays:

1. `Advertisement`: each client's X25519 keys (one to encrypt shares, one to agree masks) and a
   commitment to its self-mask seed, all derived from its master secret and the round's `Context`.
2. `SharesMessage`: Shamir shares of its masking key and self seed, one AES-GCM ciphertext per
   member of its share set (`share_sets`), so the coordinator relays shares it cannot read.
3. A masked update (`mask`): the client's quantised update (`QuantisationPlan`) plus a self mask
   and one pairwise mask per peer, as uint32 in the ring Z/2^32; pairwise masks cancel in the sum.
4. `Reveal`: each survivor reveals, per sender, the one share that removes what the sum still
   holds: the self seed of a survivor, or the masking key of a client that dropped after sharing.

`unmask` then returns the sum only. Every key derivation and every authenticated-encryption AAD
is bound to the training, round and attempt, so a message from elsewhere is refused; each secret
a reveal reconstructs is checked against what its owner committed to, so a wrong share is named
rather than summed. The primitives are `cryptography`'s (X25519, HKDF-SHA256, AES-GCM, ChaCha20)
and pycryptodome's Shamir sharing over GF(2^128); nothing here is hand-written cryptography.

Pure: no torch, no I/O, no store access. Threat model: an honest-but-curious coordinator and up to
``threshold - 1`` colluding parties learn nothing of one update. A malicious coordinator that
tells clients different survivor lists is not covered (it would need the paper's signed
consistency round); each client only refuses to reveal both shares of one sender itself.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

from fedtrain.contract.errors import BadInputError
from fedtrain.contract.secmessages import (
    ADVERTISEMENT_LIMIT,
    KEY_BYTES,
    MAX_SHARE_SET,
    REVEAL_LIMIT,
    SECAGG_VERSION,
    SHARES_LIMIT,
    Advertisement,
    Context,
    Reveal,
    SecAggRefused,
    SharesMessage,
    ThresholdNotMet,
    b64,
    check_context,
    share_sets,
    unb64,
)
from fedtrain.contract.secrets import MASTER_SECRET_BYTES
from fedtrain.contract.wire import NAME_PATTERN
from fedtrain.worker.quantisation import QuantisationPlan, QuantisationRangeError

__all__ = [
    "ADVERTISEMENT_LIMIT", "MAX_SHARE_SET", "REVEAL_LIMIT", "SECAGG_VERSION", "SHARES_LIMIT", "Advertisement",
    "ClientKeys", "Context", "QuantisationPlan", "QuantisationRangeError", "Reveal", "SecAggRefused", "Share",
    "SharesMessage", "ThresholdNotMet", "make_shares", "mask", "open_share", "reveal", "share_sets", "unmask",
]

_HALF = 16  # pycryptodome's Shamir shares 16-byte secrets: a 32-byte secret is two halves with the same indices
_NONCE_BYTES = 12
_TAG_BYTES = 16
_INDEX_BYTES = 2
_SHARE_BYTES = _INDEX_BYTES + 4 * _HALF  # index, masking-key halves, seed halves
_REVEALED_BYTES = _INDEX_BYTES + 2 * _HALF  # index and one secret's two halves
_SEALED_BYTES = _NONCE_BYTES + _SHARE_BYTES + _TAG_BYTES
# Every PRG key is used once (it is bound to the round's context and the pair), so ChaCha20's nonce is fixed.
_PRG_NONCE = bytes(16)


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def _agree(private: X25519PrivateKey, public: X25519PublicKey, info: bytes, peer: str) -> bytes:
    try:
        shared = private.exchange(public)
    except ValueError as error:
        raise SecAggRefused(f"{peer}: its advertised key is a low-order X25519 point") from error
    return _hkdf(shared, info)


def _commitment(context: Context, client: str, seed: bytes) -> str:
    return hashlib.sha256(context.label("seed", client) + seed).hexdigest()


@dataclass(frozen=True)
class ClientKeys:
    """One client's secrets for one context, derived from its master secret (HKDF-SHA256).

    Derived, not drawn: a task run again after a crash holds the same keys, so what it advertised
    before still holds and no stage has to start over.
    """

    client: str
    context: Context
    encryption: X25519PrivateKey = field(repr=False)
    masking: X25519PrivateKey = field(repr=False)
    self_seed: bytes = field(repr=False)

    @classmethod
    def derive(cls, master: bytes, context: Context, client: str) -> ClientKeys:
        """The keys of ``client`` in ``context`` from its 32-byte ``master`` secret."""
        if len(master) != MASTER_SECRET_BYTES:
            raise BadInputError(f"secure aggregation needs a {MASTER_SECRET_BYTES}-byte master secret, got "
                                f"{len(master)} bytes")
        if not re.fullmatch(NAME_PATTERN, client) or len(client) > 63:
            raise BadInputError(f"client name {client!r} is not a DNS label")
        encryption = _hkdf(master, context.label("key", client, "encryption"))
        masking = _hkdf(master, context.label("key", client, "masking"))
        seed = _hkdf(master, context.label("key", client, "self-seed"))
        return cls(client, context, X25519PrivateKey.from_private_bytes(encryption),
                   X25519PrivateKey.from_private_bytes(masking), seed)

    def advertisement(self) -> Advertisement:
        """What this client posts first: its public keys and its seed commitment."""
        return Advertisement(
            version=SECAGG_VERSION, training=self.context.training, round=self.context.round,
            attempt=self.context.attempt, client=self.client,
            encryption_key=b64(self.encryption.public_key().public_bytes_raw()),
            masking_key=b64(self.masking.public_key().public_bytes_raw()),
            seed_commitment=_commitment(self.context, self.client, self.self_seed))


@dataclass(frozen=True)
class Share:
    """What one recipient holds of one sender's secrets: its index and a share of each 32-byte secret."""

    sender: str
    index: int
    masking_share: tuple[bytes, bytes] = field(repr=False)
    seed_share: tuple[bytes, bytes] = field(repr=False)


def _share_key(context: Context, private: X25519PrivateKey, public: X25519PublicKey, sender: str,
               recipient: str) -> tuple[AESGCM, bytes]:
    """The AEAD of one sender-recipient pair and its AAD, both bound to the context and the two names."""
    label = context.label("shares", sender, recipient)
    return AESGCM(_agree(private, public, label, sender)), label


def _split(secret: bytes, threshold: int, count: int) -> list[tuple[bytes, bytes]]:
    """Shares of a 32-byte secret for indices 1..count: its two halves shared with the same indices."""
    first = Shamir.split(threshold, count, secret[:_HALF], ssss=False)
    second = Shamir.split(threshold, count, secret[_HALF:], ssss=False)
    return [(a, b) for (_, a), (_, b) in zip(first, second, strict=True)]


def _seal(keys: ClientKeys, recipient: str, public: X25519PublicKey, plaintext: bytes) -> str:
    """Base64 of a random nonce and the AES-GCM ciphertext of ``plaintext`` for ``recipient``.

    The nonce is random, not fixed: a task run again encrypts other shares under the same key.
    """
    aead, label = _share_key(keys.context, keys.encryption, public, keys.client, recipient)
    nonce = os.urandom(_NONCE_BYTES)
    return b64(nonce + aead.encrypt(nonce, plaintext, label))


def make_shares(keys: ClientKeys, advertisements: Mapping[str, Advertisement], share_set: Sequence[str],
                threshold: int) -> SharesMessage:
    """Share ``keys``' masking key and self seed, ``threshold`` of the set's size, to the advertised members.

    Each member's index is its 1-based position in the sorted share set (so any party can tell
    which index a revealer must hold); each member's plaintext is encrypted to its advertised key.
    Shamir's coefficients are drawn afresh: a task run again writes other (equally valid) shares,
    so the coordinator must relay one message per sender, never mix two.
    """
    members = sorted(set(share_set))
    if keys.client not in members:
        raise BadInputError(f"{keys.client} is not in its own share set {members}")
    if not 2 <= threshold <= MAX_SHARE_SET or len(members) > MAX_SHARE_SET:
        raise BadInputError(f"secure aggregation threshold {threshold} and share set of {len(members)}: both must "
                            f"be within 2..{MAX_SHARE_SET}")
    for name, advertisement in advertisements.items():
        advertisement.check(keys.context, name)
    recipients = [m for m in members if m in advertisements or m == keys.client]
    if len(recipients) < threshold:
        raise ThresholdNotMet(f"{keys.client}: {len(recipients)} of {len(members)} clients of its share set "
                              f"advertised keys, threshold {threshold}")
    masking = _split(keys.masking.private_bytes_raw(), threshold, len(members))
    seeds = _split(keys.self_seed, threshold, len(members))
    ciphertexts = {}
    for index, member in enumerate(members, start=1):
        if member not in recipients:
            continue
        public = keys.encryption.public_key() if member == keys.client else advertisements[member].encryption_public()
        plaintext = index.to_bytes(_INDEX_BYTES, "big") + b"".join(masking[index - 1]) + b"".join(seeds[index - 1])
        ciphertexts[member] = _seal(keys, member, public, plaintext)
    context = keys.context
    return SharesMessage(version=SECAGG_VERSION, training=context.training, round=context.round,
                         attempt=context.attempt, sender=keys.client, threshold=threshold, ciphertexts=ciphertexts)


def open_share(keys: ClientKeys, sender: Advertisement, message: SharesMessage) -> Share:
    """The share ``message`` holds for ``keys.client``; `SecAggRefused` naming the sender if it does not verify.

    Authentication fails for a forged or altered ciphertext and for one replayed from another
    training, round, attempt, sender or recipient: each is bound to all of them.
    """
    what = f"{sender.client}'s share for {keys.client}"
    sender.check(keys.context, sender.client)
    check_context(message, keys.context, what)
    if message.sender != sender.client:
        raise SecAggRefused(f"{what}: the message names sender {message.sender!r}")
    sealed = message.ciphertexts.get(keys.client)
    if sealed is None:
        raise SecAggRefused(f"{what}: {sender.client}'s shares hold none for {keys.client}")
    data = unb64(sealed, _SEALED_BYTES, what)
    aead, label = _share_key(keys.context, keys.encryption, sender.encryption_public(), sender.client, keys.client)
    try:
        plaintext = aead.decrypt(data[:_NONCE_BYTES], data[_NONCE_BYTES:], label)
    except InvalidTag as error:
        raise SecAggRefused(f"{what}: fails authentication: forged, altered, or replayed from another training, "
                            "round, attempt or sender") from error
    index = int.from_bytes(plaintext[:_INDEX_BYTES], "big")
    halves = [plaintext[start:start + _HALF] for start in range(_INDEX_BYTES, _SHARE_BYTES, _HALF)]
    if index < 1:
        raise SecAggRefused(f"{what}: index {index}")
    return Share(sender.client, index, (halves[0], halves[1]), (halves[2], halves[3]))


def _revealed(share: Share, halves: tuple[bytes, bytes]) -> str:
    return b64(share.index.to_bytes(_INDEX_BYTES, "big") + b"".join(halves))


def reveal(keys: ClientKeys, shares: Mapping[str, Share], survivors: Collection[str],
           dropped: Collection[str]) -> Reveal:
    """The shares that unmask the sum: a survivor's seed share, a dropped sender's masking-key share.

    A sender named both survivor and dropped is refused: both of its shares would unmask its update.
    """
    both = sorted(set(survivors) & set(dropped))
    if both:
        raise SecAggRefused(f"{keys.client} refuses to reveal: {', '.join(both)} listed both as surviving and as "
                            "dropped; revealing both shares would unmask their update")
    for name, share in shares.items():
        if share.sender != name:
            raise BadInputError(f"the share held under {name!r} is {share.sender!r}'s")
    context = keys.context
    return Reveal(version=SECAGG_VERSION, training=context.training, round=context.round, attempt=context.attempt,
                  client=keys.client,
                  seeds={s: _revealed(share, share.seed_share) for s, share in shares.items() if s in survivors},
                  masking_keys={s: _revealed(share, share.masking_share) for s, share in shares.items()
                                if s in dropped})


# --- masking ----------------------------------------------------------------------------------------


_CHUNK = 1 << 16  # elements (256 KiB): one chunk of every keystream is added while it is still in cache


def _add_streams(total: NDArray[np.uint32], streams: Sequence[tuple[bytes, int]]) -> None:
    """Add each key's ChaCha20 keystream (read as little-endian uint32) to ``total`` with its sign, mod 2^32.

    Chunk by chunk, every key per chunk: ``total`` passes through memory once whatever the number
    of keys, and no keystream is ever whole in memory (a fresh 10 MB buffer per key cost more than
    the cipher). ChaCha20 holds the GIL, so threads would not help.
    """
    encryptors = [(Cipher(algorithms.ChaCha20(key, _PRG_NONCE), mode=None).encryptor(), sign) for key, sign in streams]
    zeros = memoryview(bytes(4 * _CHUNK))
    scratch = bytearray(4 * _CHUNK)
    for start in range(0, total.size, _CHUNK):
        part = total[start:start + _CHUNK]
        for encryptor, sign in encryptors:
            encryptor.update_into(zeros[:4 * part.size], scratch)
            stream = np.frombuffer(scratch, dtype="<u4", count=part.size)
            if sign > 0:
                np.add(part, stream, out=part)
            else:
                np.subtract(part, stream, out=part)


def _pair_seed(context: Context, private: X25519PrivateKey, public: X25519PublicKey, a: str, b: str) -> bytes:
    """The 32-byte key of the pairwise mask between ``a`` and ``b``, the same from either side."""
    low, high = sorted((a, b))
    return _agree(private, public, context.label("mask", low, high), b)


def mask(vector: NDArray[np.uint32], keys: ClientKeys, peers: Mapping[str, Advertisement]) -> NDArray[np.uint32]:
    """``vector`` plus the self mask and, per peer, +/- the pairwise mask (+ towards a later name), mod 2^32.

    ``peers`` are the members of the client's share set that shared (itself included or not): the
    same list the coordinator unmasks with, or the sum keeps a mask nobody can remove.
    """
    if vector.dtype != np.uint32 or vector.ndim != 1 or vector.size == 0:
        raise BadInputError(f"mask takes a non-empty 1-D uint32 vector, got {vector.dtype} of shape {vector.shape}")
    streams = [(keys.self_seed, +1)]
    for name, advertisement in sorted(peers.items()):
        if name == keys.client:
            continue
        advertisement.check(keys.context, name)
        seed = _pair_seed(keys.context, keys.masking, advertisement.masking_public(), keys.client, name)
        streams.append((seed, +1 if keys.client < name else -1))
    total = vector.copy()
    _add_streams(total, streams)
    return total


# --- unmasking --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Revealed:
    """One revealed share of one owner's secret: who revealed it, its index, its two halves."""

    revealer: str
    index: int
    halves: tuple[bytes, bytes]


def _collect(owner: str, kind: str, members: Sequence[str], reveals: Mapping[str, Reveal]) -> list[_Revealed]:
    """The shares of ``owner``'s ``kind`` secret that members of its share set revealed, each at its own index."""
    ordered = sorted(set(members))
    found = []
    for revealer in ordered:
        message = reveals.get(revealer)
        text = None if message is None else (message.seeds if kind == "seed" else message.masking_keys).get(owner)
        if text is None:
            continue
        data = unb64(text, _REVEALED_BYTES, f"{revealer}'s reveal of {owner}'s {kind} share")
        index = int.from_bytes(data[:_INDEX_BYTES], "big")
        if index != ordered.index(revealer) + 1:
            raise SecAggRefused(f"{revealer}'s reveal of {owner}'s {kind} share: index {index}, but {revealer} "
                                f"holds index {ordered.index(revealer) + 1} of {owner}'s share set")
        found.append(_Revealed(revealer, index, (data[_INDEX_BYTES:_INDEX_BYTES + _HALF], data[_INDEX_BYTES + _HALF:])))
    return found


# How many subsets of ``threshold`` revealed shares are tried when a combined secret fails its check: with one
# wrong share among threshold + 1, one of the first threshold + 1 subsets leaves it out.
MAX_SUBSETS = 64


def _combine(shares: Sequence[_Revealed]) -> bytes:
    """The secret from exactly ``threshold`` shares, as pycryptodome asks."""
    return b"".join(Shamir.combine([(s.index, s.halves[half]) for s in shares], ssss=False) for half in (0, 1))


def _recover(owner: str, kind: str, shares: list[_Revealed], members: int, threshold: int,
             valid: Callable[[bytes], bool]) -> bytes:
    """The secret whose check passes, from some ``threshold`` of the revealed shares.

    One survivor revealing a wrong share must not stop the round while enough others are right:
    subsets are tried in order until one combines to the secret the owner committed to.
    """
    if len(shares) < threshold:
        raise ThresholdNotMet(f"{len(shares)} of {members} clients' shares of {owner}'s {kind}, threshold {threshold}")
    for used in itertools.islice(itertools.combinations(shares, threshold), MAX_SUBSETS):
        secret = _combine(used)
        if valid(secret):
            return secret
    revealers = ", ".join(s.revealer for s in shares)
    raise SecAggRefused(f"{owner}'s {kind}, combined from the shares {revealers} revealed, does not match what "
                        f"{owner} advertised: too many of them revealed a wrong share")


def _recover_seed(owner: str, advertisement: Advertisement, shares: list[_Revealed], members: int, threshold: int,
                  context: Context) -> bytes:
    return _recover(owner, "self seed", shares, members, threshold,
                    lambda seed: _commitment(context, owner, seed) == advertisement.seed_commitment)


def _recover_masking(owner: str, advertisement: Advertisement, shares: list[_Revealed], members: int,
                     threshold: int) -> X25519PrivateKey:
    wanted = advertisement.masking_public().public_bytes_raw()
    raw = _recover(owner, "masking key", shares, members, threshold,
                   lambda secret: X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes_raw() == wanted)
    return X25519PrivateKey.from_private_bytes(raw)


def _check_inputs(masked: Mapping[str, NDArray[np.uint32]], reveals: Mapping[str, Reveal],
                  advertisements: Mapping[str, Advertisement], sets: Mapping[str, Sequence[str]],
                  shared: Collection[str], context: Context) -> int:
    """Refuse a survivor that never shared, vectors of unequal length, messages of another context; the length."""
    outsiders = sorted(set(masked) - set(shared))
    if outsiders:
        raise SecAggRefused(f"masked updates of {', '.join(outsiders)}, who posted no shares: refused")
    shapes = {vector.shape for vector in masked.values()}
    if len(shapes) != 1 or any(vector.dtype != np.uint32 or vector.ndim != 1 for vector in masked.values()):
        raise SecAggRefused(f"masked updates of unequal shapes or dtypes: {sorted(shapes)}")
    for name, message in reveals.items():
        check_context(message, context, f"{name}'s reveal")
        if message.client != name:
            raise SecAggRefused(f"{name}'s reveal names client {message.client!r}")
    for name in shared:
        if name not in advertisements or name not in sets:
            raise BadInputError(f"{name} shared but has no advertisement or share set")
        advertisements[name].check(context, name)
    return next(iter(shapes))[0]


def _unmasking_streams(masked: Mapping[str, NDArray[np.uint32]], reveals: Mapping[str, Reveal],
                       advertisements: Mapping[str, Advertisement], sets: Mapping[str, Sequence[str]],
                       dropped: Sequence[str], threshold: int, context: Context) -> list[tuple[bytes, int]]:
    """The keystreams, with their signs, that take every remaining mask off the sum of ``masked``.

    Each survivor's self mask, and the pairwise masks its surviving neighbours added for each
    dropped client; each secret checked against its owner's commitment or advertised key first.
    """
    streams = [(_recover_seed(owner, advertisements[owner], _collect(owner, "seed", sets[owner], reveals),
                              len(set(sets[owner])), threshold, context), -1) for owner in sorted(masked)]
    for owner in dropped:
        neighbours = [k for k in sorted(set(sets[owner])) if k in masked]
        if not neighbours:
            continue  # no survivor masked against it: its key stays secret
        shares = _collect(owner, "masking key", sets[owner], reveals)
        key = _recover_masking(owner, advertisements[owner], shares, len(set(sets[owner])), threshold)
        streams += [(_pair_seed(context, key, advertisements[k].masking_public(), owner, k), -1 if k < owner else +1)
                    for k in neighbours]
    return streams


def unmask(masked: Mapping[str, NDArray[np.uint32]], reveals: Mapping[str, Reveal],
           advertisements: Mapping[str, Advertisement], sets: Mapping[str, Sequence[str]], shared: Collection[str],
           threshold: int, context: Context) -> NDArray[np.uint32]:
    """The sum of the survivors' quantised vectors: their masked vectors less every mask the sum still holds.

    ``masked`` holds the survivors' vectors (U3), ``shared`` who posted shares (U2). Per survivor,
    its self seed comes from its share set's seed shares (checked against its commitment); per
    client that shared but did not upload, its masking key comes from its masking-key shares
    (checked against its advertised key), and the masks its surviving neighbours added for it are
    taken off. Every secret is recovered and checked before any arithmetic.
    """
    dropped = sorted(set(shared) - set(masked))
    if len(masked) < threshold:
        raise ThresholdNotMet(f"{len(masked)} of {len(sets)} clients' masked updates, threshold {threshold}")
    length = _check_inputs(masked, reveals, advertisements, sets, shared, context)
    streams = _unmasking_streams(masked, reveals, advertisements, sets, dropped, threshold, context)
    total = np.zeros(length, np.uint32)
    for vector in masked.values():
        np.add(total, vector, out=total)
    _add_streams(total, streams)
    return total
