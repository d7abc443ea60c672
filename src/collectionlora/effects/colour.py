"""Pointwise colour and tone effects: what a tiny edit model learns best."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from collectionlora.effects.base import DeterministicTransform, Effect, ItemRandom
from collectionlora.effects.ops import (
    RGB,
    gradient_map,
    lerp,
    luma,
    pick,
    rgb,
    saturate,
)

SEPIA_MATRIX = ((0.393, 0.769, 0.189), (0.349, 0.686, 0.168), (0.272, 0.534, 0.131))
PASTELS = rgb(
    [(1.0, 0.72, 0.8), (0.68, 1.0, 0.78), (0.8, 0.72, 1.0), (1.0, 0.84, 0.62), (0.68, 0.86, 1.0), (1.0, 1.0, 0.66)]
)
DUOTONE_PAIRS = (
    ((0.0, 0.3, 0.32), (1.0, 0.6, 0.75)),  # teal -> pink
    ((0.05, 0.2, 0.05), (0.8, 1.0, 0.3)),  # forest -> lime
    ((0.35, 0.0, 0.1), (1.0, 0.95, 0.78)),  # maroon -> cream
    ((0.15, 0.1, 0.45), (0.4, 1.0, 1.0)),  # indigo -> cyan
)


def mix(matrix: Sequence[RGB]) -> DeterministicTransform:
    weights = torch.tensor(matrix, dtype=torch.float32)
    return lambda x: torch.einsum("oc,bchw->bohw", weights, x)


def permute(order: tuple[int, int, int]) -> DeterministicTransform:
    return lambda x: x[:, list(order)]


def tint(gains: RGB, offsets: RGB) -> DeterministicTransform:
    return lambda x: x * rgb(gains) + rgb(offsets)


def gradient(stops: Sequence[RGB]) -> DeterministicTransform:
    return lambda x: gradient_map(x, stops)


def curves(
    red: DeterministicTransform, green: DeterministicTransform, blue: DeterministicTransform
) -> DeterministicTransform:
    """Separate tone curves per channel."""
    return lambda x: torch.cat((red(x[:, 0:1]), green(x[:, 1:2]), blue(x[:, 2:3])), dim=1)


def grayscale(x: Tensor) -> Tensor:
    return luma(x).expand_as(x)


def solarize(x: Tensor) -> Tensor:
    """A cosine curve with two tone reversals, so even an all-dark photo is partly reversed."""
    return 0.5 - 0.5 * torch.cos(3 * math.pi * x)


def high_contrast(x: Tensor) -> Tensor:
    """A smooth S-curve: stronger contrast without the clipping that mimics a saturation boost."""
    return 0.5 + 0.5 * torch.tanh(3.0 * (x - 0.5)) / math.tanh(1.5)


def bleach_bypass(x: Tensor) -> Tensor:
    return (saturate(x, 0.4) - 0.5) * 1.6 + 0.5


def split_tone(x: Tensor) -> Tensor:
    return x + (luma(x) - 0.5) * rgb((0.6, 0.05, -0.6))


def night_vision(x: Tensor) -> Tensor:
    return gradient_map(x.clamp(0, 1) ** 0.6, [(0.0, 0.05, 0.0), (0.2, 0.7, 0.15), (0.8, 1.0, 0.7)])


def pastel_wash(x: Tensor, rng: ItemRandom) -> Tensor:
    return lerp(x, pick(PASTELS, rng.integers(len(PASTELS))), 0.45)


def random_duotone(x: Tensor, rng: ItemRandom) -> Tensor:
    pairs = torch.tensor(DUOTONE_PAIRS, dtype=torch.float32)[rng.integers(len(DUOTONE_PAIRS))]  # [B, 2, 3]
    return lerp(pairs[:, 0].view(-1, 3, 1, 1), pairs[:, 1].view(-1, 3, 1, 1), luma(x))


EFFECTS: tuple[Effect, ...] = (
    Effect("grayscale", "colour", "Convert the photo to black and white", False, grayscale),
    Effect("sepia", "colour", "Turn the photo into a warm sepia-toned vintage print", False, mix(SEPIA_MATRIX)),
    Effect(
        "hue_rotate_forward",
        "colour",
        "Rotate the colours so reds turn green, greens turn blue and blues turn red",
        False,
        permute((2, 0, 1)),
    ),
    Effect(
        "hue_rotate_backward",
        "colour",
        "Rotate the colours the other way, so reds turn blue and blues turn green",
        False,
        permute((1, 2, 0)),
    ),
    Effect(
        "swap_red_blue", "colour", "Swap the red and blue channels so warm colours turn cool", False, permute((2, 1, 0))
    ),
    Effect(
        "swap_red_green",
        "colour",
        "Swap the red and green channels for a surreal false-colour look",
        False,
        permute((1, 0, 2)),
    ),
    Effect(
        "swap_green_blue", "colour", "Swap the green and blue channels so greens turn blue", False, permute((0, 2, 1))
    ),
    Effect("invert", "colour", "Invert the photo into a colour negative", False, lambda x: 1.0 - x),
    Effect(
        "muted_colours", "colour", "Mute the colours to a soft, washed-out palette", False, lambda x: saturate(x, 0.3)
    ),
    Effect(
        "vivid_colours", "colour", "Boost the saturation for vivid, punchy colours", False, lambda x: saturate(x, 1.9)
    ),
    Effect(
        "warm_tint",
        "colour",
        "Give the photo a warm golden-hour tint",
        False,
        tint((1.0, 0.9, 0.62), (0.12, 0.06, 0.0)),
    ),
    Effect(
        "cool_tint", "colour", "Give the photo a cool icy-blue tint", False, tint((0.68, 0.9, 1.0), (0.0, 0.04, 0.14))
    ),
    Effect(
        "green_tint", "colour", "Tint the whole photo an eerie green", False, tint((0.72, 1.0, 0.68), (0.0, 0.12, 0.0))
    ),
    Effect(
        "magenta_tint",
        "colour",
        "Wash the photo in a magenta-pink tint",
        False,
        tint((1.0, 0.66, 0.95), (0.12, 0.0, 0.1)),
    ),
    Effect(
        "remove_blue",
        "colour",
        "Remove the blue channel, leaving only reds, yellows and greens",
        False,
        tint((1.0, 1.0, 0.1), (0.0, 0.0, 0.0)),
    ),
    Effect(
        "duotone_navy_orange",
        "colour",
        "Render the photo as a navy-and-orange duotone poster",
        False,
        gradient([(0.05, 0.1, 0.3), (1.0, 0.6, 0.2)]),
    ),
    Effect(
        "duotone_purple_yellow",
        "colour",
        "Render the photo as a purple-and-yellow duotone",
        False,
        gradient([(0.3, 0.05, 0.4), (1.0, 0.9, 0.3)]),
    ),
    Effect(
        "cyanotype",
        "colour",
        "Make it look like a blue cyanotype blueprint print",
        False,
        gradient([(0.02, 0.15, 0.4), (0.35, 0.6, 0.85), (0.95, 0.97, 1.0)]),
    ),
    Effect(
        "thermal",
        "colour",
        "Turn the photo into a thermal camera heat map",
        False,
        gradient([(0.0, 0.0, 0.1), (0.5, 0.0, 0.6), (0.9, 0.1, 0.1), (1.0, 0.8, 0.0), (1.0, 1.0, 0.9)]),
    ),
    Effect("night_vision", "colour", "Make the photo look like a green night-vision camera feed", False, night_vision),
    Effect("pastel_wash", "colour", "Wash the photo in a soft pastel colour", True, pastel_wash),
    Effect(
        "random_duotone", "colour", "Recolour the photo as a two-tone print in a bold colour pair", True, random_duotone
    ),
    Effect("brighten", "tone", "Brighten the photo as if it were overexposed", False, lambda x: x * 1.5),
    Effect("darken", "tone", "Darken the photo as if it were underexposed", False, lambda x: x * 0.55),
    Effect("high_contrast", "tone", "Crank up the contrast", False, high_contrast),
    Effect(
        "low_contrast", "tone", "Flatten the contrast into a faded grey matte look", False, lambda x: x * 0.5 + 0.25
    ),
    Effect(
        "lift_shadows",
        "tone",
        "Lift the shadows to reveal detail in the dark areas",
        False,
        lambda x: x.clamp(0, 1) ** 0.5,
    ),
    Effect("deepen_shadows", "tone", "Deepen the shadows while keeping the highlights bright", False, lambda x: x**2),
    Effect("solarize", "tone", "Solarize the photo with psychedelic tone reversals", False, solarize),
    Effect("bleach_bypass", "tone", "Give the photo a gritty, desaturated bleach-bypass look", False, bleach_bypass),
    Effect(
        "cross_process",
        "tone",
        "Cross-process the photo for a retro film look with yellow-green highlights and blue shadows",
        False,
        curves(lambda r: (r - 0.5) * 1.5 + 0.5, lambda g: g.clamp(0, 1) ** 0.75, lambda b: b * 0.6 + 0.2),
    ),
    Effect("split_tone", "tone", "Split-tone the photo with teal shadows and orange highlights", False, split_tone),
)
