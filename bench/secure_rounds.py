"""Secure aggregation against plain FedAvg: `fedtrain run` of the same federation, side by side in one run.

Usage: python bench/secure_rounds.py [--clients 4,10] [--pairs 2] [--rounds 4] [--image-size 32]
                                     [--per-class 30] [--test-per-class 10] [--epochs 3] [--lr 0.005]
                                     [--clip-norm 1000] [--no-dropout]
Goal: secure / plain round time <= 1.05, final accuracy within 0.5 points, extra bytes per client and
round <= the float32 update's own size.

Per client count, `--pairs` repetitions of, in this order: plain FedAvg (`privacy` unset), the
same spec with ``privacy: {clipNorm: C, secureAggregation: {threshold: t}}`` (noiseMultiplier 0,
its default with secure aggregation; C far above any update's norm, so nothing is clipped and the
accuracies compare), and, unless ``--no-dropout``, the secure spec again with one client's master
secret made unusable beforehand (5 bytes, as tests/local/test_secure_run.py does): its keys stage
fails every round (bad input, not retried) and each round completes with the others. The runs of
a repetition follow each other, so load from other work slows all of them alike; ratios are
medians over the repetitions.

Every run is `fedtrain run`'s runner (`run_training`, as the CLI calls it) on MobileNetV3-small
from scratch, on one synthetic data set generated before the clocks start and dealt out iid, with
``clients.minSuccessful`` n - 1 and ``clients.maxExamples`` the training split's size in every
variant; threshold ceil(2n/3). Measured:

- per round, wall seconds from the round appearing in the status to its completion (all of its
  stages: keys, shares, training, unmasking, aggregation with the central evaluation), read from
  the status the runner reports after each pass; and the task CPU seconds of the round (the fork
  server's per-task figures), by stage. The status's own ``startedAt`` is not used: a secure round
  restarts it when training begins, so it leaves out the key and share stages;
- final central test accuracy of each variant (and per round in the first repetition), and the
  largest difference between the plain and the secure global model after round 1, which both
  build from the same updates (training is deterministic), so only the encoding differs;
- bytes each client writes per round (keys.json, shares.json, masked.safetensors and its .json,
  reveal.json) against the plain update and its sidecar, and what it reads of the others' messages
  (the advertisements of its share set at the share, training and unmask stages, their shares at
  the unmask stage), beside the float32 update (4 bytes per model element);
- the quantisation error bound each secure aggregation reported, and the largest update norm of
  the plain runs (to show the clip norm clipped nothing).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from fedtrain.engine.status import TrainingStatus
from fedtrain.local.runner import RunOptions, run_training
from fedtrain.spec import parse_manifest
from fedtrain.worker.data.synth import SynthConfig, generate
from fedtrain.worker.quantisation import QuantisationPlan

CORES = os.cpu_count() or 1
VARIANTS = ("plain", "secure", "dropout")
MESSAGES = ("keys.json", "shares.json", "masked.safetensors", "masked.json", "reveal.json")
STAGES = ("keys", "shares", "train", "unmask", "aggregate")


def manifest(args: argparse.Namespace, clients: int, data: Path, variant: str) -> dict[str, Any]:
    """The federation of one variant: the same spec but for ``privacy``."""
    train_images = args.per_class * 43
    spec: dict[str, Any] = {
        "rounds": args.rounds, "seed": 3,
        "model": {"architecture": "mobilenet_v3_small", "numClasses": 43, "imageSize": args.image_size},
        "dataset": {"path": str(data)}, "partition": {"scheme": "iid", "seed": 7},
        "clients": {"count": clients, "minSuccessful": clients - 1, "maxExamples": train_images},
        "training": {"localEpochs": args.epochs, "batchSize": 32, "optimizer": "adam", "learningRate": args.lr},
        "strategy": {"name": "fedavg"}, "worker": {"parallelism": 2, "device": "cpu"},
        "roundDeadlineSeconds": 1800, "mlflow": {"experiment": "bench-secure"},
    }
    if variant != "plain":
        spec["privacy"] = {"clipNorm": args.clip_norm, "secureAggregation": {"threshold": threshold(clients)}}
    return {"apiVersion": "fedtrain.io/v1alpha1", "kind": "FederatedTraining",
            "metadata": {"name": f"bench-{variant}-{clients}"}, "spec": spec}


def threshold(clients: int) -> int:
    """ceil(2n/3), at least 2 and at most n - 1 (so that one client may drop)."""
    return min(max(2, math.ceil(2 * clients / 3)), clients - 1)


@dataclass
class Run:
    """One `fedtrain run`: its wall, its rounds' walls and task CPU (by stage), its final accuracy."""

    wall: float = 0.0
    rounds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)  # wall seconds per stage, one per round
    stage_cpu: dict[str, list[float]] = field(default_factory=dict)
    accuracy: float = 0.0
    error_bound: float = 0.0  # the largest result.json reported (all tensors: BatchNorm's integer counters lead)
    float_bound: float = 0.0  # the same bound for the float tensors alone
    accepted: list[int] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)  # central test accuracy after each round
    first_model: dict[str, np.ndarray] = field(default_factory=dict)  # the global model after round 1


