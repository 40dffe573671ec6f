"""Image decoding: EXIF orientation, every mode to RGB, limits, failures with reasons."""

from __future__ import annotations

import io
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.decode import DecodeError, DecodeOptions, decode_image


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_rgb_png_roundtrip_exact():
    arr = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = decode_image(_bytes(Image.fromarray(arr), "PNG"))
    assert out.original_size == (20, 30)
    np.testing.assert_array_equal(out.pixels, arr)


def test_exif_orientation_applied():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red, as stored
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
    out = decode_image(_bytes(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.original_size == (40, 20) and out.pixels.shape == (40, 20, 3)
    top, bottom = out.pixels[:15].mean(axis=(0, 1)), out.pixels[-15:].mean(axis=(0, 1))
    assert top[0] > 200 and bottom[0] < 60  # the red half is now on top


def test_grayscale_palette_and_alpha_on_background():
    gray = decode_image(_bytes(Image.new("L", (8, 8), 77), "PNG")).pixels
    assert gray.shape == (8, 8, 3) and (gray == 77).all()

    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    out = decode_image(_bytes(rgba, "PNG"), DecodeOptions(background=(0, 128, 0))).pixels
    assert tuple(out[0, 0]) == (0, 0, 255) and tuple(out[5, 5]) == (0, 128, 0)

    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.info["transparency"] = 0
    pal.putpixel((0, 0), 0)
    out = decode_image(_bytes(pal, "PNG", transparency=0), DecodeOptions(background=(255, 255, 255))).pixels
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[3, 3]) == (200, 100, 50)

    la = Image.new("LA", (4, 4), (100, 0))
    assert tuple(decode_image(_bytes(la, "PNG"), DecodeOptions(background=(1, 2, 3))).pixels[1, 1]) == (1, 2, 3)


def test_sixteen_bit_is_scaled_not_clipped():
    arr = np.array([[0, 257 * 100, 65535, 32768]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I")
    out = decode_image(_bytes(img, "PNG")).pixels
    assert out.shape == (1, 4, 3)
    assert list(out[0, :, 0]) == [0, 100, 255, 128]


def test_cmyk_jpeg():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(_bytes(cmyk, "JPEG", quality=95)).pixels
    r, g, b = out.reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60


def test_draft_mode_decodes_large_jpeg_smaller_but_covering():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (800, 1200, 3), dtype=np.uint8))
    data = _bytes(img, "JPEG", quality=80)
    out = decode_image(data, needed_size=lambda size: (100, 150))
    assert out.original_size == (800, 1200)
    assert 100 <= out.pixels.shape[0] < 800 and out.pixels.shape[1] >= 150
    full = decode_image(data)
    assert full.pixels.shape == (800, 1200, 3)


def test_limits_and_failures():
    small = _bytes(Image.new("RGB", (10, 30)), "PNG")
    with pytest.raises(DecodeError) as e:
        decode_image(small, DecodeOptions(min_size=16))
    assert e.value.reason == "too_small"
    assert decode_image(small, DecodeOptions(min_size=10)).pixels.shape == (30, 10, 3)

    big = _bytes(Image.new("RGB", (200, 200)), "PNG")
    with pytest.raises(DecodeError) as e:
        decode_image(big, DecodeOptions(max_pixels=39_999))
    assert e.value.reason == "too_large"

    with pytest.raises(DecodeError) as e:
        decode_image(b"definitely not an image")
    assert e.value.reason == "not_an_image"

    jpeg = _bytes(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")
    with pytest.raises(DecodeError) as e:
        decode_image(jpeg[: len(jpeg) // 2])
    assert e.value.reason == "corrupt"


def test_pixel_limit_is_per_call_and_leaves_pillow_and_warnings_alone(monkeypatch):
    # A small Pillow limit stands in for huge images: 40x40 is above it (Pillow warns), 50x50 above
    # twice it (Pillow refuses).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    warned, refused = _bytes(Image.new("RGB", (40, 40)), "PNG"), _bytes(Image.new("RGB", (50, 50)), "PNG")
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert decode_image(warned, DecodeOptions(max_pixels=10_000)).pixels.shape == (40, 40, 3)
        for data, limit in ((warned, 1500), (refused, 10_000)):
            with pytest.raises(DecodeError) as e:
                decode_image(data, DecodeOptions(max_pixels=limit))
            assert e.value.reason == "too_large"
    assert not caught
    assert Image.MAX_IMAGE_PIXELS == 1000 and warnings.filters == filters


def test_import_changes_no_process_state():
    script = (
        "import io, warnings\n"
        "import numpy\n"  # numpy installs filters of its own on import
        "from PIL import Image\n"
        "limit, filters = Image.MAX_IMAGE_PIXELS, list(warnings.filters)\n"
        "from pipeline.decode import DecodeOptions, decode_image\n"
        "buf = io.BytesIO(); Image.new('RGB', (8, 8)).save(buf, 'PNG')\n"
        "decode_image(buf.getvalue(), DecodeOptions(max_pixels=3 * limit))\n"
        "assert Image.MAX_IMAGE_PIXELS == limit, Image.MAX_IMAGE_PIXELS\n"
        "assert warnings.filters == filters\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).resolve().parents[1])
