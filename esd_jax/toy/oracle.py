"""The oracle: reads (colour, shape, style) off an image of the toy world, or "none" where it cannot.

Deterministic image statistics, no learning. The foreground is the largest connected patch of saturated
pixels (the backgrounds are grey). Its colour is the majority hue. Its shape is the world shape that
overlaps it best when drawn with the same area and centroid (intersection over union), which a stray
pixel or a blurred corner barely moves, unlike a bounding box. The style is the background's mean
darkness below its light grey (blurring keeps a mean): plain 0, dotted 1/9 and striped 1/2 of the
pattern's contrast. On generated images an attribute without clear evidence (no saturated patch, or
one too small, too large or of no world shape) reads "none".
"""

import dataclasses

import numpy as np
from scipy import ndimage

from esd_jax.toy import world

NONE = "none"
HUES = np.array([0.0, 123.0, 226.0, 52.0])  # degrees, in world.COLOURS' order (the hues of world.RGB)
SATURATED = 0.3  # max - min of RGB in [0, 1]: the world's colours have 0.58-0.85, its greys 0
GREY = 0.15  # below this saturation a pixel may be background
MIN_AREA = 20  # pixels: the world's smallest shape covers about 50
MAX_AREA = (world.MAX_SIDE + 4) ** 2  # pixels: more is a flood of colour, not one of the world's shapes
MIN_HUE_SHARE = 0.6  # the majority hue must hold this share of the foreground
MIN_IOU = 0.7  # the best-fitting shape must overlap the foreground this well (the right one: > 0.9)
# Mean darkness of the background in units of the pattern's contrast; plain 0, dotted 1/9, striped 1/2.
CONTRAST = world.BACKGROUND - world.PATTERN
DOTTED, STRIPED = 0.06, 0.28


@dataclasses.dataclass(frozen=True)
class Reading:
    colour: np.ndarray  # [N] str: a name from world.COLOURS or "none"
    shape: np.ndarray  # [N] str: a name from world.SHAPES or "none"
    style: np.ndarray  # [N] str: a name from world.STYLES or "none"


def hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees of RGB values [..., 3] in [0, 1] (the HSV hexcone)."""
    r, g, b = np.moveaxis(rgb, -1, 0)
    hi, lo = rgb.max(-1), rgb.min(-1)
    d = np.maximum(hi - lo, 1e-6)
    h = np.where(hi == r, ((g - b) / d) % 6, np.where(hi == g, (b - r) / d + 2, (r - g) / d + 4))
    return 60.0 * h


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected patch of one mask [H, W]."""
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    return labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))


def read_colour(rgb: np.ndarray, fg: np.ndarray, area: np.ndarray) -> np.ndarray:
    """The majority of each foreground pixel's nearest world hue; [N] str."""
    diff = np.abs((hue(rgb)[..., None] - HUES + 180.0) % 360.0 - 180.0)  # [N, H, W, colours]
    nearest = np.argmin(diff, axis=-1)
    votes = np.stack([np.sum(fg & (nearest == i), axis=(1, 2)) for i in range(len(HUES))], axis=1)
    best = np.argmax(votes, axis=1)
    clear = (area >= MIN_AREA) & (area <= MAX_AREA) & (votes.max(axis=1) >= MIN_HUE_SHARE * area)
    return np.where(clear, np.array(world.COLOURS)[best], NONE)


def read_shape(fg: np.ndarray, area: np.ndarray) -> np.ndarray:
    """The world shape of the foreground's area and centroid that overlaps it best; [N] str."""
    n, h, w = fg.shape
    safe = np.maximum(area, 1).astype(np.float32)
    cy = (fg * (np.arange(h)[None, :, None] + 0.5)).sum((1, 2)) / safe
    cx = (fg * (np.arange(w)[None, None, :] + 0.5)).sum((1, 2)) / safe
    ious = []
    for i, name in enumerate(world.SHAPES):
        # Side of the bounding box from the area; a triangle's centroid lies s/6 below its box's centre.
        side = {"circle": 2 * np.sqrt(safe / np.pi), "square": np.sqrt(safe), "triangle": np.sqrt(2 * safe)}[name]
        centre_y = cy - side / 6 if name == "triangle" else cy
        template = world.shape_coverage(np.full(n, i), cx, centre_y, side, sub=2) >= 0.5
        ious.append((template & fg).sum((1, 2)) / np.maximum((template | fg).sum((1, 2)), 1))
    ious = np.stack(ious, axis=1)  # [N, shapes]
    clear = (area >= MIN_AREA) & (area <= MAX_AREA) & (ious.max(axis=1) >= MIN_IOU)
    return np.where(clear, np.array(world.SHAPES)[np.argmax(ious, axis=1)], NONE)


def read_style(rgb: np.ndarray) -> np.ndarray:
    """Plain, dotted or striped from the background's mean darkness; [N] str."""
    # A 3x3 mean damps pixel noise and keeps the pattern's mean darkness, which is what is measured.
    smooth = ndimage.uniform_filter(rgb, size=(1, 3, 3, 1), mode="nearest")
    lum = smooth.mean(-1)
    # Background: grey pixels two pixels away from anything coloured (edges and their smoothing mix both).
    coloured = smooth.max(-1) - smooth.min(-1) > GREY
    bg = ~ndimage.binary_dilation(coloured, structure=np.ones((1, 3, 3), bool), iterations=2)
    enough = bg.mean(axis=(1, 2)) >= 0.25
    values = np.where(bg | ~enough[:, None, None], lum, np.nan)
    light = np.nanpercentile(values, 95, axis=(1, 2))  # the light grey: most of every style's background
    darkness = np.nanmean(np.clip(light[:, None, None] - values, 0, None), axis=(1, 2)) / CONTRAST
    style = np.where(darkness < DOTTED, "plain", np.where(darkness < STRIPED, "dotted", "striped"))
    return np.where(enough, style, NONE)


def read(images: np.ndarray) -> Reading:
    """The attributes of images [N, 3, H, W] (or one [3, H, W]) in [-1, 1], as the world and diffusers give them."""
    images = np.asarray(images, np.float32)
    if images.ndim == 3:
        images = images[None]
    rgb = np.clip((images.transpose(0, 2, 3, 1) + 1) / 2, 0, 1)  # [N, H, W, 3]
    saturation = rgb.max(-1) - rgb.min(-1)
    fg = np.stack([largest_component(m) for m in saturation > SATURATED]).reshape(saturation.shape)
    area = fg.sum(axis=(1, 2))
    return Reading(read_colour(rgb, fg, area), read_shape(fg, area), read_style(rgb))
