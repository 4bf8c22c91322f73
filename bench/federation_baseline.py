"""`fedtrain run` against the same federation as one plain PyTorch process: the physical limit.

Usage: python bench/federation_baseline.py [--preset tiny|demo|mobilenet] [--rounds N] [--epochs N]
                                           [--repeat N] [--baseline sequential,pairs,exact]
Goal: local federation / in-process FedAvg <= 1.10, final accuracy within one point.

The baseline reads the partition and the selected clients that `fedtrain run` recorded, so both
train the very same shards. It decodes every image once and keeps it in memory, trains each
selected client from the previous global model (same seeds, same train/validation split, same
augmentation, Adam, validation on the held-out tracks), averages in memory, and evaluates on the
test split every round. It runs clients one after another (torch with every core) and two at a
time (two threads, one torch thread each); the faster counts as the limit. A third variant,
``exact`` (one after another, one torch thread), is the accuracy reference for models with
dropout: it trains to the bit as `fedtrain run`'s one-thread tasks do (see `VARIANTS`).

`fedtrain run` is timed as a whole (fork server start, init, rounds, finalize with MLflow) and by
rounds (first client launched to the aggregation recorded). Its per-round breakdown comes from
the workers' own timings (sidecars, result.json), the executor's process times and each task's
CPU seconds (from the fork server). ``--repeat`` alternates `fedtrain run` and the baselines, so
that a machine shared with other work slows both alike; the ratios are medians over repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from fedtrain.local.runner import RunOptions, RunResult, run_training
from fedtrain.spec import parse_manifest
from fedtrain.worker.data.gtsrb import Sample, load_tree, split_by_track
from fedtrain.worker.data.images import load_samples
from fedtrain.worker.data.synth import SynthConfig, generate
from fedtrain.worker.jobs import client_seed
from fedtrain.worker.models import IMAGENET_MEAN, IMAGENET_STD, ModelConfig, build_model
from fedtrain.worker.training import augment_batch

CORES = os.cpu_count() or 1
# In-process variants: clients trained at once (threads of one process), torch threads. `pairs` draws
# dropout masks from torch's one global generator in two threads at once, and `sequential` sums in
# another order with more threads, so for a model with dropout (MobileNet) only `exact` trains to
# the bit as `fedtrain run`'s one-thread tasks do.
VARIANTS: dict[str, tuple[int, int]] = {"sequential": (1, CORES), "pairs": (2, 1), "exact": (1, 1)}
SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "gtsrb-fedavg-local.yaml"
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"rounds": 6, "synthetic": {"imagesPerClass": 20, "testImagesPerClass": 6, "framesPerTrack": 4,
                                        "seed": 1}},
    "demo": {},
    "mobilenet": {"rounds": 4, "epochs": 1, "model": {"architecture": "mobilenet_v3_small", "imageSize": 64}},
}


def federation(preset: str, rounds: int | None, epochs: int | None) -> dict[str, Any]:
    """The README's demo spec, shrunk or changed by the preset and the options."""
    manifest = yaml.safe_load(SAMPLE.read_text())
    spec, changes = manifest["spec"], PRESETS[preset]
    spec["rounds"] = rounds or changes.get("rounds", spec["rounds"])
    spec["training"]["localEpochs"] = epochs or changes.get("epochs", spec["training"]["localEpochs"])
    spec["model"].update(changes.get("model", {}))
    spec["dataset"]["synthetic"].update(changes.get("synthetic", {}))
    manifest["metadata"]["name"] = f"bench-{preset}"
    return manifest


def make_data(manifest: dict[str, Any], folder: Path) -> Path:
    """Generate the synthetic set once; both sides read it from ``dataset.path``."""
    synthetic = manifest["spec"]["dataset"].pop("synthetic")
    generate(folder, SynthConfig(synthetic["imagesPerClass"], synthetic["testImagesPerClass"],
                                 synthetic["framesPerTrack"], synthetic["seed"]))
    manifest["spec"]["dataset"]["path"] = str(folder)
    return folder


# --- fedtrain run ---------------------------------------------------------------------------------


