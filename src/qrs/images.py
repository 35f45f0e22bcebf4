"""Reading any accepted image file as 8-bit RGB, with clear errors for bad files."""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from qrs.errors import QrsError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_PIXELS = 50_000_000
"""Images larger than this are refused as possible decompression bombs."""


class ImageError(QrsError, ValueError):
    """An image file that cannot be used, with the reason as its message."""


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when the file name has one of the accepted image extensions."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _to_rgb8(img: Image.Image) -> np.ndarray:
    """Convert any Pillow image (1/L/P/RGB/RGBA/I;16/I/F) to an HxWx3 uint8 array."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 65535.0 * 255.0
        elif img.mode == "I":
            arr = arr / (65535.0 if arr.max(initial=0) > 255 else 255.0) * 255.0
        else:
            lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "RGBA" or img.mode == "LA" or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)


def _open(source: str | os.PathLike[str] | bytes, max_pixels: int) -> np.ndarray:
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(fp) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageError(
                        f"image is {w}x{h} = {w * h / 1e6:.1f} megapixels, over the limit of "
                        f"{max_pixels / 1e6:.0f} (possible decompression bomb)"
                    )
                img.load()
                return _to_rgb8(img)
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"image is too large (possible decompression bomb): {exc}") from exc
        except UnidentifiedImageError as exc:
            raise ImageError("not an image file (Pillow cannot identify it)") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"unreadable or truncated image: {exc}") from exc


def read_rgb(source: str | os.PathLike[str] | bytes, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read a file path or encoded bytes as an HxWx3 uint8 RGB array.

    Grayscale, RGB, RGBA (composited on black), palette and 16-bit inputs are accepted.
    Raises :class:`ImageError` with a human-readable reason for anything else.
    """
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise ImageError(f"no such file: {source}")
    return _open(source, max_pixels)


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a mask file as an HxW boolean array (any non-zero pixel is foreground).

    8/16-bit grayscale and bilevel masks are read as they are (no RGB conversion: masks are many);
    colour and palette masks count a pixel as foreground when any channel is non-zero.
    """
    if not Path(path).is_file():
        raise ImageError(f"no such file: {path}")
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"mask is {img.width}x{img.height}, over the {MAX_PIXELS / 1e6:.0f} megapixel limit")
            if img.mode == "P":
                img = img.convert("RGB")
            arr = np.asarray(img)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError("not an image file (Pillow cannot identify it)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"unreadable or truncated image: {exc}") from exc
    if arr.ndim == 3:
        arr = arr[:, :, :3].max(axis=2)
    return arr > 0


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
