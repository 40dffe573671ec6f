"""OUTPUT/qa/metrics.json: the QA document, built from typed parts.

`Findings` is everything the QA stage gathered and measured; `build_document` judges it
(`pipeline.qa.checks`) and assembles the document from its parts: provenance, counts, LPIPS
state, metric tables, storage precision, latent statistics, the statistics of the QA sample's
caption embeddings, samples and the best / median / worst groups. The report (`pipeline.qa.report`) renders exactly this document; the README's QA
section describes its fields.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.commit import ShardScan
from pipeline.config import JobConfig, QAConfig
from pipeline.finite import NON_FINITE
from pipeline.jsonutil import jsonable, utc_now
from pipeline.manifest import Manifest, code_version
from pipeline.qa.checks import Check, CheckInput, run_checks, verdict
from pipeline.qa.decoder import BF16_REFERENCE, ROUNDING_TOLERANCE, SampleScore
from pipeline.qa.metrics import summarize
from pipeline.qa.stats import LatentStatistics
from pipeline.reasons import Reason
from pipeline.summary import EncodeSummary
from pipeline.text import TextStats

__all__ = ["SCHEMA_VERSION", "THROUGHPUT_FIELDS", "ErrorExample", "Findings", "ReasonCount", "build_document",
           "pick_groups"]

SCHEMA_VERSION = 1
#: Samples shown in each of the best / median / worst groups.
GROUP_SIZE = 3
#: Figures of the last encode run shown from summary.json.
THROUGHPUT_FIELDS = ("images", "seconds", "images_per_second", "workers", "retries")


@dataclass(frozen=True)
class ErrorExample:
    """A rejected image shown as an example of its reason."""

    shard: str
    key: str
    message: str


@dataclass
class ReasonCount:
    """How many images a (stage, error) reason rejected, with a few examples from the ledgers."""

    reason: Reason
    count: int
    examples: list[ErrorExample] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.reason.stage, "error": self.reason.error, "count": self.count,
                "examples": [asdict(e) for e in self.examples]}


@dataclass
class Findings:
    """Everything the QA stage gathered and measured: the input of the checks, document and figures."""

    config: JobConfig
    manifest: Manifest
    scan: ShardScan
    stats: LatentStatistics | None
    #: The last encode run's summary.json (None when there is none).
    summary: EncodeSummary | None
    #: QA side-table rows of the committed shards (the population the sample was chosen from).
    side_rows: int
    reasons: list[ReasonCount]
    #: Every chosen sample, in (shard, key) order.
    scores: list[SampleScore] = field(default_factory=list)
    #: [C, bins] value counts of the sample's stored latents (None when nothing was decoded).
    histogram: np.ndarray | None = None
    decoder_info: dict[str, Any] = field(default_factory=dict)
    #: Statistics of the sample's caption embeddings as training reads them (None: none came back).
    text_stats: TextStats | None = None

    @property
    def qa(self) -> QAConfig:
        return self.config.qa


@dataclass(frozen=True)
class ShardFailure:
    """A shard that is not (validly) committed, and why."""

    name: str
    error: str


@dataclass
class Provenance:
    """Where the latents and the verdict come from: models, storage, code versions, the config."""

    manifest_fingerprint: str
    model: dict[str, Any]
    decoder: dict[str, Any] | None
    decoder_matches_manifest: bool
    format: str
    dtype: str
    store: str
    shapes: list
    scaling_factor: float
    shift_factor: float
    manifest_code_version: str
    manifest_created: str
    qa_code_version: str
    config: dict[str, Any]

    @classmethod
    def of(cls, f: Findings, matches: bool) -> Provenance:
        m = f.manifest
        return cls(
            manifest_fingerprint=hashlib.sha256(json.dumps(m.fingerprint(), sort_keys=True).encode()).hexdigest(),
            model=m.model,
            decoder={k: v for k, v in f.decoder_info.items() if k != "fingerprint"} or None,
            decoder_matches_manifest=matches,
            format=m.format,
            dtype=m.dtype,
            store=m.store,
            shapes=m.shapes,
            scaling_factor=m.scaling_factor,
            shift_factor=m.shift_factor,
            manifest_code_version=m.code_version,
            manifest_created=m.created,
            qa_code_version=code_version(),
            config=f.config.to_dict(redact=True),
        )


@dataclass
class Counts:
    """Shards, images, rejected images by reason, the last run's throughput, the QA sample."""

    shards_committed: int
    shards_failed: list[ShardFailure]
    images: int
    errors: int
    errors_by_reason: list[ReasonCount]
    throughput: dict[str, float] | None
    #: The finite-latent check (`pipeline.finite`): samples encoded again in fp32 and stored after
    #: it (the last encode run, from summary.json; None without one) and samples rejected as
    #: non-finite (every committed shard's ledger).
    finite: dict[str, int | None]
    qa_side_rows: int
    qa_selected: int
    qa_scored: int
    qa_problems: list[dict[str, str]]

    @classmethod
    def of(cls, f: Findings, failed: list[ShardFailure]) -> Counts:
        records = f.scan.committed
        return cls(
            shards_committed=len(records),
            shards_failed=failed,
            images=sum(r.rows for r in records.values()),
            errors=sum(r.errors for r in records.values()),
            errors_by_reason=f.reasons,
            throughput={k: getattr(f.summary, k) for k in THROUGHPUT_FIELDS} if f.summary is not None else None,
            finite={
                "fp32_retries": f.summary.fp32_retries if f.summary is not None else None,
                "fp32_recovered": f.summary.fp32_recovered if f.summary is not None else None,
                "non_finite": sum(r.count for r in f.reasons if r.reason == NON_FINITE),
            },
            qa_side_rows=f.side_rows,
            qa_selected=len(f.scores),
            qa_scored=sum(1 for s in f.scores if s.psnr is not None),
            qa_problems=[{"shard": s.shard, "key": s.key, "problem": s.problem} for s in f.scores if s.problem],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "shards_committed": self.shards_committed,
            "shards_failed": [asdict(s) for s in self.shards_failed],
            "shards_failed_count": len(self.shards_failed),
            "images": self.images,
            "errors": self.errors,
            "errors_by_reason": [r.to_dict() for r in self.errors_by_reason],
            "throughput": self.throughput,
            "finite": self.finite,
            "qa_side_rows": self.qa_side_rows,
            "qa_selected": self.qa_selected,
            "qa_scored": self.qa_scored,
            "qa_problem_count": len(self.qa_problems),
            "qa_problems": self.qa_problems,
        }


