"""The synthetic world: one coloured shape on a plain, striped or dotted background, with captions.

Every image is 32x32 RGB: a circle, square or triangle in red, green, blue or yellow, of random size and
position (always whole inside the frame), on a light-grey background that is plain or carries a dark-grey
pattern, the "style" (the toy analogue of an artist's style). Captions name any subset of the three
attributes ("a red circle", "a circle, red", "red", "a circle", "a red circle, striped", "striped"), so
each concept can be prompted, and erased, alone. Everything is numpy, vectorised and deterministic from a
seed; images are float32 in [-1, 1], NCHW, as diffusers feeds them to the VAE.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

SIZE = 32
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
STYLES = ("plain", "striped", "dotted")
# Every word a caption can hold; the toy tokenizer makes each one a single token.
WORDS = ("a", *COLOURS, *SHAPES, *STYLES)

# RGB in [0, 1]. Saturated colours on unsaturated greys: the oracle finds the shape by saturation and
# names it by hue, and blurring a colour into the grey keeps its hue.
RGB = np.array(
    [[0.86, 0.12, 0.12], [0.12, 0.70, 0.16], [0.14, 0.26, 0.88], [0.95, 0.84, 0.10]],
    np.float32,
)
BACKGROUND = 0.82  # light grey
PATTERN = 0.50  # the dark grey of stripes and dots
PERIOD = 6  # pixels: stripes are 3 dark rows of every 6, dots 2x2 pixels in every 6x6 cell
STYLE_WEIGHTS = (0.5, 0.25, 0.25)  # plain is the default look, as photos are for Stable Diffusion
# Side of the shape's bounding box in pixels: large enough that the oracle's shape test is exact.
MIN_SIDE, MAX_SIDE = 10.0, 22.0
MARGIN = 1.0  # pixels kept free between the shape and the frame

# (template, weight): colour and shape named together most often, each concept also alone.
TEMPLATES = (
    ("a {colour} {shape}", 4.0),
    ("a {shape}, {colour}", 1.0),
    ("{colour}", 1.0),
    ("a {shape}", 1.0),
    ("a {colour} {shape}, {style}", 2.0),
    ("a {shape}, {style}", 0.5),
    ("{colour}, {style}", 0.5),
    ("{style}", 0.5),
)


@dataclasses.dataclass(frozen=True)
class Batch:
    images: np.ndarray  # [N, 3, 32, 32] float32 in [-1, 1]
    colour: np.ndarray  # [N] int, index into COLOURS
    shape: np.ndarray  # [N] int, index into SHAPES
    style: np.ndarray  # [N] int, index into STYLES
    captions: list[str]


def shape_coverage(shape: np.ndarray, cx: np.ndarray, cy: np.ndarray, side: np.ndarray, sub: int = 4) -> np.ndarray:
    """Fraction of each pixel the shape covers, [N, 32, 32], from sub x sub samples per pixel (smooth edges).

    (cx, cy) is the centre of the shape's bounding box and `side` its side, in pixels.
    """
    grid = (np.arange(SIZE * sub, dtype=np.float32) + 0.5) / sub  # sample positions in pixel units
    x = grid[None, None, :]
    y = grid[None, :, None]
    cx, cy, half = cx[:, None, None], cy[:, None, None], side[:, None, None] / 2
    dx, dy = np.abs(x - cx), y - cy
    circle = dx**2 + dy**2 <= half**2
    square = (dx <= half) & (np.abs(dy) <= half)
    # Upright isosceles triangle: apex at the top centre, base (as wide as it is tall) at the bottom.
    triangle = (np.abs(dy) <= half) & (dx <= (dy + half) / 2)
    s = shape[:, None, None]
    inside = np.where(s == 0, circle, np.where(s == 1, square, triangle))
    n = len(shape)
    return inside.reshape(n, SIZE, sub, SIZE, sub).mean(axis=(2, 4), dtype=np.float32)


def background(style: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Grey level of each background pixel, [N, 32, 32]; `phase` [N, 2] shifts the pattern (rows, columns)."""
    r = (np.arange(SIZE)[None, :, None] + phase[:, 0, None, None]) % PERIOD
    c = (np.arange(SIZE)[None, None, :] + phase[:, 1, None, None]) % PERIOD
    stripes = np.broadcast_to(r < PERIOD // 2, (len(style), SIZE, SIZE))
    dots = (r < 2) & (c < 2)
    s = style[:, None, None]
    dark = np.where(s == 1, stripes, np.where(s == 2, dots, False))
    return np.where(dark, PATTERN, BACKGROUND).astype(np.float32)


def render(
    colour: np.ndarray,
    shape: np.ndarray,
    style: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    side: np.ndarray,
    phase: np.ndarray,
) -> np.ndarray:
    """Images [N, 3, 32, 32] in [-1, 1] for the given attributes and placements (all [N]; phase [N, 2])."""
    alpha = shape_coverage(shape, cx, cy, side)[:, None]  # [N, 1, H, W]
    grey = background(style, phase)[:, None]  # [N, 1, H, W]
    rgb = RGB[colour][:, :, None, None]  # [N, 3, 1, 1]
    images = grey * (1 - alpha) + rgb * alpha
    return (2 * images - 1).astype(np.float32)


def captions(colour: np.ndarray, shape: np.ndarray, style: np.ndarray, rng: np.random.Generator) -> list[str]:
    """One caption per image, its template drawn by TEMPLATES' weights."""
    weights = np.array([w for _, w in TEMPLATES])
    which = rng.choice(len(TEMPLATES), size=len(colour), p=weights / weights.sum())
    return [
        TEMPLATES[t][0].format(colour=COLOURS[c], shape=SHAPES[s], style=STYLES[y])
        for t, c, s, y in zip(which, colour, shape, style, strict=True)
    ]


def sample(n: int, seed: int | Sequence[int]) -> Batch:
    """`n` random images with their labels and captions; the same seed gives the same batch."""
    rng = np.random.default_rng(seed)
    colour = rng.integers(len(COLOURS), size=n)
    shape = rng.integers(len(SHAPES), size=n)
    style = rng.choice(len(STYLES), size=n, p=STYLE_WEIGHTS)
    side = rng.uniform(MIN_SIDE, MAX_SIDE, size=n).astype(np.float32)
    low, high = side / 2 + MARGIN, SIZE - side / 2 - MARGIN
    cx = (low + (high - low) * rng.random(n)).astype(np.float32)
    cy = (low + (high - low) * rng.random(n)).astype(np.float32)
    phase = rng.integers(PERIOD, size=(n, 2))
    images = render(colour, shape, style, cx, cy, side, phase)
    return Batch(images, colour, shape, style, captions(colour, shape, style, rng))


def all_captions() -> list[str]:
    """Every caption the world can write, in a fixed order (the trainer tokenizes them once)."""
    out = {t.format(colour=c, shape=s, style=y) for t, _ in TEMPLATES for c in COLOURS for s in SHAPES for y in STYLES}
    return sorted(out)
