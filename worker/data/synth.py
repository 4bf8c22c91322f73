"""A synthetic GTSRB-like data set, written in the official GTSRB layout.

No data set can be downloaded where FedTrain is developed or on an air-gapped cluster, so this
generator draws the 43 real sign classes from their parts (red-rimmed circles with speed numbers,
warning triangles with symbols, blue mandatory discs with arrows, the stop octagon, the priority
diamond, end-of-restriction slashes) and films each physical sign as a *track* of frames that grow
as a vehicle approaches, like the real benchmark. Pose, perspective, lighting, blur, noise and
background clutter are drawn per track and jittered per frame, and sizes range from 15 to 250 px,
so that look-alike classes (the speed limits above all) are confusable at small sizes.

Everything is deterministic by seed: each (split, class, track) has its own random stream.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from fedtrain.contract.errors import BadInputError
from fedtrain.worker.data.glyphs import draw_text
from fedtrain.worker.data.gtsrb import CSV_DELIMITER, NUM_CLASSES, sign_names

CANVAS = 128  # signs are drawn at this size, then warped and scaled to the frame size
MIN_SIZE, MAX_SIZE = 15, 250
RED, WHITE, BLACK = (200, 20, 30), (245, 245, 240), (20, 20, 20)
BLUE, YELLOW, GREY = (20, 70, 170), (250, 200, 20), (120, 120, 120)
GT_HEADER = ["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"]

Draw = ImageDraw.ImageDraw
Symbol = Callable[[Draw], None]
C = CANVAS / 2  # centre of the canvas
DISC = CANVAS - 8  # diameter of round plates
RING = DISC / 10  # width of the red ring of prohibitory signs, as on the real ones


@dataclass(frozen=True)
class SynthConfig:
    """What to generate: images per class in each split, frames per track, the seed and size range."""

    per_class: int = 60
    test_per_class: int = 20
    frames_per_track: int = 5  # real GTSRB has 30; short tracks give small sets more distinct scenes
    seed: int = 0
    min_size: int = MIN_SIZE
    max_size: int = MAX_SIZE

    def check(self) -> None:
        """Reject settings that cannot make a usable tree, naming the option."""
        if self.per_class < 1 or self.test_per_class < 0:
            raise BadInputError("--per-class must be >= 1 and --test-per-class >= 0")
        if self.frames_per_track < 1:
            raise BadInputError("--frames-per-track must be >= 1")
        if not MIN_SIZE <= self.min_size <= self.max_size <= MAX_SIZE:
            raise BadInputError(f"--min-size/--max-size must satisfy {MIN_SIZE} <= min <= max <= {MAX_SIZE}")


# --- sign parts -----------------------------------------------------------------------------------


def _text(text: str, height: float, fill: tuple[int, int, int] = BLACK, dy: float = 0.0,
          condense: float = 1.0) -> Symbol:
    def draw(d: Draw) -> None:
        draw_text(d, text, (C, C + dy), height, fill, condense)

    return draw


def _limit(number: str, fill: tuple[int, int, int] = BLACK) -> Symbol:
    """A speed number as on the real sign, two digits 0.42 of the disc's diameter tall.

    Three digits are a little smaller and narrower, as on the real 100 and 120, to fit the ring.
    """
    if len(number) == 2:
        return _text(number, 0.42 * DISC, fill)
    return _text(number, 0.38 * DISC, fill, condense=0.75)


def _poly(points: list[tuple[float, float]], fill: tuple[int, int, int] = BLACK) -> Symbol:
    def draw(d: Draw) -> None:
        d.polygon([(C + x * C, C + y * C) for x, y in points], fill=fill)

    return draw


def _lines(paths: list[list[tuple[float, float]]], width: float, fill: tuple[int, int, int] = BLACK) -> Symbol:
    def draw(d: Draw) -> None:
        for path in paths:
            d.line([(C + x * C, C + y * C) for x, y in path], fill=fill, width=int(width), joint="curve")

    return draw


def _discs(centres: list[tuple[float, float, float]], fill: tuple[int, int, int] = BLACK) -> Symbol:
    def draw(d: Draw) -> None:
        for x, y, r in centres:
            d.ellipse([C + (x - r) * C, C + (y - r) * C, C + (x + r) * C, C + (y + r) * C], fill=fill)

    return draw


def _both(*parts: Symbol) -> Symbol:
    def draw(d: Draw) -> None:
        for part in parts:
            part(d)

    return draw


def _car(dx: float, fill: tuple[int, int, int] = BLACK, scale: float = 1.0) -> Symbol:
    s = 0.22 * scale
    body = [(-1.0, 0.3), (-1.0, -0.2), (-0.6, -0.3), (-0.4, -0.8), (0.4, -0.8), (0.6, -0.3), (1.0, -0.2), (1.0, 0.3)]
    return _both(
        _poly([(dx + x * s, y * s) for x, y in body], fill),
        _discs([(dx - 0.6 * s, 0.35 * s, 0.25 * s), (dx + 0.6 * s, 0.35 * s, 0.25 * s)], fill),
    )


def _truck(dx: float, fill: tuple[int, int, int] = BLACK) -> Symbol:
    s = 0.22
    cargo = [(-1.3, 0.3), (-1.3, -0.8), (0.4, -0.8), (0.4, 0.3)]
    cab = [(0.5, 0.3), (0.5, -0.5), (1.0, -0.5), (1.2, -0.1), (1.2, 0.3)]
    wheels = [(-0.9, 0.4, 0.22), (0.0, 0.4, 0.22), (0.8, 0.4, 0.22)]
    return _both(
        _poly([(dx + x * s, y * s) for x, y in cargo], fill),
        _poly([(dx + x * s, y * s) for x, y in cab], fill),
        _discs([(dx + x * s, y * s, r * s) for x, y, r in wheels], fill),
    )


def _person(dx: float, scale: float = 1.0) -> Symbol:
    s = 0.3 * scale
    return _both(
        _discs([(dx, -0.85 * s, 0.18 * s)]),
        _lines([[(dx, -0.6 * s), (dx, 0.2 * s)], [(dx, 0.2 * s), (dx - 0.35 * s, 0.9 * s)],
                [(dx, 0.2 * s), (dx + 0.35 * s, 0.9 * s)], [(dx - 0.4 * s, -0.2 * s), (dx + 0.4 * s, -0.35 * s)]],
               width=7 * scale),
    )


def _arrow(angle_deg: float, length: float = 0.55, width: float = 12, dy: float = 0.0,
           fill: tuple[int, int, int] = WHITE) -> Symbol:
    def draw(d: Draw) -> None:
        a = math.radians(angle_deg)
        ux, uy = math.sin(a), -math.cos(a)
        x0, y0 = C - ux * length * C * 0.6, C + dy * C - uy * length * C * 0.6
        x1, y1 = C + ux * length * C * 0.6, C + dy * C + uy * length * C * 0.6
        d.line([(x0, y0), (x1, y1)], fill=fill, width=int(width))
        head = 0.22 * C
        px, py = -uy, ux
        d.polygon([(x1 + ux * head * 0.8, y1 + uy * head * 0.8), (x1 + px * head * 0.7, y1 + py * head * 0.7),
                   (x1 - px * head * 0.7, y1 - py * head * 0.7)], fill=fill)

    return draw


def _bent_arrow(turn: float, fill: tuple[int, int, int] = WHITE) -> Symbol:
    """An arrow going up then turning left (turn=-1) or right (turn=+1)."""
    return _both(
        _lines([[(0.0 - 0.25 * turn, 0.55), (0.0 - 0.25 * turn, -0.05), (0.2 * turn, -0.05)]], width=13, fill=fill),
        _poly([(0.5 * turn, -0.05), (0.18 * turn, -0.3), (0.18 * turn, 0.2)], fill=fill),
    )


def _curve(direction: float) -> Symbol:
    return _lines([[(-0.05 * direction, 0.45), (-0.05 * direction, 0.0), (0.25 * direction, -0.35)]], width=10)


def _slashes(count: int, fill: tuple[int, int, int] = GREY) -> Symbol:
    def draw(d: Draw) -> None:
        for i in range(count):
            off = (i - (count - 1) / 2) * 0.1 * CANVAS
            d.line([(C - 0.55 * C + off, C + 0.55 * C + off), (C + 0.55 * C + off, C - 0.55 * C + off)],
                   fill=fill, width=round(0.05 * CANVAS))

    return draw


# --- sign plates ----------------------------------------------------------------------------------


def _red_circle(d: Draw) -> None:
    d.ellipse([4, 4, CANVAS - 4, CANVAS - 4], fill=RED)
    d.ellipse([4 + RING, 4 + RING, CANVAS - 4 - RING, CANVAS - 4 - RING], fill=WHITE)


def _red_disc(d: Draw) -> None:
    d.ellipse([4, 4, CANVAS - 4, CANVAS - 4], fill=RED)


def _blue_disc(d: Draw) -> None:
    d.ellipse([4, 4, CANVAS - 4, CANVAS - 4], fill=BLUE)


def _end_circle(d: Draw) -> None:
    d.ellipse([4, 4, CANVAS - 4, CANVAS - 4], fill=BLACK)
    d.ellipse([8, 8, CANVAS - 8, CANVAS - 8], fill=WHITE)


def _triangle(d: Draw) -> None:
    d.polygon([(C, 6), (CANVAS - 4, CANVAS - 14), (4, CANVAS - 14)], fill=RED)
    d.polygon([(C, 30), (CANVAS - 24, CANVAS - 25), (24, CANVAS - 25)], fill=WHITE)


def _yield(d: Draw) -> None:
    d.polygon([(4, 14), (CANVAS - 4, 14), (C, CANVAS - 6)], fill=RED)
    d.polygon([(24, 25), (CANVAS - 24, 25), (C, CANVAS - 30)], fill=WHITE)


def _octagon(d: Draw) -> None:
    for radius, colour in ((0.97 * C, WHITE), (0.9 * C, RED)):  # a white rim, as on the real sign
        points = [(C + radius * math.cos(math.radians(22.5 + 45 * k)),
                   C + radius * math.sin(math.radians(22.5 + 45 * k))) for k in range(8)]
        d.polygon(points, fill=colour)


def _diamond(d: Draw) -> None:
    d.polygon([(C, 2), (CANVAS - 2, C), (C, CANVAS - 2), (2, C)], fill=WHITE)
    d.polygon([(C, 22), (CANVAS - 22, C), (C, CANVAS - 22), (22, C)], fill=YELLOW)


Plate = Callable[[Draw], None]
T_DY = 0.12  # symbols on triangles sit a little low, towards the triangle's centroid


def _tri(symbol: Symbol) -> tuple[Plate, Symbol]:
    return _triangle, symbol


SIGNS: list[tuple[Plate, Symbol]] = [
    (_red_circle, _limit("20")),
    (_red_circle, _limit("30")),
    (_red_circle, _limit("50")),
    (_red_circle, _limit("60")),
    (_red_circle, _limit("70")),
    (_red_circle, _limit("80")),
    (_end_circle, _both(_limit("80", GREY), _slashes(1, BLACK))),
    (_red_circle, _limit("100")),
    (_red_circle, _limit("120")),
    (_red_circle, _both(_car(-0.28, RED), _car(0.28, BLACK))),
    (_red_circle, _both(_truck(-0.3, RED), _car(0.33, BLACK, 0.9))),
    _tri(_lines([[(0, 0.55), (0, -0.15)], [(-0.3, 0.2), (0.3, 0.2)]], width=11)),
    (_diamond, _both()),
    (_yield, _both()),
    (_octagon, _text("STOP", 0.26 * CANVAS, WHITE)),
    (_red_circle, _both()),
    (_red_circle, _truck(0.0)),
    (_red_disc, _poly([(-0.65, -0.14), (0.65, -0.14), (0.65, 0.14), (-0.65, 0.14)], WHITE)),
    _tri(_text("!", 0.36 * CANVAS, dy=0.16 * C)),
    _tri(_lines([[(0.15, 0.5), (0.15, 0.1), (-0.25, -0.2)]], width=10)),
    _tri(_lines([[(-0.15, 0.5), (-0.15, 0.1), (0.25, -0.2)]], width=10)),
    _tri(_lines([[(0.1, 0.55), (0.1, 0.35), (-0.15, 0.2), (0.15, 0.0), (-0.1, -0.15)]], width=8)),
    _tri(_lines([[(-0.45, 0.45), (-0.3, 0.3), (-0.15, 0.45), (0.0, 0.3), (0.15, 0.45), (0.3, 0.3), (0.45, 0.45)]],
                width=9)),
    _tri(_both(_car(0.0, BLACK, 0.8), _lines([[(-0.3, 0.5), (-0.15, 0.35)], [(0.15, 0.5), (0.3, 0.35)]], width=6))),
    _tri(_lines([[(-0.2, 0.55), (-0.2, -0.15)], [(0.25, 0.55), (0.25, 0.2), (0.1, 0.0), (0.1, -0.15)]], width=9)),
    _tri(_both(_person(-0.08, 0.85), _poly([(0.1, 0.5), (0.45, 0.5), (0.3, 0.3)]))),
    _tri(_discs([(0, -0.13, 0.1), (0, 0.13, 0.1), (0, 0.39, 0.1)])),
    _tri(_person(0.0)),
    _tri(_both(_person(-0.15, 0.8), _person(0.18, 0.65))),
    _tri(_both(_discs([(-0.25, 0.35, 0.15), (0.25, 0.35, 0.15)]),
               _lines([[(-0.25, 0.35), (0.0, 0.0), (0.25, 0.35)], [(0.0, 0.0), (0.05, -0.15)]], width=6))),
    _tri(_lines([[(0, -0.1), (0, 0.5)], [(-0.26, 0.05), (0.26, 0.35)], [(-0.26, 0.35), (0.26, 0.05)]], width=7)),
    _tri(_poly([(-0.4, 0.45), (-0.3, 0.1), (0.2, 0.05), (0.3, -0.2), (0.4, -0.1), (0.35, 0.15), (0.3, 0.45),
                (0.15, 0.45), (0.12, 0.25), (-0.2, 0.25), (-0.25, 0.45)])),
    (_end_circle, _slashes(4, BLACK)),
    (_blue_disc, _bent_arrow(1.0)),
    (_blue_disc, _bent_arrow(-1.0)),
    (_blue_disc, _arrow(0.0)),
    (_blue_disc, _both(_arrow(0.0, dy=0.0), _lines([[(0.0, 0.2), (0.3, -0.05)]], width=11, fill=WHITE))),
    (_blue_disc, _both(_arrow(0.0, dy=0.0), _lines([[(0.0, 0.2), (-0.3, -0.05)]], width=11, fill=WHITE))),
    (_blue_disc, _arrow(135.0)),
    (_blue_disc, _arrow(-135.0)),
    (_blue_disc, _both(_arrow(60.0, 0.3, 9, -0.35), _arrow(180.0, 0.3, 9, 0.0), _arrow(-60.0, 0.3, 9, 0.35))),
    (_end_circle, _both(_car(-0.28, GREY), _car(0.28, GREY), _slashes(3, BLACK))),
    (_end_circle, _both(_truck(-0.3, GREY), _car(0.33, GREY, 0.9), _slashes(3, BLACK))),
]
assert len(SIGNS) == NUM_CLASSES


def draw_sign(class_id: int, with_symbol: bool = True) -> Image.Image:
    """The clean sign of a class on a transparent canvas; without its symbol, the bare plate."""
    plate, symbol = SIGNS[class_id]
    image = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    plate(draw)
    if with_symbol:
        symbol(draw)
    return image


# --- filming a track ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Track:
    """What stays the same for every frame of one physical sign."""

    corners: NDArray[np.float64]  # perspective: where the canvas corners land, as offsets
    rotation: float
    sizes: NDArray[np.float64]
    background: NDArray[np.uint8]
    exposure: float  # in linear light: 1 is a well-exposed frame
    contrast: float
    blur: float  # Gaussian sigma in 1/64ths of the frame size
    noise: float  # sigma of per-pixel noise, in grey levels


# The ranges a track's conditions are drawn from; the tests film every class at their limits.
EXPOSURE_RANGE = (0.3, 3.0)
CONTRAST_RANGE = (0.6, 1.3)
BLUR_RANGE = (0.0, 1.2)
NOISE_RANGE = (2.0, 14.0)
GAMMA = 2.2  # sRGB, roughly: exposure scales light, not the 8-bit values a camera stores


def random_track(rng: np.random.Generator, frames: int, config: SynthConfig) -> Track:
    """Draw one physical sign's conditions: mostly small start sizes, growing frame by frame."""
    start = math.exp(rng.uniform(math.log(config.min_size), math.log(max(config.min_size, config.max_size * 0.5))))
    growth = rng.uniform(1.2, 2.5)
    sizes = np.clip(start * np.geomspace(1.0, growth, frames), config.min_size, config.max_size)
    return Track(
        corners=rng.normal(0.0, 0.06, size=(4, 2)),
        rotation=float(rng.normal(0.0, 5.0)),
        sizes=sizes,
        background=_background(rng),
        exposure=float(np.clip(np.exp(rng.normal(0.0, 0.6)), *EXPOSURE_RANGE)),
        contrast=float(rng.uniform(*CONTRAST_RANGE)),
        blur=float(rng.uniform(*BLUR_RANGE)),
        noise=float(rng.uniform(*NOISE_RANGE)),
    )