@dataclass
class Timing:
    """One federation's run: wall and CPU seconds in all, per round, and its test accuracy per round."""

    wall: float
    cpu: float
    accuracies: list[float] = field(default_factory=list)
    round_walls: list[float] = field(default_factory=list)
    round_cpu: list[float] = field(default_factory=list)
    decode: float = 0.0  # the baseline's decoding, before its first round

    @property
    def rounds(self) -> float:
        """Wall seconds of the rounds only."""
        return sum(self.round_walls)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the fork server and its tasks)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_fedtrain(manifest: dict[str, Any], workdir: Path) -> tuple[Timing, RunResult]:
    """`fedtrain run`'s runner, timed from the call to its return: wall and CPU seconds, in all and per round.

    A round's CPU is the sum of its tasks' own CPU seconds (reported by the fork server); the runner's
    and the server's share is in the whole run's figure only.
    """
    started, cpu = time.perf_counter(), cpu_seconds()
    result = run_training(parse_manifest(manifest), RunOptions(workdir, f"sqlite:///{workdir / 'mlflow.db'}"))
    wall = time.perf_counter() - started
    if result.status.phase != "Succeeded":
        raise SystemExit(f"fedtrain run ended {result.status.phase}: {result.status.message}")
    rounds = sorted(result.round_walls)
    timing = Timing(wall, cpu_seconds() - cpu, fedtrain_accuracies(workdir, manifest["spec"]["rounds"]),
                    [result.round_walls[n] for n in rounds])
    timing.round_cpu = [sum(v for k, v in result.cpu_seconds.items() if k.startswith(f"r{n:04d}-")) for n in rounds]
    return timing, result


def breakdown(workdir: Path, result: RunResult) -> dict[str, float]:
    """Median seconds per round of each part of a round, summed over the round's tasks.

    Client parts are summed over clients (CPU-seconds of work, comparable with the baseline's
    sequential sum); "process" is a task's wall in the executor minus what the worker measured
    inside it (fork, imports, argument parsing, writing the update, exit).
    """
    durations = result.durations
    rows: list[dict[str, float]] = []
    for number in sorted(result.round_walls):
        folder = workdir / f"round-{number:04d}"
        row: dict[str, float] = {"round wall": result.round_walls[number]}
        for sidecar in (folder / "clients").glob("*.json"):
            data = json.loads(sidecar.read_text())
            inside = 0.0
            for name, seconds in data.get("timings", {}).items():
                row[f"client {name}"] = row.get(f"client {name}", 0.0) + seconds
                inside += seconds
            task = last_attempt(durations, f"r{number:04d}-{data['client']}-a")
            if task is not None:
                row["client process"] = row.get("client process", 0.0) + durations[task] - inside
                row["client task CPU"] = row.get("client task CPU", 0.0) + result.cpu_seconds.get(task, 0.0)
        outcome = json.loads((folder / "result.json").read_text())
        evaluation = outcome.get("evaluation_seconds", 0.0)
        row["aggregate strategy"] = outcome["aggregation_seconds"]
        row["aggregate evaluation"] = evaluation
        task = last_attempt(durations, f"r{number:04d}-aggregate-a")
        if task is not None:
            row["aggregate process"] = durations[task] - outcome["seconds"]
            row["aggregate task CPU"] = result.cpu_seconds.get(task, 0.0)
        rows.append(row)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return {k: statistics.median(row.get(k, 0.0) for row in rows) for k in keys}


def last_attempt(durations: dict[str, float], prefix: str) -> str | None:
    """The id of a task's last attempt (ids end in ``-a<attempt>``)."""
    return max((t for t in durations if t.startswith(prefix)), key=lambda t: int(t.rsplit("-a", 1)[1]), default=None)


def fedtrain_accuracies(workdir: Path, rounds: int) -> list[float]:
    """Test accuracy after each round, from the aggregations' results."""
    return [json.loads((workdir / f"round-{n:04d}" / "result.json").read_text())["accuracy"]
            for n in range(1, rounds + 1)]


# --- the in-process baseline ----------------------------------------------------------------------


