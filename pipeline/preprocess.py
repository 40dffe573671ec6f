"""Resize and crop decoded images to the encoder's input size.

Policy (the one SD/SDXL training uses):

1. choose the target (height, width): the fixed `preprocess.resolution`, or, with
   `preprocess.buckets`, the bucket whose aspect ratio is nearest the image's (compared on a log
   scale, so 1:2 and 2:1 are equally far from 1:1; ties go to the earlier bucket);
2. resize so the image covers the target with the least scaling (the shorter side relative to
   the target is matched), with Lanczos filtering;
3. crop the target out of the resized image: centred, or at a random offset drawn from a
   generator seeded by (`preprocess.seed`, sample key), so the crop of a key is the same on
   every run, worker and machine.

An image that step 2 would enlarge more than `max_upscale` times (`preprocess.max_upscale`, 4 by
default) is refused as ``too_small``: an 8x8 icon blown up to 128 px is a blur, not a training
image, and its latent would be stored as if it were one.

Steps 2 and 3 run as one resampling of just the crop's box (Pillow's `resize(box=...)`): the
same filter over the same geometry, without computing the pixels the crop would discard (a
quarter of the work for a 4:3 photo to a square). It matches resize-then-crop except for a few
pixels per image that differ by rounding.

Each result records the SDXL micro-conditioning values: the original size (before resizing),
the crop's top-left corner in resized coordinates, and the target size.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .config import PreprocessConfig
from .decode import DecodedImage

__all__ = ["Preprocessed", "Preprocessor", "PreprocessError", "nearest_bucket"]


class PreprocessError(ValueError):
    """A decoded image cannot be brought to the target size; `reason` is the ledger code."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


@dataclass
class Preprocessed:
    """Encoder-ready pixels and their micro-conditioning."""

    #: uint8 [target_h, target_w, 3]
    pixels: np.ndarray
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]

    @property
    def bucket(self) -> str:
        """The bucket label "HxW"."""
        return f"{self.target_size[0]}x{self.target_size[1]}"


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio (w/h) is nearest that of `size`, on a log scale."""
    h, w = size
    aspect = math.log(w / h)
    best = min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][1] / buckets[i][0]) - aspect), i))
    return buckets[best]


class Preprocessor:
    """Maps a decoded image and its key to encoder-ready pixels (see the module docstring)."""

    def __init__(self, sizes: list[tuple[int, int]], crop: str = "center", seed: int = 0,
                 max_upscale: float | None = None):
        """`max_upscale`: the largest resize factor allowed (None: no limit)."""
        if not sizes:
            raise ValueError("at least one target size is needed")
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        self.sizes = [(int(h), int(w)) for h, w in sizes]
        self.crop = crop
        self.seed = seed
        self.max_upscale = max_upscale

    @classmethod
    def from_config(cls, config: PreprocessConfig) -> Preprocessor:
        return cls(config.target_sizes(), crop=config.crop, seed=config.seed, max_upscale=config.max_upscale)

    def target_for(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """Target (height, width) of an image of `original_size`."""
        if len(self.sizes) == 1:
            return self.sizes[0]
        return nearest_bucket(original_size, self.sizes)

    def resized_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(height, width) the image is resized to before cropping: just covers the target."""
        h, w = original_size
        th, tw = self.target_for(original_size)
        scale = max(th / h, tw / w)
        # round() keeps the matched side exactly on target despite float error; max() keeps cover.
        return max(th, round(h * scale)), max(tw, round(w * scale))

    def crop_offset(self, key: str, resized: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
        """Top-left corner of the crop in resized coordinates."""
        slack_h, slack_w = resized[0] - target[0], resized[1] - target[1]
        if self.crop == "center":
            return slack_h // 2, slack_w // 2
        digest = hashlib.sha256(f"{self.seed}\0{key}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        return rng.randint(0, slack_h), rng.randint(0, slack_w)

    def __call__(self, image: DecodedImage, key: str) -> Preprocessed:
        original = image.original_size
        if min(original) <= 0:
            raise PreprocessError("corrupt", f"image of size {original}")
        target = self.target_for(original)
        scale = max(target[0] / original[0], target[1] / original[1])
        if self.max_upscale is not None and scale > self.max_upscale:
            raise PreprocessError(
                "too_small",
                f"{original[0]}x{original[1]} (HxW) would be upscaled {scale:.3g}x to cover {target[0]}x{target[1]}, "
                f"more than preprocess.max_upscale {self.max_upscale:g}",
            )
        resized = self.resized_size(original)
        pixels = image.pixels
        top, left = self.crop_offset(key, resized, target)
        if pixels.shape[:2] != resized:
            # Resample only the crop: the same Lanczos filter over the same geometry as resizing
            # the whole image and cropping (taps outside the box are still read), without
            # computing the pixels the crop throws away.
            sy, sx = pixels.shape[0] / resized[0], pixels.shape[1] / resized[1]
            box = (left * sx, top * sy, (left + target[1]) * sx, (top + target[0]) * sy)
            pil = Image.fromarray(pixels, "RGB")
            out = np.asarray(pil.resize((target[1], target[0]), Image.Resampling.LANCZOS, box=box))
        else:
            out = pixels[top : top + target[0], left : left + target[1]]
        out = np.ascontiguousarray(out)
        return Preprocessed(pixels=out, original_size=original, crop_top_left=(top, left), target_size=target)