def _background(rng: np.random.Generator, size: int = 96) -> NDArray[np.uint8]:
    """Sky, foliage or wall colours with a gradient and a few clutter shapes."""
    base = rng.choice(np.array([[110, 150, 200], [80, 110, 70], [140, 130, 120], [60, 60, 70], [170, 170, 160]]))
    base = np.clip(base + rng.normal(0, 20, size=3), 0, 255)
    ramp = np.linspace(-1.0, 1.0, size)[:, None, None] * rng.normal(0, 25, size=3)
    image = np.clip(base[None, None, :] + ramp + np.zeros((size, size, 3)), 0, 255).astype(np.uint8)
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 7))):
        x, y = rng.uniform(0, size, size=2)
        w, h = rng.uniform(4, size / 2, size=2)
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        shape = draw.rectangle if rng.random() < 0.6 else draw.ellipse
        shape([x, y, x + w, y + h], fill=colour)
    return np.asarray(canvas.filter(ImageFilter.GaussianBlur(2.0)), dtype=np.uint8)


def _perspective_coefficients(source: NDArray[np.float64], target: NDArray[np.float64]) -> list[float]:
    """Coefficients for ``Image.transform(PERSPECTIVE)``, which maps output (target) points to input (source)."""
    rows = []
    for (x, y), (u, v) in zip(target, source, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    solution = np.linalg.solve(np.array(rows, dtype=np.float64), source.reshape(8))
    return [float(c) for c in solution]


def render_frame(
    sign: Image.Image, track: Track, frame: int, rng: np.random.Generator
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """One frame of a track: warped sign on its background, scaled, blurred, lit and noised; with its ROI."""
    margin = 0.12 + rng.uniform(0.0, 0.06)
    full = round(CANVAS * (1 + 2 * margin))
    offset = (full - CANVAS) / 2
    square = np.array([[0, 0], [CANVAS, 0], [CANVAS, CANVAS], [0, CANVAS]], dtype=np.float64)
    warped_corners = square + offset + (track.corners + rng.normal(0, 0.01, size=(4, 2))) * CANVAS
    coefficients = _perspective_coefficients(square, warped_corners)
    warped = sign.rotate(track.rotation, resample=Image.Resampling.BICUBIC).transform(
        (full, full), Image.Transform.PERSPECTIVE, coefficients, Image.Resampling.BICUBIC
    )
    background = Image.fromarray(track.background).resize((full, full), Image.Resampling.BILINEAR)
    background.paste(warped, (0, 0), warped)
    size = round(track.sizes[frame])
    image = background.resize((size, size), Image.Resampling.LANCZOS)
    if track.blur > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(track.blur * size / 64))
    image = ImageEnhance.Contrast(_expose(image, track.exposure * rng.uniform(0.9, 1.1))).enhance(track.contrast)
    pixels = np.asarray(image, dtype=np.float64) + rng.normal(0, track.noise, size=(size, size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    xs, ys = warped_corners[:, 0] * size / full, warped_corners[:, 1] * size / full
    roi = (max(0, int(xs.min())), max(0, int(ys.min())), min(size - 1, int(xs.max())), min(size - 1, int(ys.max())))
    return image, roi


def _expose(image: Image.Image, exposure: float) -> Image.Image:
    """Scale the light, not the stored values; above a full exposure, roll the highlights off.

    Multiplying 8-bit values (as ``ImageEnhance.Brightness`` does) by 2.5 turns every grey above 100
    white, and with it a small dark symbol whose edges blur has greyed. A camera's tone curve
    compresses highlights instead: here ``e*x / (1 + (e-1)*x)`` in linear light, which keeps white
    white and keeps every darker print darker (the map is strictly increasing) at any exposure.
    """
    linear = (np.asarray(image, dtype=np.float64) / 255.0) ** GAMMA
    lit = exposure * linear / (1.0 + max(exposure - 1.0, 0.0) * linear)
    return Image.fromarray(np.round(lit ** (1 / GAMMA) * 255.0).astype(np.uint8))


# --- writing the tree -----------------------------------------------------------------------------


def _stream(seed: int, split: int, class_id: int, track: int) -> np.random.Generator:
    return np.random.default_rng([seed, split, class_id, track])


def generate(out: Path, config: SynthConfig, workers: int | None = None) -> dict[str, int]:
    """Write the official GTSRB layout under ``out``; return the image counts per split.

    Classes (and slices of the test set) are drawn in parallel on ``workers`` processes (default: one
    per core); every one has its own random stream, so the bytes do not depend on the worker count.
    """
    config.check()
    out = Path(out)
    train_root = out / "Final_Training" / "Images"
    test_root = out / "Final_Test" / "Images"
    train_root.mkdir(parents=True, exist_ok=True)
    test_root.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(workers or os.cpu_count() or 1, NUM_CLASSES))
    total_test = NUM_CLASSES * config.test_per_class
    slices = [(test_root, config, start, min(start + 50, total_test)) for start in range(0, total_test, 50)]
    classes = [(train_root / f"{class_id:05d}", class_id, config) for class_id in range(NUM_CLASSES)]
    if workers == 1:
        for job in classes:
            _write_training_class(*job)
        test_rows = [row for job in slices for row in _write_test_slice(*job)]
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_training_class, *zip(*classes, strict=True)))
            test_rows = [row for rows in pool.map(_write_test_slice, *zip(*slices, strict=True)) for row in rows] \
                if slices else []
    with (test_root / "GT-final_test.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=CSV_DELIMITER)
        writer.writerow(GT_HEADER)
        writer.writerows(test_rows)
    _write_sign_names(out / "signnames.csv")
    return {"train": config.per_class * NUM_CLASSES, "test": len(test_rows)}


def _write_training_class(folder: Path, class_id: int, config: SynthConfig) -> None:
    folder.mkdir(exist_ok=True)
    sign = draw_sign(class_id)
    rows = []
    tracks = math.ceil(config.per_class / config.frames_per_track)
    written = 0
    for track_number in range(tracks):
        rng = _stream(config.seed, 0, class_id, track_number)
        frames = min(config.frames_per_track, config.per_class - written)
        track = random_track(rng, frames, config)
        for frame in range(frames):
            image, roi = render_frame(sign, track, frame, rng)
            name = f"{track_number:05d}_{frame:05d}.ppm"
            image.save(folder / name)
            rows.append([name, image.width, image.height, *roi, class_id])
        written += frames
    with (folder / f"GT-{class_id:05d}.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=CSV_DELIMITER)
        writer.writerow(GT_HEADER)
        writer.writerows(rows)


def _write_test_slice(folder: Path, config: SynthConfig, start: int, stop: int) -> list[list[object]]:
    """Test images ``start..stop``: single frames of independent tracks, in a seeded shuffled order."""
    order = [(class_id, k) for class_id in range(NUM_CLASSES) for k in range(config.test_per_class)]
    permutation = np.random.default_rng([config.seed, 2]).permutation(len(order))
    signs: dict[int, Image.Image] = {}
    rows: list[list[object]] = []
    for index in range(start, stop):
        class_id, k = order[permutation[index]]
        sign = signs.setdefault(class_id, draw_sign(class_id))
        rng = _stream(config.seed, 1, class_id, k)
        track = random_track(rng, config.frames_per_track, config)
        image, roi = render_frame(sign, track, int(rng.integers(0, config.frames_per_track)), rng)
        name = f"{index:05d}.ppm"
        image.save(folder / name)
        rows.append([name, image.width, image.height, *roi, class_id])
    return rows


def _write_sign_names(path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ClassId", "SignName"])
        writer.writerows(enumerate(sign_names()))
