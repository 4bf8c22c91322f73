"""Training (and evaluation) images/s of the worker's loop against a plain PyTorch loop, and what CPU settings give.

Usage: python bench/train_throughput.py [--architecture mobilenet_v3_small] [--image-size 64] [--images 512]
           [--variants worker,channels_last,...] [--layouts 2x1] [--repeats 3] [--evaluate]
Goal (issue 2): worker / plain >= 0.95.

Every figure is a ratio against ``plain``, the textbook loop (same model, same batches, same
permutation and normalisation, Adam, cross-entropy), measured in the same run: each repetition
runs ``plain`` and every variant once, one after another (A, B, C, A, B, C...), so that load from
other work slows all alike; the figures are medians over the repetitions (the first one warms up
and is not counted), with their spread. Two rates: images per wall second, and images per CPU
second of the tasks' processes, which other work on the machine disturbs much less.

Training variants (each the plain loop with one change, unless named otherwise):

- ``worker``: the worker's own `train_local` (augmentation off), as a client task runs it;
- ``channels_last``: model and batches in NHWC (``torch.channels_last``), oneDNN's native layout;
- ``adam_foreach`` / ``adam_fused``: Adam's multi-tensor and fused CPU kernels instead of its per-tensor loop;
- ``compile``: the model through ``torch.compile`` (inductor, C++ on the CPU); the first step's
  compilation is timed apart, and the steps it takes to pay for itself are printed;
- ``flush_denormal``: denormal floats flushed to zero;
- ``no_onednn``: ``torch.backends.mkldnn.enabled = False`` (ATen's own convolutions);
- ``onednn_bf16``: oneDNN may compute float32 convolutions and matmuls in bfloat16
  (``torch.backends.mkldnn.fp32_precision = "bf16"``): changes the numbers;
- ``autocast_bf16``: ``torch.autocast("cpu", torch.bfloat16)``: changes the numbers.

With ``--evaluate``, evaluation variants too, against ``eval_plain`` (a textbook ``no_grad`` loop in
batches of 256): ``evaluate`` (the worker's), ``eval_channels_last``, ``eval_inference_mode``,
``eval_compile``.

``--layouts TASKSxTHREADS,...``: how many tasks train at once, each in its own process with how
many torch threads (the local runner runs ``worker.parallelism`` tasks at once with
cores / parallelism threads each). Each layout's figure is the images/s of all its tasks together:
their images over the wall time from their common start to the last one's end. The tasks' processes
are started once, warmed up, and given each measurement at the same moment.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch
from torch import nn

from fedtrain.worker.models import ModelConfig, build_model
from fedtrain.worker.training import TrainConfig, evaluate, to_tensor_batch, train_local

TRAIN_VARIANTS = ("worker", "channels_last", "adam_foreach", "adam_fused", "compile", "flush_denormal", "no_onednn",
                  "onednn_bf16", "autocast_bf16")
EVAL_VARIANTS = ("evaluate", "eval_channels_last", "eval_inference_mode", "eval_compile")
DEFAULT_VARIANTS = "worker,channels_last,adam_fused"


@dataclass
class Sample:
    """One measurement of one task: images/s, its start and end (monotonic), the mean training loss."""

    rate: float
    started: float
    ended: float
    loss: float = float("nan")
    compile_seconds: float = 0.0
    cpu: float = 0.0  # the process's CPU seconds (all its threads) during the measurement


class Bench:
    """A task process's data, model factory and compiled models (compiled once per process)."""

    def __init__(self, config: ModelConfig, images: np.ndarray, labels: np.ndarray, batch_size: int) -> None:
        self.config, self.images, self.labels, self.batch_size = config, images, labels, batch_size
        self.compiled: dict[str, tuple[nn.Module, Any]] = {}

    def model(self, seed: int, channels_last: bool = False) -> nn.Module:
        torch.manual_seed(seed)
        model = build_model(self.config)
        return model.to(memory_format=torch.channels_last) if channels_last else model

    def plain(self, variant: str, seed: int) -> Sample:
        """The textbook loop with the variant's one change."""
        channels_last = variant == "channels_last"
        model = self.model(seed, channels_last)
        forward: Callable[[torch.Tensor], torch.Tensor] = model
        compile_seconds = 0.0
        if variant == "compile":
            model, forward, compile_seconds = self._compiled(model, "train")
        model.train()
        options: dict[str, Any] = {"foreach": True} if variant == "adam_foreach" else \
            {"fused": True} if variant == "adam_fused" else {}
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, **options)
        loss_fn = nn.CrossEntropyLoss()
        order = np.random.default_rng(seed).permutation(len(self.labels))
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if variant == "autocast_bf16" else nullcontext()
        total = 0.0
        started = time.perf_counter()
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            batch = to_tensor_batch(self.images[index], torch.device("cpu"))
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            target = torch.from_numpy(self.labels[index])
            with autocast:
                loss = loss_fn(forward(batch), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
        ended = time.perf_counter()
        return Sample(len(self.labels) / (ended - started), started, ended, total / len(self.labels), compile_seconds)

    def _compiled(self, fresh: nn.Module, mode: str
                  ) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor], float]:
        """One compiled model per process and mode, given ``fresh``'s weights (a new module would recompile).

        The first call compiles (timed here, apart from the measurement); later runs reuse the graph.
        """
        seconds = 0.0
        if mode not in self.compiled:
            held = self.model(0)
            held.train(mode == "train")
            compiled = torch.compile(held)
            batch = to_tensor_batch(self.images[:self.batch_size], torch.device("cpu"))
            started = time.perf_counter()
            if mode == "train":
                compiled(batch).sum().backward()
            else:
                with torch.no_grad():
                    compiled(batch)
            seconds = time.perf_counter() - started
            self.compiled[mode] = (held, compiled)
        held, compiled = self.compiled[mode]
        held.load_state_dict(fresh.state_dict())
        held.zero_grad(set_to_none=True)
        return held, compiled, seconds

    def worker(self, variant: str, seed: int) -> Sample:
        """`train_local`, as a client task calls it (augmentation off, as in the plain loop)."""
        model = self.model(seed)
        config = TrainConfig(batch_size=self.batch_size, optimizer="adam", augment=False, seed=seed)
        started = time.perf_counter()
        result = train_local(model, self.images, self.labels, config)
        ended = time.perf_counter()
        return Sample(result.images_per_second, started, ended, result.loss)

    def evaluation(self, variant: str, seed: int) -> Sample:
        """One pass over the images in batches of 256, without gradients."""
        model = self.model(seed).eval()
        if variant == "evaluate":
            started = time.perf_counter()
            evaluate(model, self.images, self.labels, self.config.num_classes)
            ended = time.perf_counter()
            return Sample(len(self.labels) / (ended - started), started, ended)
        channels_last = variant == "eval_channels_last"
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        forward: Callable[[torch.Tensor], torch.Tensor] = model
        compile_seconds = 0.0
        if variant == "eval_compile":
            model, forward, compile_seconds = self._compiled(model, "eval")
        grad = torch.inference_mode() if variant == "eval_inference_mode" else torch.no_grad()
        started = time.perf_counter()
        with grad:
            for start in range(0, len(self.labels), 256):
                batch = to_tensor_batch(self.images[start:start + 256], torch.device("cpu"))
                if channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                torch.softmax(forward(batch), dim=1).numpy()
        ended = time.perf_counter()
        return Sample(len(self.labels) / (ended - started), started, ended, compile_seconds=compile_seconds)

    def run(self, variant: str, seed: int) -> Sample:
        """One measurement, with the variant's global settings on and then back off."""
        torch.set_flush_denormal(variant == "flush_denormal")
        torch.backends.mkldnn.enabled = variant != "no_onednn"
        precision = "bf16" if variant == "onednn_bf16" else "none"
        torch.backends.mkldnn.fp32_precision = precision
        torch.backends.mkldnn.conv.fp32_precision = precision
        torch.backends.mkldnn.matmul.fp32_precision = precision
        try:
            if variant == "worker":
                return self.worker(variant, seed)
            if variant in EVAL_VARIANTS or variant == "eval_plain":
                return self.evaluation(variant, seed)
            return self.plain(variant, seed)
        finally:
            torch.set_flush_denormal(False)
            torch.backends.mkldnn.enabled = True
            torch.backends.mkldnn.fp32_precision = "none"
            torch.backends.mkldnn.conv.fp32_precision = "none"
            torch.backends.mkldnn.matmul.fp32_precision = "none"


