"""Finite latents, always: what happens to a batch whose posterior holds NaN or Inf.

Reduced-precision encoders overflow: the original SDXL VAE, run in fp16, turns some images'
activations into Inf (fp16 ends at 65504), and GroupNorm turns those into NaN. After every batch
the encode worker checks each sample's posterior (mean and log-variance, of the image and, with
`output.flip`, of its mirror image). With `model.dtype` fp16 or bf16, the samples that are not
finite are encoded once more in fp32 on the same worker (`DeviceEncoder.encode_now`) and stored
when that is finite; what is still not finite (or was already computed in fp32) is rejected
with ledger reason ``encode/non_finite`` instead of writing NaN/Inf into the output.

The second try depends only on the batch's first result (which samples it holds, in batch
order), so a shard gives the same rows wherever and however often it is encoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .device_encoder import DeviceEncoder
from .reasons import Reason

__all__ = ["NON_FINITE", "FiniteLadder", "LadderResult", "Posterior", "non_finite_samples"]

#: The ledger reason of a sample whose posterior stays non-finite.
NON_FINITE = Reason("encode", "non_finite")

#: (mean, logvar, flip_mean, flip_logvar) of a batch, float32 [B, C, h, w]; the flipped pair is
#: None unless asked for.
Posterior = tuple[np.ndarray, np.ndarray, "np.ndarray | None", "np.ndarray | None"]


def non_finite_samples(posterior: Posterior) -> np.ndarray:
    """bool [B]: True for each sample with a NaN or Inf anywhere in its posterior."""
    bad = np.zeros(len(posterior[0]), dtype=bool)
    for arr in posterior:
        if arr is not None:
            bad |= ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
    return bad


@dataclass
class LadderResult:
    """A batch's posterior with the second tries filled in.

    posterior: the batch's arrays; rows of `rejected` samples are not finite and must not be stored.
    rejected: bool [B], samples still not finite.
    retried: samples encoded again in fp32; `recovered` of them came back finite.
    """

    posterior: Posterior
    rejected: np.ndarray
    retried: int = 0
    recovered: int = 0


class FiniteLadder:
    """Checks batch posteriors and encodes non-finite samples again in fp32 (see the module docstring).

    `encoder` is the worker's `DeviceEncoder`; `compute_dtype` the model's `model.dtype`: in fp32
    a second try would compute the same, so non-finite samples are rejected at once.
    """

    def __init__(self, encoder: DeviceEncoder, compute_dtype: str):
        self.encoder = encoder
        self.compute_dtype = compute_dtype

    def apply(self, posterior: Posterior, pixels: Sequence[np.ndarray], *, flip: bool) -> LadderResult:
        """The batch's `posterior` made finite where fp32 can; `pixels` are its images (uint8 [H, W, 3])."""
        bad = non_finite_samples(posterior)
        if not bad.any():
            return LadderResult(posterior, bad)
        if self.compute_dtype == "fp32":
            return LadderResult(posterior, bad)
        idx = np.flatnonzero(bad)
        again = self.encoder.encode_now(np.stack([pixels[i] for i in idx]), flip=flip, dtype="fp32")
        still = non_finite_samples(again)
        arrays = list(posterior)
        for k, (arr, new) in enumerate(zip(posterior, again)):
            if arr is not None and new is not None:
                arr = arr.copy()
                arr[idx] = new
                arrays[k] = arr
        rejected = np.zeros_like(bad)
        rejected[idx[still]] = True
        return LadderResult((arrays[0], arrays[1], arrays[2], arrays[3]), rejected,
                            retried=len(idx), recovered=int(len(idx) - still.sum()))
