"""Per-image reconstruction metrics (PSNR, SSIM) and their aggregates.

Images are compared as uint8 RGB, the way a person would look at a saved reconstruction:
the decoder output is clamped and rounded to 8 bits before it is scored, so a metric never
rewards values outside the displayable range.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: PSNR of two identical images is infinite; JSON cannot hold that, so it is capped here.
PSNR_CAP_DB = 100.0

_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03


def to_uint8_images(x: torch.Tensor) -> torch.Tensor:
    """Decoder output [B,3,H,W] in ~[-1,1] -> uint8 [B,H,W,3] (clamped, rounded)."""
    x = ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float64 [B,3,H,W] on the same device.

    float64 because SSIM subtracts nearly equal second moments (E[x^2] - E[x]^2) of values up
    to 255^2; float32 loses about three digits there.
    """
    return images.permute(0, 3, 1, 2).to(torch.float64)


def psnr(reference: torch.Tensor, test: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """PSNR in dB per image of two uint8 batches [B,H,W,3]; identical images get PSNR_CAP_DB."""
    a, b = _as_float(reference), _as_float(test)
    mse = (a - b).pow(2).mean(dim=(1, 2, 3))
    floor = data_range**2 / 10 ** (PSNR_CAP_DB / 10)
    out = 10.0 * torch.log10(data_range**2 / mse.clamp_min(floor))
    # A NaN mse (non-finite input) must stay NaN, not be clamped into a perfect score.
    return torch.where(torch.isnan(mse), mse, out)


def _gaussian_taps(device: torch.device) -> torch.Tensor:
    x = torch.arange(_SSIM_WINDOW, dtype=torch.float64, device=device) - (_SSIM_WINDOW - 1) / 2
    g = torch.exp(-(x**2) / (2 * _SSIM_SIGMA**2))
    return g / g.sum()


def ssim(reference: torch.Tensor, test: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """Mean SSIM per image (Wang et al. 2004) of two uint8 batches [B,H,W,3].

    Gaussian window 11x11, sigma 1.5, K1=0.01, K2=0.03, population covariances, averaged over
    channels. Only window positions that lie fully inside the image are scored; this equals
    skimage's `structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)`, which pads and then crops the same border away. Images
    smaller than the window get NaN.
    """
    a, b = _as_float(reference), _as_float(test)
    n, c, h, w = a.shape
    if h < _SSIM_WINDOW or w < _SSIM_WINDOW:
        return torch.full((n,), float("nan"), dtype=torch.float64, device=a.device)
    g = _gaussian_taps(a.device)
    row = g.view(1, 1, 1, -1).expand(c, 1, 1, _SSIM_WINDOW)
    col = g.view(1, 1, -1, 1).expand(c, 1, _SSIM_WINDOW, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        # Separable: two 1-D passes cost 2*11 instead of 121 multiplies per pixel.
        return F.conv2d(F.conv2d(t, row, groups=c), col, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3))


def error_map(reference: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per-pixel absolute error [H,W] (mean over RGB, 0..255) of two uint8 images [H,W,3]."""
    return np.abs(reference.astype(np.float32) - test.astype(np.float32)).mean(axis=-1)


def summarize(values: Sequence[float | None], higher_is_better: bool = True) -> dict[str, float | int | None]:
    """Aggregate one metric over images: count, mean, median, p5, worst, best.

    `p5` is the tail that the worst 5% of images lie beyond: the 5th percentile for metrics where
    higher is better (PSNR, SSIM), the 95th for metrics where lower is better (LPIPS). Missing or
    non-finite values are left out and counted in `missing`.
    """
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    missing = len(values) - len(finite)
    if not finite:
        return {"count": 0, "missing": missing, "mean": None, "median": None, "p5": None,
                "worst": None, "best": None}
    arr = np.asarray(finite, dtype=np.float64)
    return {
        "count": int(arr.size),
        "missing": missing,
        "mean": float(arr.mean()),
        "median": float(np.median(arr)),
        "p5": float(np.percentile(arr, 5 if higher_is_better else 95)),
        "worst": float(arr.min() if higher_is_better else arr.max()),
        "best": float(arr.max() if higher_is_better else arr.min()),
    }
