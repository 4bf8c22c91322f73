"""Bold sign lettering built from strokes: DIN 1451-like digits and the letters sign faces need.

Real sign lettering is heavy: its stroke is about a seventh of the character height, so a number
survives distance, blur and glare as long as the ring around it does. Pillow's default font is a
thin text face (a stroke of a twentieth of the height) whose digits wash out long before the ring.
Each glyph here is a few centre lines (straight segments and elliptic arcs) in a unit box, x to the
right and y down, stroked at one width with round ends. No font file is needed, so every machine
draws the same shapes.
"""

from __future__ import annotations

import math

from PIL import ImageDraw

Point = tuple[float, float]
Stroke = list[Point]
Colour = tuple[int, int, int]

STROKE_RATIO = 1 / 7  # stroke width / character height, as in DIN 1451 road-sign lettering
TRACKING = 0.2  # gap between characters, as a fraction of the character height


def arc(cx: float, cy: float, rx: float, ry: float, start: float, end: float, steps: int = 24) -> Stroke:
    """Points along an ellipse from angle ``start`` to ``end`` (degrees; y points down, so 90 is the bottom)."""
    angles = [math.radians(start + (end - start) * k / steps) for k in range(steps + 1)]
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles]


def _rotated(strokes: list[Stroke]) -> list[Stroke]:
    """The glyph turned by half a turn (a 9 is a 6 upside down)."""
    return [[(1 - x, 1 - y) for x, y in stroke] for stroke in strokes]


_SIX = [arc(0.5, 0.67, 0.5, 0.33, 0, 360), [(0.03, 0.6), (0.62, 0.0)]]

# character -> (width of the centre-line box as a fraction of its height, strokes)
GLYPHS: dict[str, tuple[float, list[Stroke]]] = {
    "0": (0.56, [arc(0.5, 0.32, 0.5, 0.32, 180, 360) + arc(0.5, 0.68, 0.5, 0.32, 0, 180) + [(0.0, 0.32)]]),
    "1": (0.36, [[(0.0, 0.25), (0.85, 0.0), (0.85, 1.0)]]),
    "2": (0.56, [[*arc(0.5, 0.28, 0.5, 0.28, 200, 390), (0.0, 1.0), (1.0, 1.0)]]),
    "3": (0.56, [[(0.06, 0.0), (0.94, 0.0), (0.42, 0.39), *arc(0.5, 0.69, 0.5, 0.31, -100, 150)]]),
    "4": (0.56, [[(0.75, 1.0), (0.75, 0.0), (0.0, 0.7), (1.0, 0.7)]]),
    "5": (0.56, [[(0.92, 0.0), (0.1, 0.0), (0.05, 0.47), *arc(0.5, 0.67, 0.5, 0.33, -150, 150)]]),
    "6": (0.56, _SIX),
    "7": (0.56, [[(0.0, 0.0), (1.0, 0.0), (0.3, 1.0)]]),
    "8": (0.56, [arc(0.5, 0.23, 0.42, 0.23, 0, 360), arc(0.5, 0.71, 0.5, 0.29, 0, 360)]),
    "9": (0.56, _rotated(_SIX)),
    "S": (0.58, [arc(0.5, 0.25, 0.48, 0.25, -25, -270) + arc(0.5, 0.75, 0.5, 0.25, -90, 155)]),
    "T": (0.62, [[(0.0, 0.0), (1.0, 0.0)], [(0.5, 0.0), (0.5, 1.0)]]),
    "O": (0.62, [arc(0.5, 0.5, 0.5, 0.5, 0, 360)]),
    "P": (0.56, [[(0.0, 1.0), (0.0, 0.0), (0.5, 0.0), *arc(0.5, 0.27, 0.5, 0.27, -90, 90), (0.0, 0.54)]]),
    "!": (0.0, [[(0.0, 0.0), (0.0, 0.64)], [(0.0, 1.0)]]),
}


def text_width(text: str, height: float, condense: float = 1.0) -> float:
    """Overall width of ``text`` drawn ``height`` tall (outer edges of the strokes included)."""
    stroke = height * STROKE_RATIO
    boxes = [GLYPHS[c][0] * (height - stroke) * condense + stroke for c in text]
    return sum(boxes) + TRACKING * height * (len(text) - 1)


def draw_text(draw: ImageDraw.ImageDraw, text: str, centre: Point, height: float, fill: Colour,
              condense: float = 1.0) -> None:
    """Draw ``text`` centred on ``centre``, ``height`` tall; ``condense`` narrows the glyphs (three-digit limits)."""
    stroke = height * STROKE_RATIO
    inner = height - stroke  # the centre lines span the height less half a stroke at each end
    x = centre[0] - text_width(text, height, condense) / 2 + stroke / 2
    top = centre[1] - inner / 2
    for char in text:
        ratio, strokes = GLYPHS[char]
        width = ratio * inner * condense
        for line in strokes:
            points = [(x + u * width, top + v * inner) for u, v in line]
            if len(points) > 1:
                draw.line(points, fill=fill, width=round(stroke), joint="curve")
            for px, py in (points[0], points[-1]):  # round ends; a single point is a dot
                draw.ellipse([px - stroke / 2, py - stroke / 2, px + stroke / 2, py + stroke / 2], fill=fill)
        x += width + stroke + TRACKING * height