def normalised(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW with ImageNet statistics, once for a whole shard."""
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (batch - mean) / std


def plain_train(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, epochs: int, batch_size: int,
                learning_rate: float, seed: int) -> int:
    """A plain PyTorch loop: Adam, cross-entropy, the worker's augmentation and seeds."""
    torch.manual_seed(seed)
    order_rng = np.random.default_rng(seed)
    jitter = torch.Generator().manual_seed(seed)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, fused=True)  # the worker's (make_optimizer)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        order = torch.from_numpy(order_rng.permutation(len(labels)))
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            loss = loss_fn(model(augment_batch(inputs[index], jitter)), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return len(labels)


@torch.no_grad()
def accuracy_of(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in batches of 256."""
    model.eval()
    predicted = torch.cat([model(inputs[i:i + 256]).argmax(1) for i in range(0, len(labels), 256)])
    return float((predicted == labels).float().mean())


class InProcessFederation:
    """The same federation in one process, data decoded once and kept in memory."""

    def __init__(self, manifest: dict[str, Any], workdir: Path) -> None:
        recorded = json.loads((workdir / "manifest.json").read_text())
        settings = recorded["settings"]
        self.spec = manifest["spec"]
        self.model_config = ModelConfig.from_json(settings["model"])
        self.seed = int(settings["seed"])
        self.validation_fraction = float(settings["data"]["validation_fraction"])
        self.shards: dict[str, list[str]] = recorded["partition"]["clients"]
        status = json.loads((workdir / "status.json").read_text())
        self.selected = {r["round"]: r["selected"] for r in status["rounds"]}
        self.data = Path(self.spec["dataset"]["path"])

    def decode(self) -> None:
        """Index the data set and decode every image once."""
        tree = load_tree(self.data, self.model_config.num_classes)
        size, crop = self.model_config.image_size, settings_crop(self.spec)
        self.samples = {s.sample_id: s for s in tree.train}
        ids = sorted({i for shard in self.shards.values() for i in shard})
        images, _ = load_samples(tree, [self.samples[i] for i in ids], size, crop)
        self.inputs = normalised(images)
        self.row = {sample_id: row for row, sample_id in enumerate(ids)}
        test_images, test_labels = load_samples(tree, list(tree.test), size, crop)
        self.test_inputs, self.test_labels = normalised(test_images), torch.from_numpy(test_labels)

    def rows(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """One client's decoded inputs and labels."""
        index = torch.tensor([self.row[s.sample_id] for s in samples], dtype=torch.long)
        return self.inputs[index], torch.tensor([s.class_id for s in samples])

    def client_round(self, global_state: dict[str, torch.Tensor], number: int, client: str
                     ) -> tuple[dict[str, torch.Tensor], int]:
        """Train one client from the global model; validate it as the worker does."""
        seed = client_seed(self.seed, number, client)
        train, validation = split_by_track([self.samples[i] for i in self.shards[client]], self.validation_fraction,
                                           seed)
        model = build_model(self.model_config)
        model.load_state_dict(global_state)
        inputs, labels = self.rows(train)
        training = self.spec["training"]
        count = plain_train(model, inputs, labels, training["localEpochs"], training["batchSize"],
                            training["learningRate"], seed)
        if validation:
            accuracy_of(model, *self.rows(validation))
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, count

    def run(self, variant: str) -> Timing:
        """Wall and CPU seconds (decoding included), each round's, and test accuracy per round."""
        clients_at_once, threads = VARIANTS[variant]
        torch.set_num_threads(threads)
        started, cpu = time.perf_counter(), cpu_seconds()
        self.decode()
        torch.manual_seed(self.seed)
        global_state = build_model(self.model_config).state_dict()
        timing = Timing(0.0, 0.0, decode=time.perf_counter() - started)
        with ThreadPoolExecutor(clients_at_once) as pool:
            for number in sorted(self.selected):
                round_started, round_cpu = time.perf_counter(), cpu_seconds()
                results = list(pool.map(lambda c, n=number, g=global_state: self.client_round(g, n, c),
                                        self.selected[number]))
                global_state = average(global_state, results)
                model = build_model(self.model_config)
                model.load_state_dict(global_state)
                timing.accuracies.append(accuracy_of(model, self.test_inputs, self.test_labels))
                timing.round_walls.append(time.perf_counter() - round_started)
                timing.round_cpu.append(cpu_seconds() - round_cpu)
        timing.wall, timing.cpu = time.perf_counter() - started, cpu_seconds() - cpu
        return timing


def settings_crop(spec: dict[str, Any]) -> bool:
    """``dataset.roiCrop``, default true."""
    return bool(spec["dataset"].get("roiCrop", True))


def average(current: dict[str, torch.Tensor], results: list[tuple[dict[str, torch.Tensor], int]]
            ) -> dict[str, torch.Tensor]:
    """Example-weighted FedAvg in memory, with the worker's arithmetic.

    ``current + sum(n * (update - current)) / N``, summed in float32 in the clients' order (in
    float64 for integer buffers, then rounded), so that the two federations stay equal to the bit
    when their training loops are: any difference in accuracy then comes from the loops.
    """
    total = float(sum(n for _, n in results))
    merged = {}
    for name, tensor in current.items():
        floating = tensor.is_floating_point()
        sums = torch.zeros(tensor.shape, dtype=tensor.dtype if floating else torch.float64)
        for state, count in results:
            sums += (state[name].to(sums.dtype) - tensor.to(sums.dtype)) * count
        mean = sums / total + tensor.to(sums.dtype)
        merged[name] = mean if floating else mean.round().to(tensor.dtype)
    return merged


# --- report ---------------------------------------------------------------------------------------


def report_run(label: str, timing: Timing) -> None:
    """One line: wall and CPU in all and per round (median), final accuracy."""
    print(f"  {label:40s} {timing.wall:7.1f} s wall {timing.cpu:7.1f} s CPU | rounds {timing.rounds:7.1f} s, "
          f"median round {statistics.median(timing.round_walls):6.2f} s wall "
          f"{statistics.median(timing.round_cpu):6.2f} s CPU | final accuracy {timing.accuracies[-1]:.4f}")


def repetition(manifest: dict[str, Any], workdir: Path, variants: list[str]) -> tuple[Timing, RunResult,
                                                                                    dict[str, Timing]]:
    """`fedtrain run`, then the in-process baselines over the partition it recorded, one after the other."""
    fed, result = run_fedtrain(manifest, workdir)
    baseline = InProcessFederation(manifest, workdir)
    return fed, result, {variant: baseline.run(variant) for variant in variants}


def print_breakdown(workdir: Path, result: RunResult) -> None:
    """Where a round of `fedtrain run` goes, and its init and finalize tasks."""
    for kind in ("init", "finalize"):
        task = last_attempt(result.durations, f"{kind}-a")
        print(f"fedtrain {kind} task: {result.durations.get(task or '', 0.0):6.1f} s wall, "
              f"{result.cpu_seconds.get(task or '', 0.0):6.1f} s CPU")
    print("fedtrain per round (median; client parts summed over the round's clients):")
    for name, seconds in breakdown(workdir, result).items():
        print(f"  {name:24s} {seconds:7.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=1, help="interleaved repetitions (fedtrain, then baselines)")
    parser.add_argument("--baseline", default="sequential,pairs",
                        help=f"in-process variants to run, comma-separated, of {', '.join(VARIANTS)} (the fastest "
                        "counts)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    manifest = federation(args.preset, args.rounds, args.epochs)
    scratch = Path(tempfile.mkdtemp(prefix="fedtrain-baseline-"))
    make_data(manifest, scratch / "data")
    spec = manifest["spec"]
    print(f"preset {args.preset}: {spec['clients']['count']} clients, {spec['rounds']} rounds, "
          f"{spec['training']['localEpochs']} epochs, {spec['model']['architecture']} {spec['model']['imageSize']} px, "
          f"parallelism {spec['worker']['parallelism']}, {CORES} cores; load average {os.getloadavg()[0]:.1f}")
    variants = [v for v in args.baseline.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        parser.error(f"--baseline {args.baseline!r}: use a comma-separated list of {', '.join(VARIANTS)}")
    names = {"sequential": f"in-process, one after another ({CORES} threads)",
             "pairs": "in-process, two at a time (1 thread each)", "exact": "in-process, one after another (1 thread)"}
    ratios: dict[str, list[float]] = {"rounds": [], "whole": [], "round": [], "cpu": []}
    for attempt in range(args.repeat):
        workdir = scratch / f"run-{attempt}"
        fed, result, limits = repetition(manifest, workdir, variants)
        print(f"repetition {attempt + 1} (load average {os.getloadavg()[0]:.1f} on {CORES} cores):")
        report_run("fedtrain run (whole, MLflow included)", fed)
        for variant, timing in limits.items():
            report_run(names[variant] + f" (decode {timing.decode:.1f} s)", timing)
        limit = min(limits.values(), key=lambda t: t.wall)
        ratios["rounds"].append(fed.rounds / limit.wall)
        ratios["whole"].append(fed.wall / limit.wall)
        ratios["round"].append(statistics.median(fed.round_walls) / statistics.median(limit.round_walls))
        ratios["cpu"].append(fed.cpu / limit.cpu)
        if attempt == 0:
            print_breakdown(workdir, result)
            print(f"accuracy per round, fedtrain   {' '.join(f'{a:.4f}' for a in fed.accuracies)}")
            for variant, timing in limits.items():
                print(f"accuracy per round, {variant:10s} {' '.join(f'{a:.4f}' for a in timing.accuracies)}")
            print(f"accuracy difference (final): {100 * (fed.accuracies[-1] - limit.accuracies[-1]):+.2f} points "
                  "(goal: within 1)")
        if not args.keep:
            shutil.rmtree(workdir)
    median = {k: statistics.median(v) for k, v in ratios.items()}
    print(f"ratios (median of {args.repeat}; each against the faster in-process variant of its repetition):")
    print(f"  fedtrain rounds / in-process whole (decoding included): {median['rounds']:.2f} (goal <= 1.10)")
    print(f"  fedtrain whole (init, finalize, MLflow) / in-process whole: {median['whole']:.2f}")
    print(f"  median round, fedtrain / in-process: {median['round']:.2f}")
    print(f"  CPU seconds, fedtrain whole / in-process whole: {median['cpu']:.2f}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {CORES} cores (above {CORES}: machine busy)")
    if args.keep:
        print(f"kept {scratch}")
    else:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
