"""Reading images of every accepted kind, refusing bad ones, and the PNG writer."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qrs.images import ImageError, encode_png, open_mask, open_rgb


def test_encode_png_round_trips_through_pillow() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (5, 9), dtype=np.uint8)
    for array, level in ((rgb, 0), (rgb, 6), (gray, 1)):
        with Image.open(io.BytesIO(encode_png(array, compress_level=level))) as img:
            assert img.mode == ("RGB" if array.ndim == 3 else "L")
            assert np.array_equal(np.asarray(img), array)
    with pytest.raises(ValueError, match="HxW or HxWx3 uint8"):
        encode_png(rgb.astype(np.float32))


def test_open_rgb_composites_alpha_on_black_and_scales_16_bit(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[0, 0, 3] = 255
    rgba[1, 1, 3] = 128
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out = np.asarray(open_rgb(tmp_path / "a.png"))
    assert out[0, 0].tolist() == [200, 200, 200] and out[0, 1].tolist() == [0, 0, 0]
    assert abs(int(out[1, 1, 0]) - 100) <= 1
    Image.fromarray(np.array([[0, 65535]], np.uint16)).save(tmp_path / "g16.png")
    assert np.asarray(open_rgb(tmp_path / "g16.png")).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    assert np.asarray(open_rgb((tmp_path / "a.png").read_bytes())).shape == (2, 2, 3)


def test_bad_files_raise_readable_errors(tmp_path: Path) -> None:
    (tmp_path / "text.png").write_text("hello")
    good = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(good, format="PNG")
    (tmp_path / "cut.png").write_bytes(good.getvalue()[:60])
    with pytest.raises(ImageError, match="not an image file"):
        open_rgb(tmp_path / "text.png")
    with pytest.raises(ImageError, match="unreadable or truncated"):
        open_rgb(tmp_path / "cut.png")
    with pytest.raises(ImageError, match="no such file"):
        open_rgb(tmp_path / "missing.png")
    with pytest.raises(ImageError, match=r"64x64 = 0.0 megapixels, over the limit"):
        open_rgb(good.getvalue(), max_pixels=100)


def test_open_mask_any_nonzero_is_foreground(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 1], [0, 255]], np.uint8)).save(tmp_path / "m.png")
    Image.fromarray(np.array([[0, 300], [0, 0]], np.uint16)).save(tmp_path / "m16.png")
    Image.fromarray(np.array([[[0, 0, 1], [0, 0, 0]]], np.uint8)).save(tmp_path / "rgb.png")
    Image.fromarray(np.array([[True, False]])).save(tmp_path / "bilevel.png")
    Image.fromarray(np.zeros((3, 4), np.uint8)).save(tmp_path / "empty.png")
    for name, want in (("m.png", [[0, 255], [0, 255]]), ("m16.png", [[0, 255], [0, 0]]), ("rgb.png", [[255, 0]]),
                       ("bilevel.png", [[255, 0]])):
        mask = open_mask(tmp_path / name)
        assert mask.mode == "L" and np.asarray(mask).tolist() == want, name
    assert open_mask(tmp_path / "m.png").getbbox() == (1, 0, 2, 2)
    assert open_mask(tmp_path / "empty.png").getbbox() is None
    with pytest.raises(ImageError, match="no such file"):
        open_mask(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("hello")
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 2, (64, 64), dtype=np.uint8) * 255).save(big, format="PNG")
    (tmp_path / "cut.png").write_bytes(big.getvalue()[:100])
    with pytest.raises(ImageError, match="not an image file"):
        open_mask(tmp_path / "text.png")
    with pytest.raises(ImageError, match="unreadable or truncated"):
        open_mask(tmp_path / "cut.png")
