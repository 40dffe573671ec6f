"""Resize + crop policy, buckets and recorded micro-conditioning."""

from __future__ import annotations

import numpy as np

from pipeline.config import PreprocessConfig
from pipeline.decode import DecodedImage
from pipeline.preprocess import Preprocessor, nearest_bucket


def _image(h: int, w: int, original: tuple[int, int] | None = None) -> DecodedImage:
    y, x = np.mgrid[0:h, 0:w]
    pixels = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), np.full_like(x, 128)], -1).astype(np.uint8)
    return DecodedImage(pixels=pixels, original_size=original or (h, w))


def test_center_crop_of_landscape():
    out = Preprocessor([(64, 64)])(_image(100, 200), "k")
    assert out.pixels.shape == (64, 64, 3) and out.pixels.dtype == np.uint8
    assert out.original_size == (100, 200) and out.target_size == (64, 64)
    assert out.crop_top_left == (0, 32)  # resized to 64x128, centred
    assert out.bucket == "64x64"


def test_random_crop_is_seeded_per_key():
    pre = Preprocessor([(32, 32)], crop="random", seed=7)
    img = _image(40, 160)
    a, b = pre(img, "key-a"), pre(img, "key-b")
    assert pre(img, "key-a").crop_top_left == a.crop_top_left  # same key, same crop
    assert a.crop_top_left[0] == 0 and 0 <= a.crop_top_left[1] <= 128 - 32
    assert {pre(img, f"k{i}").crop_top_left for i in range(20)} != {a.crop_top_left}  # keys differ
    other_seed = Preprocessor([(32, 32)], crop="random", seed=8)
    assert any(other_seed(img, f"k{i}").crop_top_left != pre(img, f"k{i}").crop_top_left for i in range(10))
    np.testing.assert_array_equal(a.pixels, pre(img, "key-a").pixels)
    assert b.pixels.shape == (32, 32, 3)


def test_buckets_pick_nearest_aspect():
    buckets = [(64, 64), (48, 80), (80, 48)]
    assert nearest_bucket((100, 170), buckets) == (48, 80)
    assert nearest_bucket((170, 100), buckets) == (80, 48)
    assert nearest_bucket((100, 110), buckets) == (64, 64)
    pre = Preprocessor.from_config(PreprocessConfig(buckets=[list(b) for b in buckets]))
    out = pre(_image(90, 160), "k")
    assert out.target_size == (48, 80) and out.pixels.shape == (48, 80, 3) and out.bucket == "48x80"


def test_drafted_input_is_resized_from_original_geometry():
    pre = Preprocessor([(64, 64)])
    # the decoder delivered a 1/4-scale draft of a 400x800 image
    out = pre(_image(100, 200, original=(400, 800)), "k")
    assert pre.resized_size((400, 800)) == (64, 128)
    assert out.original_size == (400, 800) and out.crop_top_left == (0, 32) and out.pixels.shape == (64, 64, 3)


def test_small_images_are_upscaled_to_cover():
    out = Preprocessor([(64, 96)])(_image(10, 10), "k")
    assert out.pixels.shape == (64, 96, 3) and out.crop_top_left == (16, 0)


def test_crop_box_resampling_matches_resize_then_crop():
    # Resampling only the crop's box is resize-then-crop up to rounding at a few pixels.
    from conftest import sample_photos
    from PIL import Image

    pre = Preprocessor([(96, 96)], crop="random", seed=3)
    for i, (_, photo) in enumerate(sample_photos(count=4)):
        pixels = np.asarray(photo.convert("RGB").resize((150 + 10 * i, 120)))
        out = pre(DecodedImage(pixels=pixels, original_size=pixels.shape[:2]), f"k{i}")
        rh, rw = pre.resized_size(pixels.shape[:2])
        full = np.asarray(Image.fromarray(pixels).resize((rw, rh), Image.Resampling.LANCZOS))
        top, left = out.crop_top_left
        reference = full[top : top + 96, left : left + 96].astype(int)
        diff = np.abs(out.pixels.astype(int) - reference)
        assert out.pixels.shape == (96, 96, 3) and diff.max() <= 16
        assert (diff > 1).mean() < 0.002 and diff.mean() < 0.01
