"""Vectorised pixel helpers shared by the effect modules. Images are [B, 3, H, W] in [0, 1]."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

CELL = 4  # token-sized cells: the edit model sees images as 4x4-pixel patches
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
RGB = tuple[float, float, float]


def rgb(colour: RGB | Sequence[RGB]) -> Tensor:
    """A colour as [1, 3, 1, 1], or a palette as [N, 3]."""
    table = torch.tensor(colour, dtype=torch.float32)
    return table.view(1, 3, 1, 1) if table.ndim == 1 else table


def pick(palette: Tensor, index: Tensor) -> Tensor:
    """Per-item colours [B, 3, 1, 1] from a [N, 3] palette and [B] indices."""
    return palette[index].view(-1, 3, 1, 1)


def luma(images: Tensor) -> Tensor:
    weights = torch.tensor(LUMA_WEIGHTS, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def lerp(a: Tensor, b: Tensor | float, t: Tensor | float) -> Tensor:
    return a + (b - a) * t


def saturate(images: Tensor, factor: float) -> Tensor:
    """Scale saturation around the pixel's grey value (0 = grey, 1 = unchanged)."""
    return lerp(luma(images), images, factor)


def screen(images: Tensor, light: Tensor) -> Tensor:
    """Screen blend: adds light without exceeding white."""
    return 1.0 - (1.0 - images) * (1.0 - light)


def unit_grid(images: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates in [-1, 1], each [1, 1, H, W] (y down, x right)."""
    height, width = images.shape[-2:]
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height * 2 - 1
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width * 2 - 1
    return ys.view(1, 1, -1, 1).expand(1, 1, height, width), xs.view(1, 1, 1, -1).expand(1, 1, height, width)


def pixel_grid(images: Tensor) -> tuple[Tensor, Tensor]:
    """Integer pixel coordinates, each [1, 1, H, W]."""
    height, width = images.shape[-2:]
    ys = torch.arange(height, dtype=torch.float32).view(1, 1, -1, 1).expand(1, 1, height, width)
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, 1, -1).expand(1, 1, height, width)
    return ys, xs


def radius(images: Tensor) -> Tensor:
    """Distance from the centre, 0 at the centre and 1 in the corners, [1, 1, H, W]."""
    ys, xs = unit_grid(images)
    return (ys**2 + xs**2).sqrt() / math.sqrt(2)


def smoothstep(edge0: float, edge1: float, value: Tensor) -> Tensor:
    t = ((value - edge0) / (edge1 - edge0)).clamp(0, 1)
    return t * t * (3 - 2 * t)


def blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur with reflected borders."""
    reach = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-reach, reach + 1, dtype=torch.float32)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    horizontal = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    out = F.conv2d(F.pad(images, (reach, reach, 0, 0), mode="reflect"), horizontal, groups=channels)
    return F.conv2d(F.pad(out, (0, 0, reach, reach), mode="reflect"), vertical, groups=channels)


def block_mean(images: Tensor, block: int) -> Tensor:
    """Replace each block x block tile by its mean colour (tiles aligned to the top-left corner)."""
    height, width = images.shape[-2:]
    tiles = F.adaptive_avg_pool2d(images, (math.ceil(height / block), math.ceil(width / block)))
    return upsample_blocks(tiles, block, height, width)


def upsample_blocks(tiles: Tensor, block: int, height: int, width: int) -> Tensor:
    """Nearest-neighbour upsampling of per-tile values to pixels, cropped to height x width."""
    return tiles.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[..., :height, :width]


def smooth_field(tiles: Tensor, height: int, width: int) -> Tensor:
    """Bilinear upsampling of a coarse random field: low-frequency texture."""
    return F.interpolate(tiles, size=(height, width), mode="bilinear", align_corners=False)


def gradient_map(images: Tensor, stops: Sequence[RGB]) -> Tensor:
    """Map luma through evenly spaced colour stops: duotones, heat maps, cyanotype."""
    palette = torch.tensor(stops, dtype=torch.float32)
    position = luma(images).clamp(0, 1) * (len(stops) - 1)
    low = position.floor().clamp(max=len(stops) - 2).long()
    t = position - low
    lower = palette[low.squeeze(1)].permute(0, 3, 1, 2)
    upper = palette[(low + 1).squeeze(1)].permute(0, 3, 1, 2)
    return lerp(lower, upper, t)


def border_mask(images: Tensor, top: int, right: int, bottom: int, left: int) -> Tensor:
    """1 inside the given pixel widths along each edge, [1, 1, H, W]."""
    height, width = images.shape[-2:]
    ys, xs = pixel_grid(images)
    inside = (ys >= top) & (ys < height - bottom) & (xs >= left) & (xs < width - right)
    return (~inside).float()


def discs(images: Tensor, cy: Tensor, cx: Tensor, r: Tensor) -> Tensor:
    """Anti-aliased filled discs, per item [B, K] centres and radii in pixels -> coverage [B, K, H, W]."""
    ys, xs = pixel_grid(images)
    distance = ((ys + 0.5 - cy[..., None, None]) ** 2 + (xs + 0.5 - cx[..., None, None]) ** 2).sqrt()
    return (r[..., None, None] - distance + 0.5).clamp(0, 1)


def segments(images: Tensor, start: Tensor, end: Tensor, width: float) -> Tensor:
    """Anti-aliased line segments, per item [B, K, 2] (y, x) endpoints in pixels -> coverage [B, K, H, W]."""
    ys, xs = pixel_grid(images)
    point = torch.stack((ys + 0.5, xs + 0.5), -1)  # [1, 1, H, W, 2]
    a, b = start[:, :, None, None, :], end[:, :, None, None, :]
    direction = b - a
    t = (((point - a) * direction).sum(-1) / (direction**2).sum(-1).clamp(min=1e-6)).clamp(0, 1)
    distance = (point - (a + t[..., None] * direction)).norm(dim=-1)
    return (width / 2 - distance + 0.5).clamp(0, 1)


def paint(images: Tensor, colour: Tensor, coverage: Tensor) -> Tensor:
    """Alpha-composite a colour ([B or 1, 3, ...]) over images where coverage ([B or 1, 1, H, W]) is 1."""
    return lerp(images, colour, coverage)


def hsv_to_rgb(hue: Tensor, saturation: Tensor, value: Tensor) -> Tensor:
    """Vectorised HSV -> RGB; inputs broadcast together, output stacks RGB on a new dim 1."""
    k = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, *([1] * (hue.ndim - 1)))
    h = hue.unsqueeze(1) * 6.0
    channel = (k + h) % 6.0
    weight = torch.clamp(torch.minimum(channel, 4.0 - channel), 0, 1)
    return value.unsqueeze(1) * (1 - saturation.unsqueeze(1) * weight)
