"""Why a sample was rejected: the (stage, error) vocabulary of the bad-sample ledger.

A rejected sample becomes a row of OUTPUT/errors/NAME.parquet with a `stage` and an `error`
column; commit records, the run summary and Ray metrics count rejections by reason, written
``stage/error`` (e.g. ``decode/not_an_image``). `Reason` is that pair as a value: `str()` gives
the on-disk string and `Reason.parse` reads it back, so no reader splits strings by hand.

`STAGES` and `ERRORS` list what the pipeline writes, with what each means. The list is not a
closed set: a decoder or preprocessing bug on one odd file is caught and recorded under the
exception's type name (e.g. ``decode/UnidentifiedImageError``) instead of failing the shard.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ERRORS", "STAGES", "Reason"]

#: The stages that reject samples, in pipeline order.
STAGES: dict[str, str] = {
    "read": "the tar's member group is not a usable sample (pipeline.reader)",
    "decode": "the image bytes do not give pixels (pipeline.decode, pipeline.decodepool)",
    "preprocess": "the decoded image cannot be brought to its target size (pipeline.preprocess)",
    "encode": "the encoder's output for the image is unusable (pipeline.finite)",
}

#: The errors each stage records by name (besides exception type names, see above).
ERRORS: dict[str, dict[str, str]] = {
    "read": {
        "duplicate_key": "the key appears again after other keys; the first occurrence is kept",
        "duplicate_member": "the same extension twice in one sample",
        "member_too_large": "a needed member is larger than max_member_bytes",
        "no_image": "no member has an image extension",
        "ambiguous_image": "several members match an image extension only on their last part",
        "key_not_utf8": "the member name is not UTF-8; the ledger key shows its bytes escaped (\\xNN)",
    },
    "decode": {
        "not_an_image": "not a recognised image format",
        "corrupt": "the image cannot be opened or decoded, or it is empty",
        "too_large": "more pixels than preprocess.max_pixels (refused from the header)",
        "too_small": "the shorter side is below preprocess.min_size",
        "unsupported_mode": "a pixel mode that cannot be converted to RGB",
        "timeout": "a decode process took longer than ray.decode_timeout on the image",
        "crashed": "the decode process died while decoding the image",
    },
    "preprocess": {
        "corrupt": "the decoded image has no usable size",
        "too_small": "reaching the target size would upscale the image more than preprocess.max_upscale",
    },
    "encode": {
        "non_finite": "NaN or Inf in the posterior, also when encoded again in fp32 after a reduced-precision try",
    },
}


@dataclass(frozen=True, order=True)
class Reason:
    """One rejection reason: the stage that rejected a sample and its error name."""

    stage: str
    error: str

    def __str__(self) -> str:
        return f"{self.stage}/{self.error}"

    @classmethod
    def parse(cls, text: str) -> Reason:
        """``"stage/error"`` -> Reason; the error is what follows the first ``/``.

        A string without ``/`` reads as a stage with an empty error: records are reported as
        written, never refused.
        """
        stage, _, error = text.partition("/")
        return cls(stage, error)

