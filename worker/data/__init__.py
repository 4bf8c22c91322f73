"""GTSRB data: reading the official and torchvision layouts, a synthetic generator, partitioners."""