class RoundClock:
    """Timestamps of each round's stages, from the statuses the runner hands over after each pass."""

    def __init__(self) -> None:
        self.marks: dict[int, list[tuple[str, float]]] = {}

    def __call__(self, status: TrainingStatus) -> None:
        now = time.monotonic()
        for record in status.rounds:
            marks = self.marks.setdefault(record.round, [])
            if record.finished_at is not None:
                stage = "done"
            elif record.aggregation is not None:
                stage = "aggregate"
            elif record.secure is not None:
                stage = record.secure.stage
            else:
                stage = "train"
            if not marks or marks[-1][0] != stage:
                marks.append((stage, now))

    def walls(self) -> list[float]:
        """Each round's wall: its first mark to its completion."""
        return [marks[-1][1] - marks[0][1] for _, marks in sorted(self.marks.items())]

    def stages(self) -> dict[str, list[float]]:
        """Wall seconds of each stage in each round."""
        found: dict[str, list[float]] = {stage: [] for stage in STAGES}
        for _, marks in sorted(self.marks.items()):
            spent = {stage: 0.0 for stage in STAGES}
            for (stage, start), (_, end) in itertools.pairwise(marks):
                spent[stage] += end - start
            for stage in STAGES:
                found[stage].append(spent[stage])
        return found


def stage_of(task: str) -> str:
    """The stage a task id belongs to: k0001-, s0001-, r0001-<client>-, u0001-, r0001-aggregate-."""
    if "-aggregate-" in task:
        return "aggregate"
    return {"k": "keys", "s": "shares", "r": "train", "u": "unmask"}[task[0]]


def run_once(args: argparse.Namespace, clients: int, data: Path, variant: str, workdir: Path) -> Run:
    """One variant's `fedtrain run` in a fresh work directory."""
    spec = manifest(args, clients, data, variant)
    if variant == "dropout":  # the last client's keys stage fails in every round: its secret is unusable
        (workdir / "secrets").mkdir(parents=True, mode=0o700)
        (workdir / "secrets" / f"client-{clients - 1:02d}.key").write_bytes(b"short")
    clock = RoundClock()
    began = time.monotonic()
    result = run_training(parse_manifest(spec), RunOptions(workdir, f"sqlite:///{workdir / 'mlflow.db'}"),
                          on_status=clock)
    wall = time.monotonic() - began
    if result.status.phase != "Succeeded":
        raise SystemExit(f"{variant} with {clients} clients ended {result.status.phase}: {result.status.message}")
    found = Run(wall=wall, rounds=clock.walls(), stages=clock.stages())
    found.stage_cpu = {stage: [] for stage in STAGES}
    for number in range(1, args.rounds + 1):
        tasks = {t: s for t, s in result.cpu_seconds.items() if t[1:5] == f"{number:04d}" and t[0] in "ksru"}
        found.cpu.append(sum(tasks.values()))
        for stage in STAGES:
            found.stage_cpu[stage].append(sum(s for t, s in tasks.items() if stage_of(t) == stage))
        outcome = json.loads((workdir / f"round-{number:04d}" / "result.json").read_text())
        found.accepted.append(len(outcome["accepted"]))
        found.accuracies.append(float(outcome["accuracy"]))
        secure = outcome.get("secure_aggregation")
        if secure is not None:
            found.error_bound = max(found.error_bound, secure["quantisation_error_bound"])
            plan = QuantisationPlan.for_model({"w": np.zeros(1, np.float32)}, args.clip_norm, len(secure["shared"]))
            found.float_bound = max(found.float_bound, plan.error_bound(secure["weight_sum"])["w"])
    found.accuracy = found.accuracies[-1]  # unrounded (the status keeps 4 digits)
    found.first_model = load_file(str(workdir / "round-0001" / "global.safetensors"))
    return found


def largest_difference(plain: dict[str, np.ndarray], secure: dict[str, np.ndarray]) -> float:
    """The largest absolute difference between two models' float tensors (round 1 trains the same updates)."""
    return max(float(np.max(np.abs(plain[k].astype(np.float64) - secure[k].astype(np.float64))))
               for k in plain if plain[k].dtype.kind == "f")


