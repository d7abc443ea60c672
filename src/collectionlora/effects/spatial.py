"""Smooth spatial effects: blurs, token-aligned blocks, vignettes, gradients and glows."""

from __future__ import annotations

import torch
from torch import Tensor

from collectionlora.effects.base import Effect, ItemRandom
from collectionlora.effects.ops import (
    block_mean,
    blur,
    hsv_to_rgb,
    lerp,
    pick,
    pixel_grid,
    radius,
    rgb,
    screen,
    smoothstep,
    unit_grid,
)

VIGNETTE_COLOURS = rgb([(0.85, 0.05, 0.1), (0.05, 0.2, 0.9), (0.05, 0.7, 0.15), (0.55, 0.1, 0.75)])
LEAK_COLOUR = (1.0, 0.45, 0.12)
BOKEH_COLOURS = rgb([(1.0, 0.85, 0.5), (1.0, 0.6, 0.4), (0.6, 0.8, 1.0), (1.0, 1.0, 0.85)])


def tilt_shift(x: Tensor) -> Tensor:
    ys, _ = unit_grid(x)
    return lerp(x, blur(x, 2.5), smoothstep(0.2, 0.55, ys.abs()))


def soft_glow(x: Tensor) -> Tensor:
    """Soft focus under a wide pink-tinged bloom: blurred and coloured, unlike a plain shadow lift."""
    return screen(blur(x, 1.2), 0.8 * blur(x, 3.0) * rgb((1.0, 0.65, 0.8)))


def vignette_dark(x: Tensor) -> Tensor:
    return x * (1.0 - 0.85 * smoothstep(0.35, 1.0, radius(x)))


def vignette_white(x: Tensor) -> Tensor:
    return lerp(x, 1.0, 0.9 * smoothstep(0.35, 1.0, radius(x)))


def warm_spotlight(x: Tensor) -> Tensor:
    light = torch.exp(-((radius(x) / 0.4) ** 2))
    return x * lerp(rgb((0.3, 0.25, 0.2)), rgb((1.35, 1.2, 0.9)), light)


def graduated_filter(x: Tensor) -> Tensor:
    ys, _ = unit_grid(x)
    return x * lerp(0.3, 1.0, smoothstep(-1.0, 0.2, ys))


def sunset_gradient(x: Tensor) -> Tensor:
    ys, _ = unit_grid(x)
    return lerp(x, lerp(rgb((1.0, 0.55, 0.15)), rgb((0.45, 0.15, 0.6)), (ys + 1) / 2), 0.45)


def rainbow_gradient(x: Tensor) -> Tensor:
    _, xs = unit_grid(x)
    hue = ((xs + 1) / 2 * 0.85)[:, 0]
    return lerp(x, hsv_to_rgb(hue, torch.ones_like(hue), torch.ones_like(hue)), 0.4)


def colour_vignette(x: Tensor, rng: ItemRandom) -> Tensor:
    colour = pick(VIGNETTE_COLOURS, rng.integers(len(VIGNETTE_COLOURS)))
    return lerp(x, colour, 0.85 * smoothstep(0.35, 1.0, radius(x)))


def light_leak(x: Tensor, rng: ItemRandom) -> Tensor:
    """A warm glow centred on a random point of a random edge."""
    height, width = x.shape[-2:]
    edge = rng.integers(4)
    along = rng.uniform(low=0.15, high=0.85)
    cy = torch.where(edge == 0, 0.0, torch.where(edge == 1, height, along * height))
    cx = torch.where(edge == 2, 0.0, torch.where(edge == 3, width, along * width))
    ys, xs = pixel_grid(x)
    distance2 = (ys - cy.view(-1, 1, 1, 1)) ** 2 + (xs - cx.view(-1, 1, 1, 1)) ** 2
    glow = torch.exp(-distance2 / (2 * (0.3 * width) ** 2))
    return screen(x, 0.9 * glow * rgb(LEAK_COLOUR))


def bokeh(x: Tensor, rng: ItemRandom) -> Tensor:
    """Soft out-of-focus lights over a slightly blurred, dimmed scene."""
    height, width = x.shape[-2:]
    count = 6
    cy, cx = rng.uniform(count) * height, rng.uniform(count) * width
    size = rng.uniform(count, low=0.08, high=0.14) * width
    colours = BOKEH_COLOURS[rng.integers(len(BOKEH_COLOURS), count)]  # [B, K, 3]
    ys, xs = pixel_grid(x)
    distance = ((ys - cy[..., None, None]) ** 2 + (xs - cx[..., None, None]) ** 2).sqrt()
    light = (1.0 - smoothstep(0.6, 1.0, distance / size[..., None, None])) * 0.55  # [B, K, H, W]
    added = torch.einsum("bkhw,bkc->bchw", light, colours)
    return screen(blur(x, 1.0) * 0.8, added.clamp(0, 1))


def fireflies(x: Tensor, rng: ItemRandom) -> Tensor:
    """A dimmed scene with small glowing yellow-green points."""
    height, width = x.shape[-2:]
    count = 10
    cy, cx = rng.uniform(count) * height, rng.uniform(count) * width
    ys, xs = pixel_grid(x)
    distance2 = (ys + 0.5 - cy[..., None, None]) ** 2 + (xs + 0.5 - cx[..., None, None]) ** 2
    glow = torch.exp(-distance2 / (2 * 0.9**2)).amax(1, keepdim=True)
    return screen(x * 0.45, glow * rgb((1.0, 1.0, 0.35)))


EFFECTS: tuple[Effect, ...] = (
    Effect("blur", "blur", "Blur the photo softly as if it were out of focus", False, lambda x: blur(x, 2.0)),
    Effect(
        "tilt_shift",
        "blur",
        "Apply a tilt-shift look: a sharp middle band with blurred top and bottom",
        False,
        tilt_shift,
    ),
    Effect("soft_glow", "blur", "Add a dreamy soft glow that blooms around the highlights", False, soft_glow),
    Effect("pixelate", "stylize", "Pixelate the photo into chunky 4-pixel blocks", False, lambda x: block_mean(x, 4)),
    Effect(
        "mosaic",
        "stylize",
        "Turn the photo into a coarse mosaic of large 8-pixel tiles",
        False,
        lambda x: block_mean(x, 8),
    ),
    Effect("vignette", "light", "Add a dark vignette around the edges", False, vignette_dark),
    Effect("white_vignette", "light", "Fade the edges of the photo to white", False, vignette_white),
    Effect(
        "warm_spotlight",
        "light",
        "Light the centre with a warm spotlight and let the edges fall into shadow",
        False,
        warm_spotlight,
    ),
    Effect(
        "graduated_filter",
        "light",
        "Darken the sky with a graduated filter over the top of the photo",
        False,
        graduated_filter,
    ),
    Effect(
        "sunset_gradient",
        "light",
        "Wash the photo with a sunset gradient from orange at the top to purple below",
        False,
        sunset_gradient,
    ),
    Effect(
        "rainbow_gradient",
        "light",
        "Overlay a soft rainbow gradient running from left to right",
        False,
        rainbow_gradient,
    ),
    Effect("colour_vignette", "light", "Surround the photo with a strongly coloured vignette", True, colour_vignette),
    Effect("light_leak", "light", "Add a warm orange light leak bleeding in from one edge", True, light_leak),
    Effect("bokeh", "light", "Add soft out-of-focus bokeh lights over a dreamy background", True, bokeh),
    Effect("fireflies", "light", "Dim the scene and scatter glowing fireflies through it", True, fireflies),
)
