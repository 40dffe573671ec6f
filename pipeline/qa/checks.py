"""The QA checks: each turns what QA measured into pass / fail / warn / skip with its rule.

Gating checks decide the verdict (`reconstruction`, `nan`, `scaling`, `shift`, `readback`, and
`text` for an output with caption embeddings); `shards` and `decoder` only warn. The README's QA section lists them with their config keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.config import QAConfig
from pipeline.qa.decoder import SampleScore
from pipeline.qa.stats import LatentStatistics

__all__ = ["Check", "CheckInput", "run_checks", "verdict"]


@dataclass(frozen=True)
class Check:
    """One line of the verdict table."""

    name: str
    status: str  # pass | fail | warn | skip
    value: Any
    rule: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CheckInput:
    """What the checks judge."""

    qa: QAConfig
    #: Every chosen QA sample, scored or with the problem that kept it from being scored.
    scores: list[SampleScore]
    stats: LatentStatistics | None
    #: `LatentStatistics.report` of the dataset (None without statistics).
    latent_stats: dict[str, Any] | None
    #: Shards that did not commit (summary.json) or whose commit does not hold.
    failed_shards: list[str]
    #: `ReconstructionDecoder.info()` ({} when nothing was decoded).
    decoder_info: dict[str, Any]
    decoder_matches: bool
    #: `TextStats.to_dict()` of the QA sample's caption embeddings (None when none came back).
    text_stats: dict[str, Any] | None = None
    #: QA samples that should have come back with caption embeddings (0: the output stores none).
    text_expected: int = 0

    @property
    def scored(self) -> list[SampleScore]:
        return [s for s in self.scores if s.psnr is not None]

    @property
    def problems(self) -> list[SampleScore]:
        return [s for s in self.scores if s.problem]


def run_checks(inp: CheckInput) -> list[Check]:
    """Every check that applies, in report order."""
    checks: list[Callable[[CheckInput], list[Check]]] = [_reconstruction, _nan, _factors, _readback, _text, _shards,
                                                         _decoder]
    return [c for check in checks for c in check(inp)]


def verdict(checks: list[Check]) -> str:
    """"fail" when a check fails, else "pass" (warnings do not gate)."""
    return "fail" if any(c.status == "fail" for c in checks) else "pass"


def _reconstruction(inp: CheckInput) -> list[Check]:
    qa, scored = inp.qa, inp.scored
    rule = f"mean PSNR >= {qa.min_psnr:g} dB"
    if qa.samples == 0:
        return [Check("reconstruction", "skip", None, rule, "qa.samples is 0")]
    if not scored:
        return [Check("reconstruction", "fail", None, rule,
                      "no QA sample could be scored (none kept during encoding, or all failed: see problems)")]
    mean = float(np.mean([s.psnr for s in scored]))
    ok = mean >= qa.min_psnr
    return [Check("reconstruction", "pass" if ok else "fail", mean, rule,
                  f"{len(scored)} samples; worst {min(s.psnr for s in scored):.2f} dB"
                  + ("" if ok else ": the decoder does not reconstruct these latents (wrong model, wrong weights, "
                                   "colour or layout bug?)"))]


def _nan(inp: CheckInput) -> list[Check]:
    rule = f"NaN + Inf latent values <= {inp.qa.max_nan}"
    if inp.stats is None:
        return [Check("nan", "fail", None, rule, "no commit record holds statistics")]
    bad = inp.stats.nonfinite
    s = inp.stats.stats
    return [Check("nan", "pass" if bad <= inp.qa.max_nan else "fail", bad, rule,
                  f"{int(s.nan.sum())} NaN, {int(s.inf.sum())} Inf over the whole dataset")]


def _factors(inp: CheckInput) -> list[Check]:
    """The configured scaling and shift factors against the dataset's statistics."""
    ls = inp.latent_stats
    if ls is None:
        return []
    tol = inp.qa.stats_tolerance
    return [
        Check("scaling", "pass" if ls["scale_ok"] else "fail", ls["scale_drift"],
              f"|std * scaling_factor - 1| <= {tol:g}",
              f"configured {ls['configured_scaling_factor']:.6g}, recommended {_g(ls['recommended_scaling_factor'])}"),
        Check("shift", "pass" if ls["shift_ok"] else "fail", ls["shift_drift"],
              f"|mean - shift_factor| / std <= {tol:g}",
              f"configured {ls['configured_shift_factor']:.6g}, recommended {_g(ls['recommended_shift_factor'])}"),
    ]


def _readback(inp: CheckInput) -> list[Check]:
    if inp.qa.samples <= 0:
        return []
    problems = inp.problems
    message = (problems[0].problem if problems else
               "every QA key read back through LatentDataset, equal to its fp32 latent up to storage rounding, "
               "decoded to a finite image of the original size")
    return [Check("readback", "fail" if problems else "pass", len(problems), "0 QA samples with problems", message)]


def _text(inp: CheckInput) -> list[Check]:
    """Caption embeddings: every QA sample's came back through LatentDataset, without NaN or Inf."""
    if not inp.text_expected:
        return []
    rule = f"caption embeddings of every QA sample read back, NaN + Inf <= {inp.qa.max_nan}"
    ts = inp.text_stats
    rows = min((t["rows"] for t in ts["tokens"].values()), default=0) if ts else 0
    if rows < inp.text_expected:
        return [Check("text", "fail", rows, rule, f"{rows} of {inp.text_expected} QA samples came back with their "
                                                  "caption embeddings through LatentDataset")]
    bad = sum(c["nan"] + c["inf"] for c in ts["columns"].values())  # type: ignore[index]
    return [Check("text", "pass" if bad <= inp.qa.max_nan else "fail", bad, rule,
                  f"{bad} NaN or Inf values in the stored embeddings of {rows} QA samples")]


def _shards(inp: CheckInput) -> list[Check]:
    failed = inp.failed_shards
    message = ("failed: " + ", ".join(failed[:10]) + (" ..." if len(failed) > 10 else "")
               if failed else "every planned shard committed")
    return [Check("shards", "warn" if failed else "pass", len(failed), "0 failed shards (not gating)", message)]


def _decoder(inp: CheckInput) -> list[Check]:
    info = inp.decoder_info
    if not info:
        return []
    if inp.decoder_matches:
        message = "same weights and architecture as the encoder"
    elif info.get("weights_sha256") is None:
        message = "the decoder has random weights (no checkpoint), so it cannot be the encoder's model"
    else:
        message = ("the decoder differs from the model recorded in the manifest; fine for a fine-tuned "
                   "decoder, otherwise a mistake")
    return [Check("decoder", "pass" if inp.decoder_matches else "warn", None,
                  "decoder = the manifest's model (not gating)", message)]


def _g(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.6g}"
