"""Training images/s of the worker's loop against a plain PyTorch loop, same model and batches, same run.

Usage: python bench/train_throughput.py [--architecture mobilenet_v3_small] [--image-size 64] [--images 512]
Goal (issue 2): worker / plain >= 0.95.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from fedtrain.worker.models import ModelConfig, build_model
from fedtrain.worker.training import TrainConfig, to_tensor_batch, train_local


def plain_loop(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int) -> float:
    """The textbook loop: same permutation, same normalisation, Adam, cross-entropy."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    order = np.random.default_rng(seed).permutation(len(labels))
    started = time.perf_counter()
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        batch = to_tensor_batch(images[index], torch.device("cpu"))
        target = torch.from_numpy(labels[index])
        loss = loss_fn(model(batch), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return len(labels) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--architecture", default="mobilenet_v3_small")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.images, args.image_size, args.image_size, 3), dtype=np.uint8)
    labels = rng.integers(0, 43, size=args.images).astype(np.int64)
    config = ModelConfig(args.architecture, 43, args.image_size)
    worker_rates, plain_rates = [], []
    for repeat in range(args.repeats + 1):  # the first pair warms up and is not counted
        torch.manual_seed(repeat)
        plain = plain_loop(build_model(config), images, labels, args.batch_size, seed=repeat)
        torch.manual_seed(repeat)
        result = train_local(build_model(config), images, labels,
                             TrainConfig(batch_size=args.batch_size, optimizer="adam", augment=False, seed=repeat))
        if repeat:
            plain_rates.append(plain)
            worker_rates.append(result.images_per_second)
    worker, plain = float(np.median(worker_rates)), float(np.median(plain_rates))
    print(f"{args.architecture} {args.image_size}px batch {args.batch_size}, {args.images} images, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"worker loop: {worker:8.1f} images/s")
    print(f"plain loop:  {plain:8.1f} images/s")
    print(f"ratio worker/plain: {worker / plain:.3f} (goal >= 0.95)")


if __name__ == "__main__":
    main()
