"""Central (non-federated) training on synthetic GTSRB: how learnable, and how confusable, the data set is.

Usage: python bench/synth_central.py [--architecture mobilenet_v3_small] [--image-size 64] [--epochs 12]
       [--per-class 60] [--test-per-class 20] [--scheduler cosine] [--data DIR] [--seed 0]
(an existing --data tree is used as it is: point it at a run's data/ to train centrally on the same images)
Prints test accuracy per epoch against a majority-class baseline, then the look-alike classes: the
confusion matrix among the speed limits (rows: true class, columns: predicted) with each one's
accuracy, and how often a speed-limit sign is taken for another speed limit.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from fedtrain.worker.data.gtsrb import load_tree
from fedtrain.worker.data.images import load_samples
from fedtrain.worker.data.synth import SynthConfig, generate
from fedtrain.worker.models import ModelConfig, build_model, count_parameters
from fedtrain.worker.training import TrainConfig, evaluate, train_local

SPEED_LIMITS = [0, 1, 2, 3, 4, 5, 7, 8]
LIMIT_NAMES = ["20", "30", "50", "60", "70", "80", "100", "120"]


def print_look_alikes(confusion: np.ndarray) -> None:
    """The speed limits' confusion among themselves, with what each lost to other classes."""
    print("speed limits, true (rows) x predicted (columns); 'other' = any other class:")
    print("      " + " ".join(f"{name:>4}" for name in LIMIT_NAMES) + " other  acc")
    for row, name in zip(SPEED_LIMITS, LIMIT_NAMES, strict=True):
        counts = confusion[row, SPEED_LIMITS]
        other = confusion[row].sum() - counts.sum()
        accuracy = confusion[row, row] / max(1, confusion[row].sum())
        print(f"{name:>5} " + " ".join(f"{c:4d}" for c in counts) + f" {other:5d} {accuracy:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--architecture", default="mobilenet_v3_small")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--scheduler", default="cosine")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--frames-per-track", type=int, default=SynthConfig.frames_per_track)
    parser.add_argument("--seed", type=int, default=0, help="the data set's seed (when --data does not exist yet)")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--data", type=Path, default=Path("/tmp/fedtrain-synth-central"))
    parser.add_argument("--save", type=Path, default=None, help="write the trained weights (.safetensors) here")
    args = parser.parse_args()
    if not (args.data / "Final_Training").exists():
        generate(args.data, SynthConfig(args.per_class, args.test_per_class, args.frames_per_track, seed=args.seed))
    tree = load_tree(args.data)
    train_x, train_y = load_samples(tree, list(tree.train), args.image_size, True)
    test_x, test_y = load_samples(tree, list(tree.test), args.image_size, True)
    torch.manual_seed(0)
    model = build_model(ModelConfig(args.architecture, 43, args.image_size))
    total, _ = count_parameters(model)
    print(f"{args.architecture} ({total / 1e6:.2f} M parameters), {args.image_size}px, {len(train_y)} train / "
          f"{len(test_y)} test images, adam lr {args.lr}, scheduler {args.scheduler}, {args.epochs} epochs, "
          f"augmentation {'off' if args.no_augment else 'on'}")
    print(f"majority-class baseline: {np.bincount(test_y).max() / len(test_y):.3f}")
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        config = TrainConfig(local_epochs=1, batch_size=32, learning_rate=args.lr, scheduler=args.scheduler,
                             augment=not args.no_augment, seed=epoch)
        result = train_local(model, train_x, train_y, config)
        scores = evaluate(model, test_x, test_y, 43)
        print(f"epoch {epoch:2d}: train loss {result.loss:.3f} acc {result.accuracy:.3f} | test acc "
              f"{scores.accuracy:.3f} loss {scores.loss:.3f} | {result.images_per_second:.0f} img/s")
    confusion = np.array(scores.confusion)
    limits = confusion[np.ix_(SPEED_LIMITS, SPEED_LIMITS)]
    wrong_limit = (limits.sum() - np.trace(limits)) / confusion[SPEED_LIMITS].sum()
    other_wrong = 1 - np.trace(confusion) / confusion.sum()
    print_look_alikes(confusion)
    if args.save is not None:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.save))
    print(f"final test accuracy {scores.accuracy:.3f}; speed-limit signs taken for another speed limit: "
          f"{wrong_limit:.3f}; overall error {other_wrong:.3f}; {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
