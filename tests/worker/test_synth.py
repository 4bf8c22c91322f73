"""The synthetic generator: official layout, deterministic by seed, sizes in range, classes distinct."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedtrain.worker.data.gtsrb import load_tree
from fedtrain.worker.data.synth import SynthConfig, draw_sign, generate
from fedtrain.worker.errors import BadInputError


def digest_tree(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    config = SynthConfig(per_class=2, test_per_class=1, frames_per_track=2, seed=9, max_size=40)
    generate(tmp_path / "a", config, workers=1)
    generate(tmp_path / "b", config, workers=2)  # the worker count does not change the bytes
    generate(tmp_path / "c", SynthConfig(per_class=2, test_per_class=1, frames_per_track=2, seed=10, max_size=40))
    assert digest_tree(tmp_path / "a") == digest_tree(tmp_path / "b") != digest_tree(tmp_path / "c")


def test_tracks_sizes_and_rois(synth_tree: Path) -> None:
    tree = load_tree(synth_tree)
    tracks = {s.track for s in tree.train}
    assert len(tracks) == 43 * 2  # 8 images per class in tracks of 4 frames
    for sample in tree.train[:40]:
        width, height = Image.open(tree.path_of(sample)).size
        assert 15 <= width <= 64 and width == height
        assert sample.roi is not None
        x1, y1, x2, y2 = sample.roi
        assert 0 <= x1 < x2 < width and 0 <= y1 < y2 < height
    frames = [s for s in tree.train if s.track == "00000/00000"]
    sizes = [Image.open(tree.path_of(s)).size[0] for s in frames]
    assert sizes == sorted(sizes)  # the sign grows as the vehicle approaches


def test_every_class_is_drawn_differently_and_speed_limits_look_alike() -> None:
    signs = [np.asarray(draw_sign(c), dtype=np.float64) for c in range(43)]
    difference = {(a, b): np.abs(signs[a] - signs[b]).mean() for a in range(43) for b in range(a + 1, 43)}
    assert min(difference.values()) > 0.1  # every class is distinct at drawing resolution
    speed_limits = [d for (a, b), d in difference.items() if a in (0, 1, 2, 3, 4, 5) and b in (1, 2, 3, 4, 5)]
    assert max(speed_limits) < np.median(list(difference.values()))  # the look-alikes are closer than most


@pytest.mark.parametrize(("config", "message"), [
    (SynthConfig(per_class=0), "--per-class"),
    (SynthConfig(frames_per_track=0), "--frames-per-track"),
    (SynthConfig(min_size=10), "--min-size"),
])
def test_bad_settings_name_the_option(config: SynthConfig, message: str, tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match=message):
        generate(tmp_path, config)
