"""Exact latent statistics of a whole output, from the per-shard commit records.

Each commit record carries per-channel count, sum, sum of squares, min, max and NaN/Inf counts
of every latent it stored, so the dataset's mean and standard deviation are exact and cost one
small read per shard, not a pass over the latents.

The recommended factors follow the convention of `AutoencoderKL.scale_latents`,
`(z - shift) * scale`, which should leave the latents a diffusion model trains on with mean 0
and standard deviation 1: recommended shift = mean, recommended scale = 1 / std, both pooled over
all channels (`ChannelStats.recommended_factors`, which `inspect` prints too). With the
configured factors, the scaled latents have

    scaled_std  = std * scale
    scaled_mean = (mean - shift) * scale

and the drift the QA gate checks against `qa.stats_tolerance` is |scaled_std - 1| (the relative
disagreement of the configured and recommended scale) and |mean - shift| / std (the shift
error in units of the data's standard deviation).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from pipeline.commit import ChannelStats, CommitRecord, pooled_stats

#: Channel histograms span mean +- this many standard deviations (clipped to the exact min/max).
HISTOGRAM_SPAN_STD = 4.0


def _num(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


@dataclass
class LatentStatistics:
    """Pooled per-channel moments of every stored latent, plus the recommended factors."""

    stats: ChannelStats
    shards: int

    @classmethod
    def from_commits(cls, records: Iterable[CommitRecord]) -> LatentStatistics | None:
        """Merge the statistics of all commit records; None when no record holds any."""
        total, shards = pooled_stats(records)
        return None if total is None else cls(total, shards)

    @property
    def nonfinite(self) -> int:
        """NaN plus Inf values over the whole dataset."""
        return int(self.stats.nan.sum() + self.stats.inf.sum())

    def overall(self) -> tuple[float, float]:
        return self.stats.overall()

    def histogram_ranges(self) -> list[tuple[float, float]]:
        """Per-channel value range for histograms: mean +- 4 std, inside the exact min/max."""
        out = []
        for mean, std, lo, hi in zip(self.stats.mean, self.stats.std, self.stats.min, self.stats.max):
            if not (math.isfinite(lo) and math.isfinite(hi)):
                out.append((-1.0, 1.0))
                continue
            a = max(lo, mean - HISTOGRAM_SPAN_STD * std)
            b = min(hi, mean + HISTOGRAM_SPAN_STD * std)
            if b <= a:
                a, b = a - 0.5, a + 0.5
            out.append((float(a), float(b)))
        return out

    def report(self, scaling_factor: float, shift_factor: float, tolerance: float) -> dict:
        """The statistics block of metrics.json (see the module docstring for the definitions)."""
        s = self.stats
        mean, std = self.overall()
        recommended_scale, recommended_shift = s.recommended_factors()
        channels = []
        for c in range(s.channels):
            cstd = float(s.std[c])
            channels.append({
                "channel": c,
                "count": int(s.count[c]),
                "mean": float(s.mean[c]),
                "std": cstd,
                "min": _num(float(s.min[c])),
                "max": _num(float(s.max[c])),
                "nan": int(s.nan[c]),
                "inf": int(s.inf[c]),
                "recommended_scaling_factor": 1.0 / cstd if cstd > 0 else None,
            })
        scaled_std = std * scaling_factor
        shift_error = abs(mean - shift_factor) / std if std > 0 else (0.0 if mean == shift_factor else math.inf)
        scale_drift = abs(scaled_std - 1.0)
        return {
            "shards": self.shards,
            "channels": channels,
            "overall": {
                "count": int(s.count.sum()),
                "mean": mean,
                "std": std,
                "min": _num(float(s.min.min())),
                "max": _num(float(s.max.max())),
                "nan": int(s.nan.sum()),
                "inf": int(s.inf.sum()),
            },
            "recommended_scaling_factor": recommended_scale,
            "recommended_shift_factor": recommended_shift,
            "configured_scaling_factor": float(scaling_factor),
            "configured_shift_factor": float(shift_factor),
            "scaled_mean": (mean - shift_factor) * scaling_factor,
            "scaled_std": scaled_std,
            "scale_drift": scale_drift,
            "shift_drift": _num(shift_error),
            "tolerance": float(tolerance),
            "scale_ok": bool(scale_drift <= tolerance),
            "shift_ok": bool(shift_error <= tolerance),
        }


def channel_histograms(latents: Iterable[np.ndarray], ranges: list[tuple[float, float]], bins: int = 40) -> np.ndarray:
    """Counts [C, bins] of latent values per channel; values beyond a range land in its end bins."""
    counts = np.zeros((len(ranges), bins), np.int64)
    for z in latents:
        for c, (lo, hi) in enumerate(ranges):
            v = np.asarray(z[c], np.float64).ravel()
            v = v[np.isfinite(v)]
            idx = np.clip(np.floor((v - lo) / (hi - lo) * bins), 0, bins - 1).astype(np.int64)
            counts[c] += np.bincount(idx, minlength=bins)
    return counts
