"""Overlays with simple geometry: frames, lines, dots, stickers and blocks."""

from __future__ import annotations

import torch
from torch import Tensor

from collectionlora.effects.base import DeterministicTransform, Effect, ItemRandom
from collectionlora.effects.ops import (
    CELL,
    RGB,
    border_mask,
    discs,
    paint,
    pick,
    pixel_grid,
    rgb,
    segments,
)

SATURATED = rgb(
    [
        (0.9, 0.1, 0.1), (0.1, 0.75, 0.2), (0.1, 0.3, 0.95), (1.0, 0.85, 0.1),
        (0.9, 0.1, 0.8), (0.1, 0.85, 0.9), (1.0, 0.5, 0.05),
    ]
)  # fmt: skip
WHITE, BLACK = (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)


def frame(colour: RGB, top: int, right: int, bottom: int, left: int) -> DeterministicTransform:
    return lambda x: paint(x, rgb(colour), border_mask(x, top, right, bottom, left))


def double_border(x: Tensor) -> Tensor:
    out = paint(x, rgb(WHITE), border_mask(x, 4, 4, 4, 4))
    return paint(out, rgb(BLACK), border_mask(x, 2, 2, 2, 2))


def rounded_corners(x: Tensor) -> Tensor:
    height, width = x.shape[-2:]
    ys, xs = pixel_grid(x)
    corner = 0.3 * width
    dy = (corner - torch.minimum(ys + 0.5, height - ys - 0.5)).clamp(min=0)
    dx = (corner - torch.minimum(xs + 0.5, width - xs - 0.5)).clamp(min=0)
    outside = ((dy**2 + dx**2).sqrt() - corner + 0.5).clamp(0, 1)
    return paint(x, rgb(BLACK), outside)


def grid_lines(x: Tensor) -> Tensor:
    ys, xs = pixel_grid(x)
    lines = ((ys % (2 * CELL) == 0) | (xs % (2 * CELL) == 0)).float()
    return paint(x, rgb(WHITE), 0.85 * lines)


def scanlines(x: Tensor) -> Tensor:
    ys, _ = pixel_grid(x)
    return x * torch.where(ys % 2 == 1, 0.45, 1.0)


def viewfinder(x: Tensor) -> Tensor:
    """White corner brackets and a small centre cross, as in a camera viewfinder."""
    height, width = x.shape[-2:]
    ys, xs = pixel_grid(x)
    inset, arm = 3, 7
    near_y = torch.minimum(ys - inset, height - 1 - inset - ys)
    near_x = torch.minimum(xs - inset, width - 1 - inset - xs)
    brackets = ((near_y == 0) & (near_x >= 0) & (near_x < arm)) | ((near_x == 0) & (near_y >= 0) & (near_y < arm))
    cy, cx = ys - (height - 1) / 2, xs - (width - 1) / 2
    cross = ((cy.abs() < 1) & (cx.abs() < 3)) | ((cx.abs() < 1) & (cy.abs() < 3))
    return paint(x, rgb(WHITE), (brackets | cross).float())


def colour_frame(x: Tensor, rng: ItemRandom) -> Tensor:
    return paint(x, pick(SATURATED, rng.integers(len(SATURATED))), border_mask(x, 3, 3, 3, 3))


def corner_badge(x: Tensor, rng: ItemRandom) -> Tensor:
    """A red badge with a white centre in a random corner."""
    height, width = x.shape[-2:]
    corner = rng.integers(4)
    cy = torch.where(corner < 2, 6.0, height - 6.0).view(-1, 1)
    cx = torch.where(corner % 2 == 0, 6.0, width - 6.0).view(-1, 1)
    out = paint(x, rgb((0.9, 0.08, 0.1)), discs(x, cy, cx, torch.full_like(cy, 4.5)))
    return paint(out, rgb(WHITE), discs(x, cy, cx, torch.full_like(cy, 1.5)))


def heart_sticker(x: Tensor, rng: ItemRandom) -> Tensor:
    """A pink heart at a random position."""
    height, width = x.shape[-2:]
    cy = rng.uniform(low=0.25, high=0.75).view(-1, 1, 1, 1) * height
    cx = rng.uniform(low=0.25, high=0.75).view(-1, 1, 1, 1) * width
    ys, xs = pixel_grid(x)
    scale = 0.17 * width
    u, v = (xs + 0.5 - cx) / scale, -(ys + 0.5 - cy) / scale
    inside = ((u**2 + v**2 - 1) ** 3 - u**2 * v**3 <= 0).float()
    return paint(x, rgb((1.0, 0.35, 0.6)), inside)


