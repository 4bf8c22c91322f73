"""The synthetic generator: official layout, deterministic by seed, sizes in range, classes distinct.

The legibility tests film every class at the limits of the generator's ranges (smallest and largest
size, no blur and most blur, darkest and brightest exposure, least and most contrast) and compare
each frame with the same frame of the bare plate, or of a class on the same plate, filmed with the
same random numbers. Noise, background and pose are then identical, so every difference in the
pixels is the symbol's.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

from fedtrain.contract.errors import BadInputError
from fedtrain.worker.data import synth
from fedtrain.worker.data.gtsrb import NUM_CLASSES, load_tree
from fedtrain.worker.data.synth import SynthConfig, Track, draw_sign, generate, random_track, render_frame

LUMA = np.array([0.299, 0.587, 0.114])
# A symbol must change the luminance of an area as large as itself by at least this many grey
# levels on average. The strongest camera noise the generator adds is sigma 14 per channel, 9.4 in
# luminance: 24 is 2.5 of those sigmas, so the symbol stands out of the noise pixel by pixel, as
# a bold black number does on a real photograph. The washed-out numbers this guards against
# measured 0.0 (no trace left at all).
MIN_SYMBOL_CONTRAST = 24.0
# Classes on one plate need only differ by more than one sigma of that noise: look-alikes (the speed
# limits above all) are meant to be confusable when small, as in the real set, but never identical.
MIN_CLASS_DIFFERENCE = 12.0
SIGN_SHARE = 1 / 1.3  # the sign spans about this share of the frame's side (the rest is margin)


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


# --- legibility ---------------------------------------------------------------------------------


def luminance(image: Image.Image) -> NDArray[np.float64]:
    return np.asarray(image, dtype=np.float64) @ LUMA


def symbol_pixels(class_a: int, class_b: int | None = None) -> float:
    """Share of the drawing canvas where two classes (or a class and its bare plate) differ."""
    a = np.asarray(draw_sign(class_a), dtype=np.int32)
    b = np.asarray(draw_sign(class_a, with_symbol=False) if class_b is None else draw_sign(class_b), dtype=np.int32)
    return float((np.abs(a - b).sum(axis=2) > 0).mean())


def symbol_contrast(frame: Image.Image, other: Image.Image, share: float) -> float:
    """Mean luminance difference over the pixels that differ most, as many as the symbol covers."""
    difference = np.sort(np.abs(luminance(frame) - luminance(other)).ravel())
    count = max(1, round(share * (frame.width * SIGN_SHARE) ** 2))
    return float(difference[-count:].mean())


def film(sign: Image.Image, track: Track, frame: int, seed: int) -> Image.Image:
    """One frame, with random numbers that depend only on ``seed`` (so two signs get the same ones)."""
    return render_frame(sign, track, frame, np.random.default_rng(seed))[0]


def extreme_tracks() -> list[Track]:
    """A track at every corner of the size, blur, exposure and contrast ranges, at the strongest noise."""
    ranges = ((15, 250), synth.BLUR_RANGE, synth.EXPOSURE_RANGE, synth.CONTRAST_RANGE)
    return [replace(random_track(np.random.default_rng([7, number]), 1, SynthConfig()), sizes=np.array([float(size)]),
                    blur=blur, exposure=exposure, contrast=contrast, noise=synth.NOISE_RANGE[1])
            for number, (size, blur, exposure, contrast) in enumerate(itertools.product(*ranges))]


EXTREMES = extreme_tracks()


@functools.cache
def film_at_extreme(class_id: int, number: int, with_symbol: bool = True) -> Image.Image:
    """The class (or its bare plate) filmed on extreme track ``number``; both tests use these frames."""
    return film(draw_sign(class_id, with_symbol), EXTREMES[number], 0, number)


def random_tracks(class_id: int, count: int) -> Iterator[tuple[Track, int, int]]:
    """The generator's own tracks of a class, every frame: (track, frame, seed for that frame)."""
    config = SynthConfig()
    for number in range(count):
        track = random_track(np.random.default_rng([11, class_id, number]), config.frames_per_track, config)
        for frame in range(config.frames_per_track):
            yield track, frame, 1000 * number + frame


SYMBOL_CLASSES = [c for c in range(NUM_CLASSES) if symbol_pixels(c) > 0]


def weakest_symbol(class_id: int, frames: list[tuple[Track, int, int]]) -> tuple[float, str]:
    sign, plate, share = draw_sign(class_id), draw_sign(class_id, with_symbol=False), symbol_pixels(class_id)
    scores = [(symbol_contrast(film(sign, t, f, s), film(plate, t, f, s), share), describe(t, f))
              for t, f, s in frames]
    return min(scores)


def test_plates_without_a_symbol_are_the_classes_that_have_none() -> None:
    assert sorted(set(range(NUM_CLASSES)) - set(SYMBOL_CLASSES)) == [12, 13, 15]  # priority, yield, no vehicles


def describe(track: Track, frame: int = 0) -> str:
    return (f"size {track.sizes[frame]:.0f} blur {track.blur:.2f} exposure {track.exposure:.2f} "
            f"contrast {track.contrast:.2f}")


@pytest.mark.parametrize("class_id", SYMBOL_CLASSES)
def test_symbol_stands_out_of_its_plate_at_every_extreme(class_id: int) -> None:
    share = symbol_pixels(class_id)
    for number, track in enumerate(EXTREMES):
        contrast = symbol_contrast(film_at_extreme(class_id, number), film_at_extreme(class_id, number, False), share)
        assert contrast >= MIN_SYMBOL_CONTRAST, f"class {class_id}: symbol contrast {contrast:.1f} at {describe(track)}"


@pytest.mark.slow
@pytest.mark.parametrize("class_id", SYMBOL_CLASSES)
def test_symbol_stands_out_of_its_plate_on_many_random_tracks(class_id: int) -> None:
    contrast, where = weakest_symbol(class_id, list(random_tracks(class_id, 40)))
    assert contrast >= MIN_SYMBOL_CONTRAST, f"class {class_id}: symbol contrast {contrast:.1f} at {where}"


def plate_groups() -> list[list[int]]:
    """Classes drawn on the same plate, which differ only by their symbol."""
    groups: dict[object, list[int]] = {}
    for class_id, (plate, _) in enumerate(synth.SIGNS):
        groups.setdefault(plate, []).append(class_id)
    return [group for group in groups.values() if len(group) > 1]


@pytest.mark.parametrize("group", plate_groups(), ids=lambda group: f"classes-{group[0]}-{group[-1]}")
def test_classes_on_one_plate_never_render_alike(group: list[int]) -> None:
    for number, track in enumerate(EXTREMES):
        for a, b in itertools.combinations(group, 2):
            difference = symbol_contrast(film_at_extreme(a, number), film_at_extreme(b, number), symbol_pixels(a, b))
            assert difference >= MIN_CLASS_DIFFERENCE, (
                f"classes {a} and {b}: difference {difference:.1f} at {describe(track)}")