@dataclass
class LpipsState:
    """Whether LPIPS was scored, and why not."""

    enabled: bool
    reason: str | None
    weights: str | None

    @classmethod
    def of(cls, qa: QAConfig) -> LpipsState:
        on = bool(qa.lpips_weights)
        return cls(on, None if on else "qa.lpips_weights is not set (weights are never downloaded)", qa.lpips_weights)


def _quality(items: list[SampleScore], lpips_on: bool) -> dict[str, Any]:
    """PSNR, SSIM (and LPIPS) summaries of some samples."""
    return {
        "psnr": summarize([s.psnr for s in items]),
        "ssim": summarize([s.ssim for s in items]),
        "lpips": summarize([s.lpips for s in items], higher_is_better=False) if lpips_on else None,
    }


@dataclass
class QualityTables:
    """Reconstruction quality over all samples, per aspect bucket and per shard."""

    overall: dict[str, Any]
    by_bucket: dict[str, dict[str, Any]]
    by_shard: dict[str, dict[str, Any]]

    @classmethod
    def of(cls, scores: list[SampleScore], lpips_on: bool) -> QualityTables:
        by_bucket: dict[str, list[SampleScore]] = {}
        by_shard: dict[str, list[SampleScore]] = {}
        for s in scores:
            by_bucket.setdefault(s.bucket, []).append(s)
            by_shard.setdefault(s.shard, []).append(s)
        return cls(
            overall=_quality(scores, lpips_on),
            by_bucket={b: _quality(v, lpips_on) for b, v in sorted(by_bucket.items())},
            by_shard={n: _quality(v, lpips_on) for n, v in sorted(by_shard.items())},
        )


@dataclass
class StoragePrecision:
    """What storing the latents at `dtype` costs: PSNR lost and relative error against fp32, and
    for fp8 the PSNR lost against bf16 as well (None otherwise)."""

    dtype: str
    psnr_fp32: dict[str, Any]
    psnr_stored: dict[str, Any]
    psnr_lost_db: dict[str, Any]
    psnr_bf16: dict[str, Any] | None
    psnr_lost_vs_bf16_db: dict[str, Any] | None
    decoded_psnr: dict[str, Any]
    latent_psnr: dict[str, Any]
    max_rel_error: float | None
    rtol: float
    atol: float
    beyond_rounding: int

    @classmethod
    def of(cls, scores: list[SampleScore], dtype: str) -> StoragePrecision:
        lost = [s.psnr_fp32 - s.psnr for s in scores if s.psnr is not None and s.psnr_fp32 is not None]
        rtol, atol = ROUNDING_TOLERANCE.get(dtype, ROUNDING_TOLERANCE["fp32"])
        rel = [s.latent_max_rel_error for s in scores if s.latent_max_rel_error is not None]
        bf16 = dtype in BF16_REFERENCE
        lost_bf16 = [s.psnr_bf16 - s.psnr for s in scores if s.psnr is not None and s.psnr_bf16 is not None]
        return cls(
            dtype=dtype,
            psnr_fp32=summarize([s.psnr_fp32 for s in scores]),
            psnr_stored=summarize([s.psnr for s in scores]),
            psnr_lost_db=summarize(lost, higher_is_better=False),
            psnr_bf16=summarize([s.psnr_bf16 for s in scores]) if bf16 else None,
            psnr_lost_vs_bf16_db=summarize(lost_bf16, higher_is_better=False) if bf16 else None,
            decoded_psnr=summarize([s.decoded_psnr for s in scores]),
            latent_psnr=summarize([s.latent_psnr for s in scores]),
            max_rel_error=max(rel) if rel else None,
            rtol=rtol,
            atol=atol,
            beyond_rounding=sum(1 for s in scores if s.within_rounding is False),
        )