def task_process(connection: Connection, settings: dict[str, Any]) -> None:
    """A task's process: data and model set up once; runs (variant, seed, threads) requests until told to stop."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    size = settings["image_size"]
    images = rng.integers(0, 256, size=(settings["images"], size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 43, size=settings["images"]).astype(np.int64)
    bench = Bench(ModelConfig(settings["architecture"], 43, size), images, labels, settings["batch_size"])
    connection.send("ready")
    while (request := connection.recv()) is not None:
        variant, seed, threads = request
        torch.set_num_threads(threads)
        cpu = time.process_time()
        sample = bench.run(variant, seed)
        sample.cpu = time.process_time() - cpu
        connection.send(sample)


class Tasks:
    """Up to N task processes, each given the same measurement at the same moment."""

    def __init__(self, count: int, settings: dict[str, Any]) -> None:
        context = multiprocessing.get_context("spawn")
        self.connections, self.processes = [], []
        for _ in range(count):
            ours, theirs = context.Pipe()
            process = context.Process(target=task_process, args=(theirs, settings), daemon=True)
            process.start()
            self.connections.append(ours)
            self.processes.append(process)
        for connection in self.connections:
            assert connection.recv() == "ready"

    def measure(self, variant: str, seed: int, tasks: int, threads: int) -> tuple[float, float, list[Sample]]:
        """All tasks' images per wall second and per CPU second together, and each task's sample."""
        for connection in self.connections[:tasks]:
            connection.send((variant, seed, threads))
        samples = [connection.recv() for connection in self.connections[:tasks]]
        wall = max(s.ended for s in samples) - min(s.started for s in samples)
        images = sum(s.rate * (s.ended - s.started) for s in samples)
        return images / wall, images / sum(s.cpu for s in samples), samples

    def close(self) -> None:
        for connection in self.connections:
            connection.send(None)
        for process in self.processes:
            process.join(timeout=30)


def spread(values: list[float]) -> str:
    return f"{min(values):.1f}–{max(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--architecture", default="mobilenet_v3_small")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated, from: {', '.join(TRAIN_VARIANTS)}")
    parser.add_argument("--evaluate", action="store_true", help=f"also {', '.join(EVAL_VARIANTS)}")
    cores = os.cpu_count() or 1
    parser.add_argument("--layouts", default=f"{min(2, cores)}x{max(1, cores // 2)}",
                        help="TASKSxTHREADS,...: tasks at once, torch threads each (default: the local runner's "
                             "default, worker.parallelism 2 with cores / 2 threads each)")
    args = parser.parse_args()
    variants = ["plain", *(v for v in args.variants.split(",") if v)]
    unknown = [v for v in variants[1:] if v not in TRAIN_VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; use {', '.join(TRAIN_VARIANTS)}")
    if args.evaluate:
        variants += ["eval_plain", *EVAL_VARIANTS]
    layouts = [tuple(int(n) for n in layout.split("x")) for layout in args.layouts.split(",")]
    settings = {"architecture": args.architecture, "image_size": args.image_size, "images": args.images,
                "batch_size": args.batch_size}
    tasks = Tasks(max(t for t, _ in layouts), settings)
    rates: dict[tuple[tuple[int, int], str], list[float]] = {}
    cpu_rates: dict[tuple[tuple[int, int], str], list[float]] = {}
    losses: dict[str, list[float]] = {}
    compile_seconds: dict[str, float] = {}
    load_before = os.getloadavg()
    try:
        for repeat in range(args.repeats + 1):  # the first round warms up (oneDNN primitives, compilation)
            for layout in layouts:
                for variant in variants:
                    rate, cpu_rate, samples = tasks.measure(variant, repeat, *layout)
                    for sample in samples:
                        if sample.compile_seconds:
                            compile_seconds[f"{variant} {layout[0]}x{layout[1]}"] = sample.compile_seconds
                    if repeat:
                        rates.setdefault((layout, variant), []).append(rate)
                        cpu_rates.setdefault((layout, variant), []).append(cpu_rate)
                        losses.setdefault(variant, []).append(samples[0].loss)
    finally:
        tasks.close()
    print(f"{args.architecture} {args.image_size}px batch {args.batch_size}, {args.images} images per task, "
          f"median of {args.repeats} interleaved repetitions; load average {load_before[0]:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    print("| layout (tasks x threads) | variant | images/s, all tasks | ratio to plain | images per CPU second | "
          "ratio to plain | mean training loss |")
    print("|---|---|---|---|---|---|---|")
    for layout in layouts:
        for variant in variants:
            base = "eval_plain" if variant.startswith("eval") or variant == "evaluate" else "plain"
            cells = []
            for figures in (rates, cpu_rates):
                values, baseline = figures[(layout, variant)], figures[(layout, base)]
                ratios = [v / b for v, b in zip(values, baseline, strict=True)]
                cells += [f"{statistics.median(values):.1f} ({spread(values)})",
                          f"**{statistics.median(ratios):.3f}** ({min(ratios):.2f}–{max(ratios):.2f})"]
            loss = statistics.median(losses[variant])
            print(f"| {layout[0]}x{layout[1]} | {variant} | {' | '.join(cells)} | "
                  f"{'' if np.isnan(loss) else f'{loss:.5f}'} |")
    for what, seconds in compile_seconds.items():
        layout = next(lay for lay in layouts if what.endswith(f"{lay[0]}x{lay[1]}"))
        variant = what.split()[0]
        base = "eval_plain" if variant.startswith("eval") else "plain"
        # CPU seconds per image saved by the compiled model, from the medians per CPU second
        gained = 1 / statistics.median(cpu_rates[(layout, base)]) - 1 / statistics.median(cpu_rates[(layout, variant)])
        batches = seconds / (gained * args.batch_size) if gained > 0 else float("inf")
        print(f"{what}: compilation {seconds:.1f} s (first call); pays for itself after "
              f"{'never (slower)' if batches == float('inf') else f'{batches:.0f} batches of {args.batch_size}'}")


if __name__ == "__main__":
    main()
