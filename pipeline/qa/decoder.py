"""The QA decoder: turns QA samples back into images and scores them.

`ReconstructionDecoder` is a plain class (a test drives it directly); the QA stage runs it as a
Ray actor, one per GPU (or on CPU where there is none). Per shard it reads the QA side table and
the stored latents of the same keys through `LatentDataset`, decodes both the stored latents and
the fp32 latents kept before storage rounding, in batches of one latent shape, and scores each
reconstruction against the preprocessed original.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.config import ModelConfig
from pipeline.models import load_model
from pipeline.qa import metrics as qm
from pipeline.qa.readback import PairedSample, StoredLatentReader
from pipeline.schema import FP8, from_storage, to_storage
from pipeline.text import TextStats

#: Rounding tolerance (relative, absolute) of each storage dtype: twice the worst round-to-nearest
#: error (fp16: 10 mantissa bits and subnormals down to 2^-24; bf16: 7 mantissa bits; fp8_e4m3:
#: 3 mantissa bits, and subnormal steps of 2^-9 scales, a scale being at most the channel's
#: largest |value| / 224: its atol is relative to that largest value, see `rounding_atol`).
ROUNDING_TOLERANCE: dict[str, tuple[float, float]] = {
    "fp32": (1e-7, 1e-30),
    "fp16": (2.0**-10, 2.0**-24),
    "bf16": (2.0**-7, 1e-30),
    FP8: (2.0**-3, 2.0**-16),
}
#: Stored dtypes whose PSNR cost is also shown against bf16 (the common 2-byte choice): QA decodes
#: the fp32 latents rounded to bf16 too.
BF16_REFERENCE = (FP8,)


def rounding_atol(dtype: str, fp32: np.ndarray) -> np.ndarray | float:
    """The absolute rounding tolerance of `dtype` for latent `fp32` [C, h, w]: a number, or for
    fp8 one per channel ([C, 1, 1], times the channel's largest |value|)."""
    atol = ROUNDING_TOLERANCE.get(dtype, ROUNDING_TOLERANCE["fp32"])[1]
    if dtype != FP8:
        return atol
    finite = np.where(np.isfinite(fp32), np.abs(fp32.astype(np.float64)), 0.0)
    return atol * finite.max(axis=(-2, -1), keepdims=True)


@dataclass
class SampleScore:
    """Scores of one QA sample; None where a score could not be computed (see `problem`)."""

    key: str
    shard: str
    bucket: str
    psnr: float | None = None
    ssim: float | None = None
    lpips: float | None = None
    psnr_fp32: float | None = None
    ssim_fp32: float | None = None
    #: PSNR from the fp32 latent rounded to bf16 (only for dtypes in `BF16_REFERENCE`).
    psnr_bf16: float | None = None
    decoded_psnr: float | None = None
    latent_psnr: float | None = None
    latent_max_rel_error: float | None = None
    within_rounding: bool | None = None
    problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ShardScores:
    """What one shard's QA sample yields: scores, value histograms of its stored latents, and the
    statistics of its caption embeddings when the output stores them."""

    shard: str
    scores: list[SampleScore] = field(default_factory=list)
    histogram: np.ndarray | None = None  # [C, bins] counts
    text_stats: TextStats | None = None


@dataclass
class Reconstruction:
    """One sample's original and the reconstruction from its stored latent (uint8 HWC)."""

    key: str
    shard: str
    original: np.ndarray
    reconstruction: np.ndarray


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


class ReconstructionDecoder:
    """Decodes QA samples with the configured autoencoder and scores the reconstructions."""

    def __init__(
        self,
        model: ModelConfig,
        root: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        storage_dtype: str = "fp32",
        batch_size: int = 8,
        lpips_weights: str | None = None,
        histogram_ranges: Sequence[tuple[float, float]] | None = None,
        histogram_bins: int = 40,
        device: str | None = None,
    ):
        self.reader = StoredLatentReader(root, storage_options)
        self.storage_dtype = storage_dtype
        self.batch_size = batch_size
        self.histogram_ranges = list(histogram_ranges) if histogram_ranges else None
        self.histogram_bins = histogram_bins
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.compute_dtype = model.dtype
        # Not compiled: QA decodes a few batches, compilation would cost more than it saves.
        self.model = load_model(model).prepare(device=str(self.device), dtype=model.dtype,
                                                       channels_last=model.channels_last_on(self.device.type))
        self.lpips = None
        if lpips_weights:
            from pipeline.qa.lpips import LPIPS

            self.lpips = LPIPS.from_local(lpips_weights).to(self.device)

    def info(self) -> dict[str, Any]:
        """Which decoder this is and where it runs (for the report's provenance)."""
        fp = self.model.fingerprint()
        return {
            "preset": fp.get("preset"),
            "weights_sha256": fp.get("weights_sha256"),
            "fingerprint": fp,
            "dtype": self.compute_dtype,
            "device": str(self.device) if self.device.type == "cpu" else torch.cuda.get_device_name(self.device),
        }

    # -- decoding -------------------------------------------------------------------------------

    @torch.inference_mode()
    def _decode(self, latents: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode same-shape latents -> (uint8 images [B,H,W,3], finite mask [B])."""
        z = torch.from_numpy(np.stack(latents).astype(np.float32)).to(self.device)
        x = self.model.decode(z).float()
        finite = torch.isfinite(x).flatten(1).all(dim=1)
        # Non-finite outputs are scored as missing, not quantised into arbitrary pixel values.
        x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
        return qm.to_uint8_images(x), finite

    def _lpips(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        assert self.lpips is not None
        fa = a.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        fb = b.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with torch.inference_mode():
            return self.lpips(fa, fb)

    def score(self, samples: Sequence[PairedSample]) -> list[SampleScore]:
        """Score samples (any mix of shapes); the result is in input order."""
        out: dict[int, SampleScore] = {}
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(samples):
            problem = None
            if s.stored is None:
                problem = "latent not found in the dataset (LatentDataset did not return this key)"
            elif s.stored.shape != s.fp32.shape:
                problem = f"stored latent shape {list(s.stored.shape)} != QA latent shape {list(s.fp32.shape)}"
            if problem:
                out[i] = SampleScore(s.key, s.shard, s.bucket, problem=problem)
                continue
            groups.setdefault(tuple(s.fp32.shape), []).append(i)
        for idx in groups.values():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                for i, score in zip(chunk, self._score_batch([samples[i] for i in chunk])):
                    out[i] = score
        return [out[i] for i in range(len(samples))]

    def _score_batch(self, batch: list[PairedSample]) -> list[SampleScore]:
        rtol = ROUNDING_TOLERANCE.get(self.storage_dtype, ROUNDING_TOLERANCE["fp32"])[0]
        stored_imgs, stored_ok = self._decode([s.stored for s in batch])
        fp32_imgs, fp32_ok = self._decode([s.fp32 for s in batch])
        bf16_imgs = bf16_ok = None
        if self.storage_dtype in BF16_REFERENCE:
            bf16_imgs, bf16_ok = self._decode([from_storage(to_storage(s.fp32, "bf16"), "bf16") for s in batch])
        scores = [SampleScore(s.key, s.shard, s.bucket) for s in batch]
        for sc, s in zip(scores, batch):
            assert s.stored is not None
            diff = np.abs(s.stored.astype(np.float64) - s.fp32.astype(np.float64))
            ref = np.abs(s.fp32.astype(np.float64))
            atol = rounding_atol(self.storage_dtype, s.fp32)
            both_nonfinite = ~np.isfinite(s.stored) & ~np.isfinite(s.fp32) & ((s.stored == s.fp32) | np.isnan(s.fp32))
            ok = (diff <= rtol * ref + atol) | both_nonfinite
            sc.within_rounding = bool(ok.all())
            with np.errstate(invalid="ignore", divide="ignore"):
                rel = np.where(ref > 0, diff / ref, diff)
            rel = rel[np.isfinite(rel)]
            sc.latent_max_rel_error = float(rel.max()) if rel.size else None
            sc.latent_psnr = _finite(_latent_psnr(s.stored, s.fp32))
            if not sc.within_rounding:
                sc.problem = (f"stored latent differs from the fp32 latent beyond {self.storage_dtype} rounding "
                              f"(max relative error {sc.latent_max_rel_error})")
        h, w = stored_imgs.shape[1:3]
        originals = [torch.from_numpy(np.ascontiguousarray(s.pixels)) for s in batch]
        same = [o.shape[:2] == (h, w) for o in originals]
        for sc, o, ok in zip(scores, originals, same):
            if not ok:
                sc.problem = f"reconstruction is {h}x{w}, the original is {o.shape[0]}x{o.shape[1]}"
        idx = [i for i, ok in enumerate(same) if ok]
        if idx:
            ref = torch.stack([originals[i] for i in idx]).to(self.device)
            st, fp = stored_imgs[idx], fp32_imgs[idx]
            psnr_s, ssim_s = qm.psnr(ref, st).cpu(), qm.ssim(ref, st).cpu()
            psnr_f, ssim_f = qm.psnr(ref, fp).cpu(), qm.ssim(ref, fp).cpu()
            dec = qm.psnr(fp, st).cpu()
            bf = qm.psnr(ref, bf16_imgs[idx]).cpu() if bf16_imgs is not None else None
            lp = self._lpips(ref, st).cpu() if self.lpips is not None else None
            for j, i in enumerate(idx):
                sc = scores[i]
                if bool(stored_ok[i]):
                    sc.psnr, sc.ssim = _finite(float(psnr_s[j])), _finite(float(ssim_s[j]))
                    sc.lpips = _finite(float(lp[j])) if lp is not None else None
                else:
                    sc.problem = sc.problem or "reconstruction from the stored latent has NaN/Inf"
                if bool(fp32_ok[i]):
                    sc.psnr_fp32, sc.ssim_fp32 = _finite(float(psnr_f[j])), _finite(float(ssim_f[j]))
                if bool(stored_ok[i]) and bool(fp32_ok[i]):
                    sc.decoded_psnr = _finite(float(dec[j]))
                if bf is not None and bool(bf16_ok[i]):
                    sc.psnr_bf16 = _finite(float(bf[j]))
        return scores

    # -- per shard (what the actor is asked) ------------------------------------------------------

    def score_shard(self, shard: str, keys: Sequence[str]) -> ShardScores:
        """Read the QA samples `keys` of `shard` (side table + LatentDataset) and score them."""
        pairs = self.reader.pairs(shard, keys)
        result = ShardScores(shard, self.score(pairs))
        if self.histogram_ranges:
            from pipeline.qa.stats import channel_histograms

            stored = [p.stored for p in pairs if p.stored is not None and p.stored.shape[0] == len(self.histogram_ranges)]
            result.histogram = channel_histograms(stored, self.histogram_ranges, self.histogram_bins)
        texts = [p.text for p in pairs if p.text is not None]
        if texts:
            result.text_stats = TextStats(self.reader.text_layout).update_all(texts)
        return result

    def reconstruct(self, shard: str, keys: Sequence[str]) -> list[Reconstruction]:
        """Originals and reconstructions (from the stored latents) of some samples, for the report."""
        pairs = [p for p in self.reader.pairs(shard, keys) if p.stored is not None]
        out = []
        for p in pairs:
            imgs, _ = self._decode([p.stored])
            out.append(Reconstruction(p.key, p.shard, p.pixels, imgs[0].cpu().numpy()))
        return out


def _latent_psnr(stored: np.ndarray, fp32: np.ndarray) -> float:
    """PSNR of stored vs fp32 latents with the fp32 latent's value range as the peak."""
    ref = fp32.astype(np.float64)
    finite = np.isfinite(ref) & np.isfinite(stored)
    if not finite.any():
        return math.nan
    peak = float(ref[finite].max() - ref[finite].min())
    mse = float(np.mean((stored.astype(np.float64)[finite] - ref[finite]) ** 2))
    if peak <= 0:
        return qm.PSNR_CAP_DB if mse == 0 else math.nan
    floor = peak**2 / 10 ** (qm.PSNR_CAP_DB / 10)
    return 10 * math.log10(peak**2 / max(mse, floor))
