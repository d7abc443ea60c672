"""Textures: grain, noise, weather and low-frequency stains. All but halftone are seeded per item."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from collectionlora.effects.base import Effect, ItemRandom
from collectionlora.effects.colour import SEPIA_MATRIX
from collectionlora.effects.ops import (
    CELL,
    block_mean,
    blur,
    lerp,
    luma,
    paint,
    pixel_grid,
    rgb,
    segments,
    smooth_field,
    upsample_blocks,
)


def film_grain(x: Tensor, rng: ItemRandom) -> Tensor:
    height, width = x.shape[-2:]
    return x + 0.09 * rng.normal(1, height, width)


def colour_noise(x: Tensor, rng: ItemRandom) -> Tensor:
    height, width = x.shape[-2:]
    return x + 0.11 * rng.normal(3, height, width)


def salt_and_pepper(x: Tensor, rng: ItemRandom) -> Tensor:
    height, width = x.shape[-2:]
    draw = rng.uniform(1, height, width)
    return torch.where(draw < 0.04, 0.0, torch.where(draw > 0.96, 1.0, x))


def snow(x: Tensor, rng: ItemRandom) -> Tensor:
    """A cold, hazy scene with scattered white flakes."""
    height, width = x.shape[-2:]
    flakes = (rng.uniform(1, height, width) < 0.06).float()
    return paint(lerp(x, rgb((0.88, 0.93, 1.0)), 0.2), rgb((1.0, 1.0, 1.0)), 0.9 * flakes)


def fog(x: Tensor, rng: ItemRandom) -> Tensor:
    height, width = x.shape[-2:]
    density = smooth_field(rng.uniform(1, 4, 4, low=0.15, high=0.8), height, width)
    return lerp(x, rgb((0.88, 0.9, 0.93)), density)


def watercolour(x: Tensor, rng: ItemRandom) -> Tensor:
    height, width = x.shape[-2:]
    stains = smooth_field(rng.uniform(3, 4, 4, low=0.55, high=1.2), height, width)
    return lerp(blur(x, 0.8) * stains, 1.0, 0.1)


def stained_glass(x: Tensor, rng: ItemRandom) -> Tensor:
    """Token-sized tiles, each tinted its own colour, separated by dark leading."""
    height, width = x.shape[-2:]
    tints = rng.uniform(3, math.ceil(height / CELL), math.ceil(width / CELL), low=0.45, high=1.35)
    tiles = block_mean(x, CELL) * upsample_blocks(tints, CELL, height, width)
    ys, xs = pixel_grid(x)
    leading = ((ys % CELL == 0) | (xs % CELL == 0)).float()
    return paint(tiles, rgb((0.08, 0.06, 0.05)), 0.8 * leading)


def rain(x: Tensor, rng: ItemRandom) -> Tensor:
    """A dim, blue-grey scene crossed by short slanted streaks."""
    height, width = x.shape[-2:]
    count = 14
    start = torch.stack((rng.uniform(count, low=-4, high=height), rng.uniform(count, low=-4, high=width)), -1)
    end = start + torch.tensor([0.22 * height, 0.1 * width])
    streaks = segments(x, start, end, 1.0).amax(1, keepdim=True)
    base = x * rgb((0.75, 0.8, 0.9))
    return paint(base, rgb((0.8, 0.85, 0.95)), 0.75 * streaks)


def old_film(x: Tensor, rng: ItemRandom) -> Tensor:
    """Sepia with vertical scratches and dark dust specks."""
    height, width = x.shape[-2:]
    sepia = torch.einsum("oc,bchw->bohw", torch.tensor(SEPIA_MATRIX), x)
    _, xs = pixel_grid(x)
    columns = rng.integers(width, 3).float()
    scratches = (xs[:, :, :1, :] == columns[..., None, None]).any(1, keepdim=True).float()
    specks = (rng.uniform(1, height, width) < 0.03).float()
    out = paint(sepia, rgb((0.95, 0.92, 0.85)), 0.7 * scratches)
    return paint(out, rgb((0.1, 0.08, 0.05)), 0.9 * specks)


def glitch_bands(x: Tensor, rng: ItemRandom) -> Tensor:
    """Three token-high horizontal bands with rotated colour channels."""
    height = x.shape[-2]
    ys, _ = pixel_grid(x)
    rows = rng.integers(height // CELL, 3).float() * CELL
    inside = ((ys[:, :, :, :1] >= rows[..., None, None]) & (ys[:, :, :, :1] < rows[..., None, None] + CELL))
    band = inside.any(1, keepdim=True).float()
    return lerp(x, 1.0 - x[:, [1, 2, 0]], band)


def halftone(x: Tensor) -> Tensor:
    """Black dots on cream paper, one per token-sized cell, sized by the cell's darkness."""
    height, width = x.shape[-2:]
    darkness = 1.0 - luma(block_mean(x, CELL))
    ys, xs = pixel_grid(x)
    distance = ((ys % CELL + 0.5 - CELL / 2) ** 2 + (xs % CELL + 0.5 - CELL / 2) ** 2).sqrt()
    ink = (darkness.sqrt() * CELL * 0.72 - distance + 0.5).clamp(0, 1)
    return paint(rgb((0.98, 0.96, 0.88)).expand(x.shape[0], 3, height, width), rgb((0.08, 0.08, 0.1)), ink)


EFFECTS: tuple[Effect, ...] = (
    Effect("halftone", "stylize", "Turn the photo into a black-and-white halftone newspaper print", False, halftone),
    Effect("film_grain", "texture", "Add heavy monochrome film grain", True, film_grain),
    Effect(
        "colour_noise", "texture", "Add colourful digital sensor noise as if shot at very high ISO", True, colour_noise
    ),
    Effect(
        "salt_and_pepper", "texture", "Sprinkle salt-and-pepper noise of black and white pixels", True, salt_and_pepper
    ),
    Effect("snow", "texture", "Make it a cold winter scene with snowflakes falling", True, snow),
    Effect("fog", "texture", "Roll patchy fog across the scene", True, fog),
    Effect(
        "watercolour", "texture", "Paint the photo as a soft watercolour with blotchy colour stains", True, watercolour
    ),
    Effect(
        "stained_glass",
        "stylize",
        "Turn the photo into a stained-glass window of small tinted tiles",
        True,
        stained_glass,
    ),
    Effect("rain", "texture", "Make it a gloomy rainy day with streaks of falling rain", True, rain),
    Effect("old_film", "texture", "Age the photo like a scratched, dusty old film reel", True, old_film),
    Effect(
        "glitch_bands", "texture", "Add digital glitch bands of scrambled colour across the photo", True, glitch_bands
    ),
)
