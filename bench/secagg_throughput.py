"""Secure aggregation's masking and unmasking throughput against the memory bandwidth of the same machine.

Usage: python bench/secagg_throughput.py [--elements 2555002] [--clients 10] [--neighbours N] [--repeats 5]

The default vector is MobileNetV3-small's full state (1000 classes: 2,555,002 elements, parameters
and buffers) plus the weight element. Every figure is the median of ``--repeats`` runs, taken in
this one process, so the ratios compare like with like:

- memory copy: numpy copying a 256 MB array (bytes copied per second; each byte is read and written);
- keystream: one ChaCha20 keystream of the vector's length added to it (cryptography's cipher, OpenSSL
  underneath, and numpy's add, chunk by chunk as `mask` does);
- mask: one client's `mask` (self mask and one pairwise mask per peer), bytes of keystream per second;
- unmask: the coordinator's `unmask` of all clients (sum, self seeds, Shamir reconstruction), and
  again with one client dropped after sharing (its masking key reconstructed, its pairwise masks
  taken off); the reconstruction of the secrets alone (pycryptodome's Shamir, pure Python, grows
  with the threshold squared per secret: SecAgg+'s neighbours keep it small);
- quantise / dequantise: the fixed-point conversion either side.

Goal: masking and unmasking within a small factor of the memory copy, so that a secure round costs
about one more pass over the update, not a recomputation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from fedtrain.worker.secagg import (
    ClientKeys,
    Context,
    QuantisationPlan,
    Reveal,
    make_shares,
    mask,
    open_share,
    reveal,
    share_sets,
    unmask,
)
from fedtrain.worker.secagg import _add_streams as add_streams
from fedtrain.worker.secagg import _unmasking_streams as unmasking_streams

MOBILENET_V3_SMALL = 2_555_002  # elements of its full state with 1000 classes (parameters and buffers)


def median_seconds(action: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of ``action`` after one warm-up run."""
    action()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_copy(repeats: int) -> float:
    """Bytes per second numpy copies a 256 MB array at."""
    source = np.ones(256 * 1024 * 1024 // 8, np.float64)
    target = np.empty_like(source)
    return source.nbytes / median_seconds(lambda: np.copyto(target, source), repeats)


class Federation:
    """``clients`` past the share stage, each with a quantised random update."""

    def __init__(self, clients: int, neighbours: int, elements: int) -> None:
        self.context = Context("bench/secagg", 1, 1)
        self.names = [f"client-{i:03d}" for i in range(clients)]
        self.sets = share_sets(self.names, neighbours, seed="bench")
        self.threshold = max(2, (min(len(s) for s in self.sets.values()) * 2 + 2) // 3)
        self.keys = {c: ClientKeys.derive(os.urandom(32), self.context, c) for c in self.names}
        self.ads = {c: k.advertisement() for c, k in self.keys.items()}
        self.messages = {c: make_shares(self.keys[c], {m: self.ads[m] for m in self.sets[c]}, self.sets[c],
                                        self.threshold) for c in self.names}
        self.plan = QuantisationPlan.for_model({"w": np.zeros(elements, np.float32)}, 1.0, clients)
        rng = np.random.default_rng(0)
        self.delta = {"w": (rng.normal(size=elements) / np.sqrt(elements)).astype(np.float32)}
        self.vectors = {c: self.plan.quantise(self.delta, 0.5) for c in self.names}

    def masked(self, client: str) -> NDArray[np.uint32]:
        return mask(self.vectors[client], self.keys[client], {m: self.ads[m] for m in self.sets[client]})

    def reveals(self, survivors: list[str], dropped: list[str]) -> dict[str, Reveal]:
        return {r: reveal(self.keys[r], {s: open_share(self.keys[r], self.ads[s], self.messages[s])
                                         for s in self.sets[r]}, survivors, dropped) for r in survivors}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--elements", type=int, default=MOBILENET_V3_SMALL)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--neighbours", type=int, default=None, help="SecAgg+ neighbours (default: all clients)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    neighbours = args.neighbours if args.neighbours is not None else args.clients - 1
    federation = Federation(args.clients, neighbours, args.elements)
    length = federation.plan.length
    vector_bytes = 4 * length
    peers = len(federation.sets[federation.names[0]]) - 1

    copy = memory_copy(args.repeats)
    key, zeros = os.urandom(32), np.zeros(length, np.uint32)
    keystream_s = median_seconds(lambda: add_streams(zeros, [(key, +1)]), args.repeats)
    quantise_s = median_seconds(lambda: federation.plan.quantise(federation.delta, 0.5), args.repeats)
    mask_s = median_seconds(lambda: federation.masked(federation.names[0]), args.repeats)
    masked = {c: federation.masked(c) for c in federation.names}
    everyone = federation.reveals(federation.names, [])
    unmask_s = median_seconds(lambda: unmask(masked, everyone, federation.ads, federation.sets, federation.names,
                                             federation.threshold, federation.context), args.repeats)
    gone = federation.names[-1]
    survivors = federation.names[:-1]
    some = {c: masked[c] for c in survivors}
    partial = federation.reveals(survivors, [gone])
    dropout_s = median_seconds(lambda: unmask(some, partial, federation.ads, federation.sets, federation.names,
                                              federation.threshold, federation.context), args.repeats)
    secrets_s = median_seconds(lambda: unmasking_streams(masked, everyone, federation.ads, federation.sets, [],
                                                         federation.threshold, federation.context), args.repeats)
    total = unmask(masked, everyone, federation.ads, federation.sets, federation.names, federation.threshold,
                   federation.context)
    dequantise_s = median_seconds(lambda: federation.plan.dequantise(total), args.repeats)
    gone_neighbours = len([k for k in federation.sets[gone] if k != gone])

    rows = [
        ("memory copy (numpy, 256 MB)", None, copy, 1),
        ("ChaCha20 keystream, added", keystream_s, vector_bytes, 1),
        (f"mask (1 client, self + {peers} pairwise)", mask_s, vector_bytes, peers + 1),
        (f"unmask ({args.clients} clients, none dropped)", unmask_s, vector_bytes, args.clients + args.clients),
        (f"unmask ({args.clients - 1} clients, 1 dropped after sharing)", dropout_s, vector_bytes,
         2 * (args.clients - 1) + gone_neighbours),
        (f"of which secret reconstruction ({args.clients} self seeds, Shamir)", secrets_s, 0, 0),
        ("quantise (1 client)", quantise_s, vector_bytes, 1),
        ("dequantise", dequantise_s, vector_bytes, 1),
    ]
    print(f"{args.clients} clients, {peers} peers each, threshold {federation.threshold}, "
          f"{length:,} uint32 elements ({vector_bytes / 2**20:.1f} MiB), median of {args.repeats}; "
          f"load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print()
    print("| step | time | throughput | ÷ memory copy |")
    print("|---|---:|---:|---:|")
    for name, seconds, size, passes in rows:
        if seconds is None:
            print(f"| {name} | | {copy / 1e9:.2f} GB/s | 1.00 |")
            continue
        if not size:
            print(f"| {name} | {seconds * 1e3:.1f} ms | | |")
            continue
        rate = size * passes / seconds
        print(f"| {name} | {seconds * 1e3:.1f} ms | {rate / 1e9:.2f} GB/s | {rate / copy:.2f} |")
    print()
    print(f"one round's masking work, {args.clients} clients (each masks once) + one unmask: "
          f"{(args.clients * mask_s + unmask_s):.2f} s of CPU in all; per client {mask_s:.3f} s, coordinator "
          f"{unmask_s:.3f} s")
    print("throughput counts the vector bytes each step passes over: mask and unmask one per keystream (plus "
          "unmask's sum of the uploads)")


if __name__ == "__main__":
    main()
