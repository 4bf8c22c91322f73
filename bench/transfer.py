"""What `pretrainedWeights`, `fineTune` and `scheduler` do, measured: training from scratch against
starting from a local weights file, fine-tuning everything against training the head only, with and
without the cosine schedule, on a small data set the weights have not seen.

Usage:
  python bench/synth_central.py --save /tmp/pretrained.safetensors       # pre-train on synthetic seed 0
  python bench/transfer.py --pretrained /tmp/pretrained.safetensors [--epochs 5] [--per-class 20]
The target set is generated with another seed (other tracks, backgrounds, poses). No ImageNet
weights can be downloaded here; the mechanism is the same with a real ImageNet checkpoint.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fedtrain.worker.data.gtsrb import load_tree
from fedtrain.worker.data.images import load_samples
from fedtrain.worker.data.synth import SynthConfig, generate
from fedtrain.worker.models import ModelConfig, build_model, count_parameters
from fedtrain.worker.training import TrainConfig, evaluate, train_local


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrained", type=Path, required=True)
    parser.add_argument("--architecture", default="mobilenet_v3_small")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--data", type=Path, default=Path("/tmp/fedtrain-transfer-target"))
    args = parser.parse_args()
    if not (args.data / "Final_Training").exists():
        generate(args.data, SynthConfig(args.per_class, 20, seed=1))
    tree = load_tree(args.data)
    train_x, train_y = load_samples(tree, list(tree.train), args.image_size, True)
    test_x, test_y = load_samples(tree, list(tree.test), args.image_size, True)
    print(f"{args.architecture} {args.image_size}px, target set: {len(train_y)} train / {len(test_y)} test images "
          f"(synthetic seed 1), {args.epochs} epochs, adam")
    variants = [
        ("scratch, fine-tune all", None, True, "none", 2e-3),
        ("pretrained, fine-tune all", args.pretrained, True, "none", 1e-3),
        ("pretrained, head only", args.pretrained, False, "none", 1e-3),
        ("pretrained, fine-tune, cosine", args.pretrained, True, "cosine", 1e-3),
    ]
    for name, weights, fine_tune, scheduler, rate in variants:
        torch.manual_seed(0)
        model = build_model(ModelConfig(args.architecture, 43, args.image_size,
                                        str(weights) if weights else None, fine_tune))
        _, trainable = count_parameters(model)
        started = time.perf_counter()
        config = TrainConfig(local_epochs=args.epochs, batch_size=32, learning_rate=rate, scheduler=scheduler,
                             restart_epochs=args.epochs, seed=0)
        result = train_local(model, train_x, train_y, config)
        scores = evaluate(model, test_x, test_y, 43)
        print(f"{name:32s} trainable {trainable / 1e6:5.2f} M | test acc {scores.accuracy:.3f} loss "
              f"{scores.loss:.3f} | {result.images_per_second:5.0f} img/s | {time.perf_counter() - started:5.1f} s")


if __name__ == "__main__":
    main()
