"""Reading any accepted image file as 8-bit RGB, with clear errors for bad files."""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
from PIL import Image, UnidentifiedImageError

from qrs.errors import QrsError
from qrs.files import file_problem, printable

MAX_PIXELS = 50_000_000
"""Images larger than this are refused as possible decompression bombs."""


class ImageError(QrsError, ValueError):
    """An image file that cannot be used, with the reason as its message."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow image (1/L/P/RGB/RGBA/I;16/I/F) to 8-bit RGB, staying in Pillow for 8-bit modes."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 65535.0 * 255.0
        elif img.mode == "I":
            arr = arr / (65535.0 if arr.max(initial=0) > 255 else 255.0) * 255.0
        else:
            lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "RGBA" or img.mode == "LA" or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img if img.mode == "RGB" else img.convert("RGB")


@contextmanager
def _readable_errors() -> Iterator[None]:
    """Turn what Pillow raises while opening or decoding a file into :class:`ImageError` with the reason."""
    try:
        yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image is too large (possible decompression bomb): {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError("not an image file (Pillow cannot identify it)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"unreadable or truncated image: {exc}") from exc


def _check_file(path: str | os.PathLike[str]) -> None:
    """Raise :class:`ImageError` unless ``path`` is a regular file: a FIFO or a device is never opened."""
    problem = file_problem(path)
    if problem:
        raise ImageError(f"{problem}: {printable(path)}")


def _open(source: str | os.PathLike[str] | bytes, max_pixels: int) -> Image.Image:
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    with warnings.catch_warnings(), _readable_errors():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(fp) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(
                    f"image is {w}x{h} = {w * h / 1e6:.1f} megapixels, over the limit of "
                    f"{max_pixels / 1e6:.0f} (possible decompression bomb)"
                )
            img.load()
            return _to_rgb(img)


def open_rgb(source: str | os.PathLike[str] | bytes, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read a file path or encoded bytes as a loaded 8-bit RGB Pillow image.

    Grayscale, RGB, RGBA (composited on black), palette and 16-bit inputs are accepted.
    Raises :class:`ImageError` with a human-readable reason for anything else. Callers resize the
    result in Pillow (``np.asarray`` gives an array): a full-size numpy copy costs a tenth of the decode.
    """
    if not isinstance(source, bytes):
        _check_file(source)
    return _open(source, max_pixels)


_FOREGROUND_LUT = [0] + [255] * 255


def open_mask(path: str | os.PathLike[str]) -> Image.Image:
    """Read a mask file as an ``L`` image with 255 where any channel is non-zero and 0 elsewhere.

    8-bit grayscale and bilevel masks (the usual kinds) are mapped with a lookup table in Pillow;
    16-bit, colour and palette masks go through numpy. ``getbbox()`` of the result is ``None``
    exactly when the mask is empty.
    """
    _check_file(path)
    with _readable_errors(), Image.open(path) as img:
        if img.width * img.height > MAX_PIXELS:
            raise ImageError(f"mask is {img.width}x{img.height}, over the {MAX_PIXELS / 1e6:.0f} megapixel limit")
        if img.mode in ("1", "L"):
            gray = img if img.mode == "L" else img.convert("L")
            return gray if gray.getbbox() is None else gray.point(_FOREGROUND_LUT)
        arr = np.asarray(img.convert("RGB") if img.mode == "P" else img)
    if arr.ndim == 3:
        arr = arr[:, :, :3].max(axis=2)
    return Image.fromarray(np.where(arr > 0, 255, 0).astype(np.uint8))


Size = tuple[int, int]
"""An image size as (height, width) in pixels, torch's order (B x C x H x W)."""
MIN_SIDE = 16
MAX_SIDE = 8192
"""Bounds of a prepared image's height and width (a model input): below 16 px no backbone has a map
left, above 8192 px one image alone would fill a machine's memory in training."""


def as_size(size: int | Sequence[int]) -> Size:
    """(height, width) from one side (a square, as metadata of older versions stores it) or a pair."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        return int(size), int(size)
    if isinstance(size, Sequence) and not isinstance(size, str) and len(size) in (1, 2):
        values = [int(v) for v in size]
        return (values[0], values[-1])
    raise ValueError(f"an image size is one side or a (height, width) pair, got {size!r}")


def check_size(size: int | Sequence[int], option: str = "--img-size") -> Size:
    """:func:`as_size`, with both sides in [MIN_SIDE, MAX_SIDE]; a QrsError naming ``option`` otherwise."""
    try:
        height, width = as_size(size)
    except (TypeError, ValueError) as exc:
        raise QrsError(f"{option}: {exc}") from exc
    if not (MIN_SIDE <= height <= MAX_SIDE and MIN_SIDE <= width <= MAX_SIDE):
        raise QrsError(f"{option} {height} {width}: height and width must be between {MIN_SIDE} and {MAX_SIDE} px")
    return height, width


def size_text(size: int | Sequence[int]) -> str:
    """``224x224``-style text of a size, height first (as ``--img-size H W`` takes it)."""
    height, width = as_size(size)
    return f"{height}x{width}"


def pad_geometry(width: int, height: int, size: int | Sequence[int]) -> tuple[float, float, float]:
    """Scale and offsets (scale, off_x, off_y) of the ``pad`` resize of a ``width`` x ``height`` image
    into ``size`` (one side, or (height, width)): scaled to fit, centred."""
    out_h, out_w = as_size(size)
    scale = min(out_w / width, out_h / height)
    return scale, (out_w - width * scale) / 2.0, (out_h - height * scale) / 2.0


def resize_image(image: np.ndarray | Image.Image, size: int | Sequence[int], mode: str, *,
                 nearest: bool = False) -> np.ndarray:
    """Resize an image (HxWxC or HxW uint8 array, or a Pillow image) to a ``size`` (one side, or
    (height, width)) uint8 array by ``stretch`` or ``pad`` (fit inside, centred on black)."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    out_h, out_w = as_size(size)
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    if mode == "stretch":
        return np.asarray(img.resize((out_w, out_h), resample))
    width, height = img.size
    scale, off_x, off_y = pad_geometry(width, height, (out_h, out_w))
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    canvas = Image.new(img.mode, (out_w, out_h), 0)
    canvas.paste(img.resize((new_w, new_h), resample), (round(off_x), round(off_y)))
    return np.asarray(canvas)


def _png_chunk(kind: bytes, data: bytes) -> list[bytes]:
    return [struct.pack(">I", len(data)), kind, data, struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))]


def encode_png(array: np.ndarray, *, compress_level: int = 0) -> bytes:
    """Encode an HxW (gray) or HxWx3 (RGB) uint8 array as PNG with no row filters.

    Why not Pillow: its encoder tries adaptive row filters, which costs as much as decoding the
    source image; ``qrs prepare`` writes thousands of small images, and level 0 (stored) with no
    filter is about six times faster. The files are ordinary PNGs that any reader opens.
    """
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ValueError(f"encode_png needs an HxW or HxWx3 uint8 array, got {array.dtype} {array.shape}")
    h, w = array.shape[:2]
    rows = np.zeros((h, 1 + array[0].size), dtype=np.uint8)
    rows[:, 1:] = array.reshape(h, -1)
    header = struct.pack(">IIBBBBB", w, h, 8, 0 if array.ndim == 2 else 2, 0, 0, 0)
    return b"".join([b"\x89PNG\r\n\x1a\n", *_png_chunk(b"IHDR", header),
                     *_png_chunk(b"IDAT", zlib.compress(rows.data, compress_level)), *_png_chunk(b"IEND", b"")])
