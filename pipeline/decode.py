"""Image bytes -> RGB uint8 pixels, with every Pillow mode converted on purpose.

* EXIF orientation is applied, so the pixels are the way a viewer shows the photo; the recorded
  original size is the oriented one.
* JPEG draft mode: when the caller says how large the image must be after decoding (the resize
  target), the JPEG is decoded at 1/2, 1/4 or 1/8 scale directly in the IDCT whenever that still
  covers the target. This is the largest CPU saving for large photos.
* Modes: L/1/YCbCr/LAB/HSV/P are converted to RGB; CMYK uses the embedded ICC profile when there
  is one (a naive CMYK->RGB formula shifts colours); 16-bit integer images (I;16*, I) are scaled
  0..65535 -> 0..255 (not clipped); float images (F) are taken as 0..1 when their maximum is at
  most 1, else as 0..255; anything with alpha (RGBA, LA, PA, premultiplied, palette or RGB with a
  transparency key) is composited onto `background`.
* Limits: more than `max_pixels` pixels -> ``too_large`` (decompression bombs are refused from
  the header, before decoding); shorter side below `min_size` -> ``too_small``. The limit is this
  call's own: Pillow's process-wide `PIL.Image.MAX_IMAGE_PIXELS` and the warning filters are left
  as they are, so importing this module changes nothing for the rest of the process (a training
  job, a notebook). Pillow still refuses images above twice its own limit (179 million pixels by
  default) before any caller's limit applies; they become ``too_large`` too.

Every failure raises `DecodeError` with a short machine-readable `reason` (corrupt,
not_an_image, too_large, too_small, unsupported_mode) for the ledger.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["DecodeError", "DecodeOptions", "DecodedImage", "decode_image", "draft_size", "to_rgb"]

# `warnings.catch_warnings` edits the process's filter list while it is open and restores it on
# exit; decode threads entering and leaving it interleaved would restore each other's edits and
# leave a filter behind. Opening (reading the header) is short, so one lock costs little.
_OPEN_LOCK = threading.Lock()

_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}


class DecodeError(ValueError):
    """An image that cannot be used; `reason` is the ledger's error code."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True)
class DecodeOptions:
    """Decode limits and the background for transparent pixels."""

    background: tuple[int, int, int] = (255, 255, 255)
    max_pixels: int = 89_478_485
    min_size: int = 0


@dataclass
class DecodedImage:
    """Decoded RGB pixels and the image's size before any reduction."""

    #: uint8 [H, W, 3]; smaller than `original_size` when JPEG draft mode reduced it.
    pixels: np.ndarray
    #: (height, width) after EXIF orientation, at full resolution.
    original_size: tuple[int, int]


def decode_image(
    data: bytes,
    options: DecodeOptions = DecodeOptions(),
    *,
    needed_size: Callable[[tuple[int, int]], tuple[int, int]] | None = None,
) -> DecodedImage:
    """Decode `data` into RGB pixels.

    `needed_size` maps the oriented original (height, width) to the smallest (height, width)
    the caller will resize to; JPEGs are then decoded at a reduced scale that still covers it.
    """
    try:
        img = _open(data)
    except Image.DecompressionBombError as e:
        raise DecodeError("too_large", str(e)) from None
    except UnidentifiedImageError:
        raise DecodeError("not_an_image", "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DecodeError("corrupt", f"cannot open image: {e}") from None

    with img:
        width, height = img.size
        if width * height > options.max_pixels:
            raise DecodeError("too_large", f"{width}x{height} = {width * height} pixels > max_pixels {options.max_pixels}")
        if width == 0 or height == 0:
            raise DecodeError("corrupt", f"empty image {width}x{height}")
        orientation = _orientation(img)
        swapped = orientation in _SWAPS_AXES
        original = (width, height) if swapped else (height, width)
        if min(original) < options.min_size:
            raise DecodeError("too_small", f"{original[0]}x{original[1]} (HxW) is below min_size {options.min_size}")

        if needed_size is not None:
            _draft(img, original, swapped, needed_size)
        try:
            img.load()
        except Image.DecompressionBombError as e:
            raise DecodeError("too_large", str(e)) from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise DecodeError("corrupt", f"cannot decode image: {e}") from None

        if orientation != 1:
            try:
                img = ImageOps.exif_transpose(img)
            except (OSError, ValueError, KeyError):
                pass  # a broken EXIF block: keep the stored orientation
        rgb = to_rgb(img, options.background)
        pixels = np.asarray(rgb, dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise DecodeError("unsupported_mode", f"unexpected pixel array shape {pixels.shape}")
    return DecodedImage(pixels=np.ascontiguousarray(pixels), original_size=original)


def _draft(img: Image.Image, original: tuple[int, int], swapped: bool,
           needed_size: Callable[[tuple[int, int]], tuple[int, int]]) -> None:
    """Ask a JPEG's decoder for the largest reduction that still covers `needed_size(original)`."""
    if img.format != "JPEG":
        return
    need_h, need_w = needed_size(original)
    raw_w, raw_h = (need_h, need_w) if swapped else (need_w, need_h)
    try:
        img.draft(img.mode, (max(1, raw_w), max(1, raw_h)))
    except (OSError, ValueError):
        pass  # draft is an optimisation only


def draft_size(data: bytes, needed_size: Callable[[tuple[int, int]], tuple[int, int]]) -> tuple[int, int] | None:
    """The (width, height) `decode_image(data, needed_size=needed_size)` decodes a JPEG at (its
    draft reduction), from the header alone; None for other formats and unreadable headers.

    Two callers whose sizes give the same answer get the same pixels from one decode (several
    outputs of one read, `pipeline.decodepool.prepare_all`).
    """
    try:
        img = _open(data)
    except Exception:  # the decode proper reports what is wrong with the image
        return None
    with img:
        width, height = img.size
        if img.format != "JPEG" or not width or not height:
            return None
        swapped = _orientation(img) in _SWAPS_AXES
        _draft(img, (width, height) if swapped else (height, width), swapped, needed_size)
        return img.size


def _open(data: bytes) -> Image.Image:
    """`Image.open` (header only) without Pillow's warning for images above its own pixel limit:
    the caller checks `max_pixels` from the header size right after."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # EXIF parsing of damaged files raises many types; orientation is optional
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any Pillow image to 8-bit RGB (see the module docstring for each mode)."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.int64)
        arr = np.clip(arr, 0, 65535)
        gray = ((arr * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        if arr.size and float(arr.max()) <= 1.0:
            arr = arr * 255.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(img)
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode in ("L", "1", "P", "YCbCr", "LAB", "HSV", "RGBX"):
        return img.convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise DecodeError("unsupported_mode", f"cannot convert mode {mode} to RGB: {e}") from None


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    icc = img.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            out = ImageCms.profileToProfile(img, src, dst, outputMode="RGB")
            if out is not None:
                return out
        except Exception:  # a bad or unsupported profile: fall back to the plain formula
            pass
    return img.convert("RGB")