def polka_dots(x: Tensor, rng: ItemRandom) -> Tensor:
    """A regular grid of dots of one random colour, with a random grid offset."""
    ys, xs = pixel_grid(x)
    spacing = 2 * CELL
    oy = rng.integers(spacing).view(-1, 1, 1, 1)
    ox = rng.integers(spacing).view(-1, 1, 1, 1)
    dy = (ys - oy) % spacing - spacing / 2 + 0.5
    dx = (xs - ox) % spacing - spacing / 2 + 0.5
    dots = (2.2 - (dy**2 + dx**2).sqrt() + 0.5).clamp(0, 1)
    return paint(x, pick(SATURATED, rng.integers(len(SATURATED))), dots)


def confetti(x: Tensor, rng: ItemRandom) -> Tensor:
    """Small squares of many colours scattered at random."""
    height, width = x.shape[-2:]
    count = 24
    top = rng.integers(height - 1, count).float()[..., None, None]
    left = rng.integers(width - 1, count).float()[..., None, None]
    colours = SATURATED[rng.integers(len(SATURATED), count)]  # [B, K, 3]
    ys, xs = pixel_grid(x)
    pieces = ((ys >= top) & (ys < top + 2) & (xs >= left) & (xs < left + 2)).float()  # [B, K, H, W]
    out = x
    for k in range(count):
        out = paint(out, colours[:, k].view(-1, 3, 1, 1), pieces[:, k : k + 1])
    return out


