"""Image I/O and conversions. Images are float32 tensors in [0, 1], shaped [3, H, W] or [B, 3, H, W]."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from collectionlora.errors import BankError
from collectionlora.lorafile import atomic_write


def to_pil(image: torch.Tensor) -> Image.Image:
    """A [3, H, W] tensor in [0, 1] as an RGB PIL image."""
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round()
    return Image.fromarray(array.astype(np.uint8), mode="RGB")


def from_pil(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a [3, H, W] float tensor in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def quantize(image: torch.Tensor) -> torch.Tensor:
    """Round to 8-bit levels, so that an in-memory image equals what its PNG will reload as."""
    return (image.clamp(0, 1) * 255.0).round() / 255.0


def save_png(image: torch.Tensor, path: Path) -> None:
    """Whole or absent (lorafile.atomic_write): a killed stage never leaves half a PNG to be read back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = encode_png(image)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def load_png(path: Path, size: int | None = None) -> torch.Tensor:
    """Load an RGB PNG strictly: a corrupt file or a wrong mode or size is a BankError naming the file.

    Format, mode and size come from the header (Pillow's lazy open) and are checked before any pixel is
    decoded, so a header claiming 100000x100000 costs nothing; Pillow's decompression-bomb warning is an
    error here, for the same reason when no size is asked for."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            handle = Image.open(path, formats=["PNG"])
        with handle:
            if handle.mode != "RGB":
                raise BankError(f"{path}: expected mode RGB, got {handle.mode}")
            if size is not None and handle.size != (size, size):
                raise BankError(f"{path}: expected size {size}x{size}, got {handle.size[0]}x{handle.size[1]} (refused before decoding)")
            handle.load()
            return from_pil(handle)
    except BankError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BankError(f"{path}: image refused before decoding ({' '.join(str(error).split())})") from error
    except (OSError, ValueError, SyntaxError) as error:
        raise BankError(f"{path}: unreadable image ({' '.join(str(error).split())})") from error


def load_image_fitted(path: Path, size: int) -> torch.Tensor:
    """Any RGB-convertible image file, centre-cropped to a square and resized to size x size (user inputs)."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise BankError(f"{path}: unreadable image ({error.strerror})") from error
    return decode_image_fitted(data, size, str(path))


def decode_image_fitted(data: bytes, size: int, name: str) -> torch.Tensor:
    """Encoded image bytes (PNG, JPEG, ...) as `load_image_fitted` would load them; `name` goes in errors.
    A header claiming more pixels than Pillow's decompression-bomb limit is refused before decoding (as
    `load_png` does), so a user's 100000x100000 upload costs nothing and prints no Pillow warning."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            handle = Image.open(io.BytesIO(data))
        with handle:
            image = handle.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BankError(f"{name}: image refused before decoding ({' '.join(str(error).split())})") from error
    except UnidentifiedImageError as error:
        raise BankError(f"{name}: unreadable image (not an image format Pillow knows)") from error
    except (OSError, ValueError, SyntaxError) as error:
        raise BankError(f"{name}: unreadable image ({' '.join(str(error).split())})") from error
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return from_pil(image)


def encode_png(image: torch.Tensor) -> bytes:
    """A [3, H, W] tensor as PNG bytes, exactly what `save_png` writes."""
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()


def grid(rows: list[list[torch.Tensor]], pad: int = 2, scale: int = 1) -> torch.Tensor:
    """Tile equally sized [3, H, W] images row by row with a white gap, each enlarged `scale` times
    (nearest neighbour, so 32x32 edits stay readable and unsmoothed)."""
    rows = [[image.repeat_interleave(scale, -1).repeat_interleave(scale, -2) for image in row] for row in rows]
    height, width = rows[0][0].shape[-2:]
    columns = max(len(r) for r in rows)
    canvas = torch.ones(3, len(rows) * (height + pad) + pad, columns * (width + pad) + pad)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            top, left = pad + i * (height + pad), pad + j * (width + pad)
            canvas[:, top : top + height, left : left + width] = image.clamp(0, 1)
    return canvas


def labelled_grid(rows: list[list[torch.Tensor]], row_labels: list[str], column_labels: list[str], pad: int = 2, scale: int = 1) -> torch.Tensor:
    """`grid` with a label left of each row and above each column (Pillow's built-in bitmap font, the same
    pixels everywhere), so that a figure says what each tile is. A label wider than its column is cut."""
    if len(row_labels) != len(rows) or len(column_labels) != max(len(r) for r in rows):
        raise ValueError(f"labelled_grid: {len(row_labels)} row and {len(column_labels)} column labels for a {len(rows)}-row grid")
    body = to_pil(grid(rows, pad, scale))
    tile_height, tile_width = (side * scale for side in rows[0][0].shape[-2:])
    font = ImageFont.load_default_imagefont()
    draw = ImageDraw.Draw(body)

    def width(text: str) -> int:
        return int(draw.textlength(text, font=font))

    def fitted(text: str) -> str:
        while text and width(text) > tile_width:
            text = text[:-3] + ".." if len(text) > 3 else ""
        return text

    line = max(font.getbbox(text)[3] for text in [*row_labels, *column_labels, "Ag"])
    left, top = max(width(text) for text in row_labels) + 2 * pad, line + 2 * pad
    canvas = Image.new("RGB", (body.width + left, body.height + top), "white")
    canvas.paste(body, (left, top))
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(column_labels):
        text = fitted(text)
        draw.text((left + pad + j * (tile_width + pad) + (tile_width - width(text)) // 2, pad), text, fill="black", font=font)
    for i, text in enumerate(row_labels):
        draw.text((pad, top + pad + i * (tile_height + pad) + (tile_height - line) // 2), text, fill="black", font=font)
    return from_pil(canvas)