@dataclass
class QADocument:
    """The whole metrics.json."""

    verdict: str
    generated: str
    output: str
    seconds: float
    checks: list[Check]
    provenance: Provenance
    counts: Counts
    lpips: LpipsState
    metrics: QualityTables
    storage: StoragePrecision
    latent_stats: dict[str, Any] | None
    text_stats: dict[str, Any] | None
    samples: list[SampleScore]
    groups: dict[str, list[SampleScore]]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (NaN and infinities become null)."""
        return jsonable({
            "schema_version": SCHEMA_VERSION,
            "verdict": self.verdict,
            "generated": self.generated,
            "output": self.output,
            "seconds": self.seconds,
            "checks": [c.to_dict() for c in self.checks],
            "provenance": asdict(self.provenance),
            "counts": self.counts.to_dict(),
            "lpips": asdict(self.lpips),
            "metrics": asdict(self.metrics),
            "storage": asdict(self.storage),
            "latent_stats": self.latent_stats,
            "text_stats": self.text_stats,
            "samples": [s.to_dict() for s in self.samples],
            "groups": {g: [s.key for s in items] for g, items in self.groups.items()},
        }, finite=True)


def build_document(f: Findings, seconds: float) -> dict[str, Any]:
    """Judge the findings and assemble metrics.json (`seconds`: how long QA took)."""
    latent_stats = _latent_stats(f)
    text_stats = f.text_stats.to_dict() if f.text_stats is not None else None
    failed = _failed_shards(f.summary, f.scan)
    decoder_fp = f.decoder_info.get("fingerprint") or {}
    matches = bool(decoder_fp) and _same_model(decoder_fp, f.manifest.model)
    checks = run_checks(CheckInput(
        qa=f.qa, scores=f.scores, stats=f.stats, latent_stats=latent_stats,
        failed_shards=[s.name for s in failed], decoder_info=f.decoder_info, decoder_matches=matches,
        text_stats=text_stats, text_expected=len(f.scores) if f.manifest.text else 0,
    ))
    return QADocument(
        verdict=verdict(checks),
        generated=utc_now(),
        output=storage.redact(f.config.output.path),
        seconds=seconds,
        checks=checks,
        provenance=Provenance.of(f, matches),
        counts=Counts.of(f, failed),
        lpips=LpipsState.of(f.qa),
        metrics=QualityTables.of(f.scores, bool(f.qa.lpips_weights)),
        storage=StoragePrecision.of(f.scores, f.manifest.dtype),
        latent_stats=latent_stats,
        text_stats=text_stats,
        samples=f.scores,
        groups=pick_groups(f.scores),
    ).to_dict()


def pick_groups(scores: list[SampleScore]) -> dict[str, list[SampleScore]]:
    """Best, median and worst samples by PSNR (from the stored latents)."""
    ranked = sorted((s for s in scores if s.psnr is not None), key=lambda s: (s.psnr, s.shard, s.key))
    if not ranked:
        return {}
    k = max(1, min(GROUP_SIZE, len(ranked) // 3))
    mid = max(0, len(ranked) // 2 - k // 2)
    return {
        "best": ranked[::-1][:k],
        "median": ranked[mid : mid + k],
        "worst": ranked[:k],
    }


def _latent_stats(f: Findings) -> dict[str, Any] | None:
    """The statistics block: `LatentStatistics.report`, plus the sample's value histograms."""
    if f.stats is None:
        return None
    block = f.stats.report(f.manifest.scaling_factor, f.manifest.shift_factor, f.qa.stats_tolerance)
    if f.histogram is not None:
        ranges = f.stats.histogram_ranges()
        block["histogram"] = {
            "source": "QA sample, stored latents",
            "channels": [
                {"channel": c, "range": list(ranges[c]), "counts": [int(v) for v in f.histogram[c]]}
                for c in range(f.histogram.shape[0])
            ],
        }
    return block


def _failed_shards(summary: EncodeSummary | None, scan: ShardScan) -> list[ShardFailure]:
    """Shards the last run failed (summary.json), then shards whose commit record does not hold."""
    failed = [ShardFailure(s.name, s.error) for s in summary.failed] if summary is not None else []
    return failed + [ShardFailure(n, f"commit record does not hold: {why}") for n, why in sorted(scan.broken.items())]


def _same_model(decoder: Mapping[str, Any], encoder: Mapping[str, Any]) -> bool:
    """Same architecture and the same weights (two random initialisations are never 'the same')."""
    return (decoder.get("weights_sha256") is not None
            and decoder.get("weights_sha256") == encoder.get("weights_sha256")
            and json.dumps(decoder.get("config"), sort_keys=True) == json.dumps(encoder.get("config"), sort_keys=True))