def update_norms(workdir: Path, rounds: int) -> float:
    """The largest L2 norm (float tensors, buffers included) of a plain run's updates: what clipping would see."""
    largest = 0.0
    for number in range(1, rounds + 1):
        base = load_file(str(workdir / f"round-{number - 1:04d}" / "global.safetensors"))
        for path in (workdir / f"round-{number:04d}" / "clients").glob("*.safetensors"):
            update = load_file(str(path))
            squares = sum(float(np.sum(np.square(update[k].astype(np.float64) - base[k].astype(np.float64))))
                          for k in base if base[k].dtype.kind == "f")
            largest = max(largest, math.sqrt(squares))
    return largest


def traffic(workdir: Path, rounds: int, secure: bool) -> dict[str, float]:
    """Bytes per client and round: written (the update or the secure messages) and read of the others' messages.

    A secure client reads the advertisements of its share set (everyone here: no neighbours set)
    at the share, training and unmask stages, and their shares at the unmask stage; every client
    reads the global model, which is the same either way and left out.
    """
    written: list[int] = []
    read: list[int] = []
    model_elements = 0
    for number in range(1, rounds + 1):
        folder = workdir / f"round-{number:04d}"
        if not secure:
            for path in (folder / "clients").glob("*.safetensors"):
                written.append(path.stat().st_size + path.with_suffix(".json").stat().st_size)
                model_elements = sum(v.size for v in load_file(str(path)).values())
            continue
        senders = sorted(p for p in folder.glob("secure-a*/*") if (p / "masked.safetensors").exists())
        keys = sum((p / "keys.json").stat().st_size for p in senders)
        shares = sum((p / "shares.json").stat().st_size for p in senders)
        for sender in senders:
            written.append(sum((sender / name).stat().st_size for name in MESSAGES if (sender / name).exists()))
            read.append(3 * keys + shares)
            model_elements = load_file(str(sender / "masked.safetensors"))["masked"].size - 1
    return {"written": statistics.mean(written), "read": statistics.mean(read) if read else 0.0,
            "float32": 4.0 * model_elements}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(clients: int, runs: dict[str, list[Run]], plain_bytes: dict[str, float],
           secure_bytes: dict[str, float], norm: float, args: argparse.Namespace) -> None:
    """The tables of one client count."""
    plain, secure = runs["plain"], runs["secure"]
    print(f"\n### {clients} clients, threshold {threshold(clients)}, {len(plain)} interleaved repetitions\n")
    print("| variant | median round | task CPU per round | whole run (init, finalize) | final accuracy |")
    print("|---|---:|---:|---:|---|")
    for variant, found in runs.items():
        if not found:
            continue
        rounds = [statistics.median(r.rounds) for r in found]
        cpu = [statistics.median(r.cpu) for r in found]
        accuracies = " / ".join(f"{r.accuracy:.4f}" for r in found)
        print(f"| {variant} | {median(rounds):.1f} s | {median(cpu):.1f} s | {median([r.wall for r in found]):.1f} s "
              f"| {accuracies} |")
    ratios = [statistics.median(s.rounds) / statistics.median(p.rounds) for p, s in zip(plain, secure, strict=True)]
    cpu_ratios = [statistics.median(s.cpu) / statistics.median(p.cpu) for p, s in zip(plain, secure, strict=True)]
    seconds = [statistics.median(s.rounds) - statistics.median(p.rounds) for p, s in zip(plain, secure, strict=True)]
    print(f"\nsecure / plain, median round: **{median(ratios):.2f}** (each repetition: "
          f"{', '.join(f'{r:.2f}' for r in ratios)}; goal <= 1.05), {median(seconds):+.1f} s a round; task CPU per "
          f"round: {median(cpu_ratios):.2f}")
    gaps = [100 * (s.accuracy - p.accuracy) for p, s in zip(plain, secure, strict=True)]
    print(f"final accuracy, secure - plain: {', '.join(f'{g:+.2f}' for g in gaps)} points (goal within 0.5); "
          f"largest update norm in the plain runs {norm:.1f}, clip norm {args.clip_norm:g}; largest quantisation error "
          f"bound of the mean, float tensors {max(r.float_bound for r in secure):.1e} (result.json's, all tensors: "
          f"{max(r.error_bound for r in secure):.1e})")
    gaps_1 = [largest_difference(p.first_model, s.first_model) for p, s in zip(plain, secure, strict=True)]
    print(f"round 1 trains the same updates in both: largest |secure - plain| of the global model's float tensors "
          f"after it {max(gaps_1):.1e}")
    print(f"accuracy per round, first repetition: plain {' '.join(f'{a:.4f}' for a in plain[0].accuracies)}; "
          f"secure {' '.join(f'{a:.4f}' for a in secure[0].accuracies)}")
    if runs["dropout"]:
        drop = [statistics.median(d.rounds) / statistics.median(s.rounds)
                for s, d in zip(secure, runs["dropout"], strict=True)]
        costs = [statistics.median(d.rounds) - statistics.median(s.rounds)
                 for s, d in zip(secure, runs["dropout"], strict=True)]
        print(f"one client dropped at its keys stage, every round ({runs['dropout'][0].accepted[0]} of {clients} "
              f"accepted): median round {median(costs):+.1f} s, ratio to secure {median(drop):.2f}")
    print("\nmedian wall (task CPU) per round by stage, first repetition:\n")
    print("| variant | " + " | ".join(STAGES) + " |")
    print("|---|" + "---:|" * len(STAGES))
    for variant, found in runs.items():
        if found:
            first = found[0]
            cells = [f"{median(first.stages[s]):.1f} ({median(first.stage_cpu[s]):.1f})" for s in STAGES]
            print(f"| {variant} | " + " | ".join(cells) + " |")
    float32 = secure_bytes["float32"]
    print("\nbytes per client per round:\n")
    print("| | written | read of the others' messages | written + read - plain written | ÷ float32 update |")
    print("|---|---:|---:|---:|---:|")
    print(f"| float32 update (4 B × {float32 / 4:,.0f} elements) | {float32:,.0f} | | | 1.000 |")
    print(f"| plain: update + sidecar | {plain_bytes['written']:,.0f} | 0 | | {plain_bytes['written'] / float32:.3f} |")
    extra = secure_bytes["written"] + secure_bytes["read"] - plain_bytes["written"]
    print(f"| secure: keys, shares, masked + sidecar, reveal | {secure_bytes['written']:,.0f} | "
          f"{secure_bytes['read']:,.0f} | {extra:+,.0f} | {secure_bytes['written'] / float32:.3f} |")
    print(f"\nextra bytes per client per round: {extra:+,.0f} = {extra / float32:+.4f} × the float32 update "
          "(goal <= 1.0)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", default="4,10", help="client counts, comma-separated")
    parser.add_argument("--pairs", type=int, default=2, help="interleaved repetitions (plain, secure, dropout)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=30, help="training images per class, all clients together")
    parser.add_argument("--test-per-class", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.005, help="Adam's learning rate")
    parser.add_argument("--clip-norm", type=float, default=1000.0, help="privacy.clipNorm of the secure runs")
    parser.add_argument("--no-dropout", action="store_true", help="leave out the runs with a dropped client")
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    args = parser.parse_args()
    counts = [int(n) for n in args.clients.split(",") if n]
    if any(n < 3 for n in counts):
        parser.error("--clients: at least 3 each (a threshold of 2 with one client to drop)")
    scratch = Path(tempfile.mkdtemp(prefix="fedtrain-secure-bench-"))
    data = scratch / "data"
    generate(data, SynthConfig(args.per_class, args.test_per_class, 2, 1))
    variants = [v for v in VARIANTS if not (v == "dropout" and args.no_dropout)]
    print(f"mobilenet_v3_small at {args.image_size} px, {args.per_class} training and {args.test_per_class} test "
          f"images per class (43 classes), {args.rounds} rounds of {args.epochs} epoch(s), parallelism 2, "
          f"{CORES} cores; load average {os.getloadavg()[0]:.1f} at the start")
    began = time.monotonic()
    for clients in counts:
        runs: dict[str, list[Run]] = {v: [] for v in VARIANTS}
        plain_bytes: dict[str, float] = {}
        secure_bytes: dict[str, float] = {}
        norm = 0.0
        for repetition in range(args.pairs):
            for variant in variants:
                workdir = scratch / f"{variant}-{clients}-{repetition}"
                runs[variant].append(run_once(args, clients, data, variant, workdir))
                if variant == "dropout":
                    runs[variant][-1].first_model = {}  # only plain and secure's are compared
                if repetition == 0 and variant == "plain":
                    plain_bytes = traffic(workdir, args.rounds, secure=False)
                if repetition == 0 and variant == "secure":
                    secure_bytes = traffic(workdir, args.rounds, secure=True)
                if variant == "plain":
                    norm = max(norm, update_norms(workdir, args.rounds))
                if not args.keep:
                    shutil.rmtree(workdir)
        report(clients, runs, plain_bytes, secure_bytes, norm, args)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {CORES} cores (above {CORES}: machine busy); "
          f"{time.monotonic() - began:.0f} s in all")
    if args.keep:
        print(f"kept {scratch}")
    else:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
