"""Figures for the QA report, drawn with Pillow and numpy and embedded as PNG data URIs.

No plotting library: the report must render on a cluster head node with nothing but the
pipeline's own dependencies installed.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: Absolute error (0..255, mean over RGB) that maps to the top of the heat-map colour scale.
#: Fixed, not per image, so heat maps of different samples compare at a glance.
HEATMAP_MAX = 64.0

# Dark-to-bright ramp (black, violet, red, orange, pale yellow): monotone in lightness, so the
# map still reads in greyscale print.
_RAMP = np.array([
    [0, 0, 4], [60, 9, 101], [150, 38, 100], [226, 81, 52], [251, 160, 12], [252, 255, 164],
], dtype=np.float32)

_BG = (255, 255, 255)
_AXIS = (60, 60, 60)
_BAR = (70, 110, 170)
_MARK = (200, 30, 30)
_GRID = (225, 225, 225)


def _font(size: int = 11) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: the bitmap font has one size
        return ImageFont.load_default()


def png_data_uri(image: Image.Image) -> str:
    """Encode an image as a `data:image/png;base64,...` URI."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def colorize(values: np.ndarray, vmax: float = HEATMAP_MAX) -> Image.Image:
    """Map a 2-D array of non-negative values to an RGB heat map (0 dark, >= vmax bright)."""
    t = np.clip(np.nan_to_num(values.astype(np.float32), nan=vmax) / vmax, 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(t).astype(np.int64).clip(0, len(_RAMP) - 2)
    frac = (t - lo)[..., None]
    rgb = _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac
    return Image.fromarray(rgb.round().astype(np.uint8), "RGB")


def colorbar(width: int = 240, height: int = 34, vmax: float = HEATMAP_MAX) -> Image.Image:
    """Legend for `colorize`: the ramp with its end values."""
    ramp = colorize(np.tile(np.linspace(0, vmax, width - 20)[None, :], (12, 1)), vmax)
    img = Image.new("RGB", (width, height), _BG)
    img.paste(ramp, (10, 2))
    draw = ImageDraw.Draw(img)
    font = _font(10)
    draw.text((10, 16), "0", fill=_AXIS, font=font)
    label = f">= {vmax:g}"
    draw.text((width - 10 - draw.textlength(label, font=font), 16), label, fill=_AXIS, font=font)
    return img


def upscale(image: Image.Image, min_side: int = 160) -> Image.Image:
    """Enlarge small images by an integer factor (nearest neighbour keeps pixels honest)."""
    factor = max(1, math.ceil(min_side / max(1, min(image.size))))
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw), default=raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.1e}"
    return f"{v:.3g}"


def bar_histogram(
    counts: Sequence[int],
    edges: Sequence[float],
    title: str,
    xlabel: str,
    markers: Sequence[tuple[float, str]] = (),
    size: tuple[int, int] = (480, 240),
) -> Image.Image:
    """Histogram chart from bin counts and their len(counts)+1 edges, with optional vertical markers."""
    w, h = size
    left, right, top, bottom = 48, 14, 24, 36
    img = Image.new("RGB", size, _BG)
    draw = ImageDraw.Draw(img)
    font = _font(11)
    draw.text((left, 5), title, fill=_AXIS, font=font)
    pw, ph = w - left - right, h - top - bottom
    counts_arr = np.asarray(counts, dtype=np.float64)
    lo, hi = float(edges[0]), float(edges[-1])
    if hi <= lo:
        hi = lo + 1.0
    peak = max(1.0, float(counts_arr.max()) if counts_arr.size else 1.0)

    def x_of(v: float) -> float:
        return left + (v - lo) / (hi - lo) * pw

    for frac in (0.25, 0.5, 0.75, 1.0):
        y = top + ph - frac * ph
        draw.line([(left, y), (left + pw, y)], fill=_GRID)
    for c, e0, e1 in zip(counts_arr, edges[:-1], edges[1:]):
        if c <= 0:
            continue
        x0, x1 = x_of(float(e0)), x_of(float(e1))
        y0 = top + ph - c / peak * ph
        draw.rectangle([x0, y0, max(x0, x1 - 1), top + ph], fill=_BAR)
    draw.line([(left, top), (left, top + ph), (left + pw, top + ph)], fill=_AXIS)
    for t in _ticks(lo, hi):
        x = x_of(t)
        draw.line([(x, top + ph), (x, top + ph + 4)], fill=_AXIS)
        label = _fmt(t)
        draw.text((x - draw.textlength(label, font=font) / 2, top + ph + 6), label, fill=_AXIS, font=font)
    for text, level in (("0", 0.0), (_fmt(peak), peak)):
        y = top + ph - level / peak * ph
        draw.text((left - 6 - draw.textlength(text, font=font), y - 6), text, fill=_AXIS, font=font)
    draw.text((left + pw / 2 - draw.textlength(xlabel, font=font) / 2, h - 14), xlabel, fill=_AXIS, font=font)
    for value, label in markers:
        if not math.isfinite(value):
            continue
        x = min(max(x_of(value), left), left + pw)
        draw.line([(x, top), (x, top + ph)], fill=_MARK, width=2)
        draw.text((min(x + 3, w - right - draw.textlength(label, font=font)), top + 2), label, fill=_MARK, font=font)
    return img


def value_histogram(
    values: Sequence[float],
    title: str,
    xlabel: str,
    bins: int = 30,
    markers: Sequence[tuple[float, str]] = (),
) -> Image.Image:
    """Histogram chart of raw values (non-finite ones are left out)."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return bar_histogram([0], [0.0, 1.0], title + " (no data)", xlabel)
    lo, hi = float(arr.min()), float(arr.max())
    for v, _ in markers:
        if math.isfinite(v):
            lo, hi = min(lo, v), max(hi, v)
    pad = max(1e-6, (hi - lo) * 0.05)
    counts, edges = np.histogram(arr, bins=bins, range=(lo - pad, hi + pad))
    return bar_histogram(counts.tolist(), edges.tolist(), title, xlabel, markers)
