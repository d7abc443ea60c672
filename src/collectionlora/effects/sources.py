"""Procedural source images: varied simple scenes that effects are applied to.

Each image is drawn from its own generator seeded by (seed, split, index), so the splits are
disjoint and an image does not depend on how many others are made with it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from collectionlora.effects.base import stable_seed
from collectionlora.effects.ops import hsv_to_rgb, lerp
from collectionlora.images import quantize

SPLITS = ("train", "general", "eval", "judge")
MAX_SHAPES = 5
SHAPE_PARAMS = 10  # kind, cy, cx, sy, sx, angle, hue, saturation, value, detail
SCENE_PARAMS = 16
PARAMS = SCENE_PARAMS + MAX_SHAPES * SHAPE_PARAMS
# Background palettes as (saturation low, high, value low, high): vivid, pastel, dark, muted.
PALETTES = torch.tensor([[0.6, 1.0, 0.65, 1.0], [0.15, 0.45, 0.8, 1.0], [0.35, 0.9, 0.15, 0.5], [0.1, 0.4, 0.3, 0.85]])


def make_sources(split: str, count: int, size: int, seed: int) -> Tensor:
    """`count` scenes of `size` x `size` pixels from `split`, as a [count, 3, size, size] batch in [0, 1]."""
    if split not in SPLITS:
        raise ValueError(f"unknown source split {split!r}: expected one of {', '.join(SPLITS)}")
    if count < 1:
        raise ValueError(f"source count must be at least 1, got {count}")
    if size < 8:
        raise ValueError(f"source size must be at least 8 pixels, got {size}")
    generators = [torch.Generator().manual_seed(stable_seed("source", seed, split, i)) for i in range(count)]
    params = torch.stack([torch.rand(PARAMS, generator=g) for g in generators])
    return quantize(_render(params, size))


def _render(params: Tensor, size: int) -> Tensor:
    ys = ((torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1).view(1, -1, 1)
    xs = ((torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1).view(1, 1, -1)
    scene = params[:, :SCENE_PARAMS]
    base_hue, spread = scene[:, 2], 0.15 + 0.85 * scene[:, 3]
    palette = PALETTES[(scene[:, 1] * len(PALETTES)).long().clamp(max=len(PALETTES) - 1)]
    first = _colour(base_hue, spread, scene[:, 4:7], palette)
    second = _colour(base_hue, spread, scene[:, 7:10], palette)
    image = lerp(first, second, _background_mix(scene, ys, xs, size))
    shapes = 2 + (scene[:, 12] * (MAX_SHAPES - 1)).long()
    shading = 0.35 * scene[:, 13].view(-1, 1, 1)
    full_range = torch.tensor([0.2, 1.0, 0.2, 1.0]).expand_as(palette)
    for slot in range(MAX_SHAPES):
        shape = params[:, SCENE_PARAMS + slot * SHAPE_PARAMS : SCENE_PARAMS + (slot + 1) * SHAPE_PARAMS]
        coverage, along = _shape_mask(shape, ys, xs, size)
        coverage = coverage * (slot < shapes).float().view(-1, 1, 1)
        colour = _colour(base_hue, spread, shape[:, 6:9], full_range) * (1 - shading * along).unsqueeze(1)
        image = lerp(image, colour, coverage.unsqueeze(1))
    return image.clamp(0, 1)


def _colour(base_hue: Tensor, spread: Tensor, draws: Tensor, palette: Tensor) -> Tensor:
    """A [B, 3, 1, 1] colour: hue near the image's base hue, saturation and value from the palette ranges."""
    hue = (base_hue + spread * (draws[:, 0] - 0.5)) % 1.0
    saturation = lerp(palette[:, 0], palette[:, 1], draws[:, 1])
    value = lerp(palette[:, 2], palette[:, 3], draws[:, 2])
    return hsv_to_rgb(hue, saturation, value).view(-1, 3, 1, 1)


def _background_mix(scene: Tensor, ys: Tensor, xs: Tensor, size: int) -> Tensor:
    """Per-pixel mix between the two background colours: a linear gradient, a two-tone split or a radial glow."""
    angle = scene[:, 10].view(-1, 1, 1) * 2 * math.pi
    offset = (scene[:, 11].view(-1, 1, 1) - 0.5) * 1.2
    along = xs * torch.cos(angle) + ys * torch.sin(angle)
    gradient = (0.5 + 0.5 * along).clamp(0, 1)
    split = ((along - offset) * size / 2 + 0.5).clamp(0, 1)
    radial = (((xs - offset) ** 2 + (ys + offset * torch.sin(angle)) ** 2).sqrt() / 1.6).clamp(0, 1)
    mode = (scene[:, 0] * 3).long().view(-1, 1, 1)
    return torch.where(mode == 0, gradient, torch.where(mode == 1, split, radial)).unsqueeze(1)


def _shape_mask(shape: Tensor, ys: Tensor, xs: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Anti-aliased coverage [B, H, W] of one shape per image, and its normalised vertical axis for shading."""
    column = [shape[:, i].view(-1, 1, 1) for i in range(SHAPE_PARAMS)]
    kind, cy, cx, sy, sx, angle, _, _, _, detail = column
    cy, cx = (cy - 0.5) * 1.5, (cx - 0.5) * 1.5
    sy, sx = 0.15 + 0.45 * sy, 0.15 + 0.45 * sx
    angle = angle * math.pi
    u = (xs - cx) * torch.cos(angle) + (ys - cy) * torch.sin(angle)
    v = -(xs - cx) * torch.sin(angle) + (ys - cy) * torch.cos(angle)
    un, vn = u / sx, v / sy
    ellipse = (un**2 + vn**2).sqrt()
    rectangle = torch.maximum(un.abs(), vn.abs())
    normals = [(math.cos(a), math.sin(a)) for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]
    triangle = torch.stack([c * un + s * vn for c, s in normals]).amax(0) * 2
    phi = torch.atan2(vn, un)
    wobble = 1 + 0.22 * torch.sin(3 * phi + 2 * math.pi * detail) + 0.12 * torch.sin(5 * phi + 4 * math.pi * detail)
    blob = ellipse / wobble
    pixels = torch.minimum(sy, sx) * size / 2  # pixels per unit of normalised distance
    distances = torch.stack((ellipse, rectangle, triangle, rectangle, blob))
    coverage = ((1 - distances) * pixels + 0.5).clamp(0, 1)
    stripes = (torch.sin(u * (8 + 14 * detail)) * 2 + 0.5).clamp(0, 1)
    coverage[3] = coverage[3] * stripes
    which = (kind * len(distances)).long().clamp(max=len(distances) - 1)
    chosen = torch.gather(coverage, 0, which.view(1, -1, 1, 1).expand(1, *coverage.shape[1:]))[0]
    return chosen, vn.clamp(-1, 1)