def colour_block(x: Tensor, rng: ItemRandom) -> Tensor:
    """A translucent token-aligned rectangle of a random colour."""
    height, width = x.shape[-2:]
    cells_y, cells_x = height // CELL, width // CELL
    size_y = rng.integers(cells_y // 4 + 1).view(-1, 1, 1, 1) + cells_y // 4
    size_x = rng.integers(cells_x // 4 + 1).view(-1, 1, 1, 1) + cells_x // 4
    top = (rng.uniform().view(-1, 1, 1, 1) * (cells_y - size_y + 1)).floor()
    left = (rng.uniform().view(-1, 1, 1, 1) * (cells_x - size_x + 1)).floor()
    ys, xs = pixel_grid(x)
    cy, cx = (ys // CELL), (xs // CELL)
    inside = ((cy >= top) & (cy < top + size_y) & (cx >= left) & (cx < left + size_x)).float()
    return paint(x, pick(SATURATED, rng.integers(len(SATURATED))), 0.6 * inside)


def colour_checker(x: Tensor, rng: ItemRandom) -> Tensor:
    """A translucent chequerboard of token-sized squares in a random colour and phase."""
    ys, xs = pixel_grid(x)
    phase = rng.integers(2).view(-1, 1, 1, 1)
    squares = (((ys // CELL + xs // CELL + phase) % 2) == 0).float()
    return paint(x, pick(SATURATED, rng.integers(len(SATURATED))), 0.45 * squares)


def random_stripes(x: Tensor, rng: ItemRandom) -> Tensor:
    """Translucent white stripes: horizontal, vertical or either diagonal, with a random phase."""
    ys, xs = pixel_grid(x)
    direction = rng.integers(4).view(-1, 1, 1, 1)
    diagonal = torch.where(direction == 2, ys + xs, ys - xs)
    coordinate = torch.where(direction == 0, ys, torch.where(direction == 1, xs, diagonal))
    phase = rng.integers(2 * CELL).view(-1, 1, 1, 1)
    stripes = ((coordinate + phase) % (2 * CELL) < 3).float()
    return paint(x, rgb(WHITE), 0.6 * stripes)


def sparkles(x: Tensor, rng: ItemRandom) -> Tensor:
    """Golden four-pointed sparkles at random positions."""
    height, width = x.shape[-2:]
    count = 16
    cy = rng.integers(height, count).float()[..., None, None]
    cx = rng.integers(width, count).float()[..., None, None]
    ys, xs = pixel_grid(x)
    dy, dx = (ys - cy).abs(), (xs - cx).abs()
    arms = (((dy == 0) & (dx <= 1)) | ((dx == 0) & (dy <= 1))).float()
    centre = ((dy == 0) & (dx == 0)).float()
    coverage = torch.maximum(0.75 * arms, centre).amax(1, keepdim=True)
    return paint(x, rgb((1.0, 0.92, 0.45)), coverage)


def bubbles(x: Tensor, rng: ItemRandom) -> Tensor:
    """Thin white rings of random size and position, like soap bubbles."""
    height, width = x.shape[-2:]
    count = 5
    cy, cx = rng.uniform(count) * height, rng.uniform(count) * width
    r = rng.uniform(count, low=2.5, high=5.0)
    ys, xs = pixel_grid(x)
    distance = ((ys + 0.5 - cy[..., None, None]) ** 2 + (xs + 0.5 - cx[..., None, None]) ** 2).sqrt()
    rings = (1.0 - (distance - r[..., None, None]).abs()).clamp(0, 1).amax(1, keepdim=True)
    return paint(x, rgb(WHITE), 0.85 * rings)


def paint_splatter(x: Tensor, rng: ItemRandom) -> Tensor:
    """Five opaque splats of saturated paint, each a ragged union of small discs."""
    height, width = x.shape[-2:]
    out = x
    for _ in range(5):
        cy = rng.uniform(low=0.1, high=0.9) * height
        cx = rng.uniform(low=0.1, high=0.9) * width
        offsets = rng.uniform(4, 2, low=-3.5, high=3.5)
        blob = discs(x, cy[:, None] + offsets[..., 0], cx[:, None] + offsets[..., 1], rng.uniform(4, low=1.0, high=2.5))
        out = paint(out, pick(SATURATED, rng.integers(len(SATURATED))), blob.amax(1, keepdim=True))
    return out


def scribbles(x: Tensor, rng: ItemRandom) -> Tensor:
    """Three long thin lines of random colours crossing the photo."""
    height, width = x.shape[-2:]
    size = torch.tensor([height, width], dtype=torch.float32)
    out = x
    for _ in range(3):
        start, end = rng.uniform(1, 2) * size, rng.uniform(1, 2) * size
        coverage = segments(x, start, end, 1.2)
        out = paint(out, pick(SATURATED, rng.integers(len(SATURATED))), coverage)
    return out


EFFECTS: tuple[Effect, ...] = (
    Effect("white_border", "frame", "Add a thin white border around the photo", False, frame(WHITE, 2, 2, 2, 2)),
    Effect("black_border", "frame", "Frame the photo with a thick black border", False, frame(BLACK, 4, 4, 4, 4)),
    Effect(
        "polaroid",
        "frame",
        "Make it a polaroid print with a wide white strip at the bottom",
        False,
        frame((0.97, 0.96, 0.92), 2, 2, 8, 2),
    ),
    Effect(
        "letterbox",
        "frame",
        "Add black cinematic letterbox bars at the top and bottom",
        False,
        frame(BLACK, 4, 0, 4, 0),
    ),
    Effect("rounded_corners", "frame", "Round off the corners of the photo with black", False, rounded_corners),
    Effect("double_border", "frame", "Add a double frame, black outside and white inside", False, double_border),
    Effect("viewfinder", "frame", "Add white camera viewfinder marks in the corners and centre", False, viewfinder),
    Effect("colour_frame", "frame", "Frame the photo with a brightly coloured border", True, colour_frame),
    Effect("grid_lines", "overlay", "Draw a white grid over the photo", False, grid_lines),
    Effect("scanlines", "overlay", "Add dark CRT scanlines across every other row", False, scanlines),
    Effect("corner_badge", "overlay", "Stick a round red badge in one corner", True, corner_badge),
    Effect("heart_sticker", "overlay", "Put a pink heart sticker somewhere on the photo", True, heart_sticker),
    Effect("polka_dots", "overlay", "Cover the photo with a pattern of coloured polka dots", True, polka_dots),
    Effect("confetti", "overlay", "Scatter colourful confetti over the photo", True, confetti),
    Effect(
        "colour_block", "overlay", "Lay a translucent coloured rectangle over part of the photo", True, colour_block
    ),
    Effect("colour_checker", "overlay", "Overlay a translucent coloured chequerboard", True, colour_checker),
    Effect(
        "random_stripes", "overlay", "Overlay translucent white stripes running in any direction", True, random_stripes
    ),
    Effect("sparkles", "overlay", "Sprinkle golden sparkles across the photo", True, sparkles),
    Effect("bubbles", "overlay", "Float a few soap bubbles over the photo", True, bubbles),
    Effect("paint_splatter", "overlay", "Splatter blobs of bright paint onto the photo", True, paint_splatter),
    Effect("scribbles", "overlay", "Scribble a few long coloured lines across the photo", True, scribbles),
)
