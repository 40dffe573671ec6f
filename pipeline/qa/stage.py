"""The QA stage: gather, decode on Ray, score, decide, write report.html and metrics.json.

The driver only handles small things (commit records, side-table indexes, scores); pixels and
latents are read by the decoder actors themselves, shard by shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from pipeline import layout, storage
from pipeline.commit import CommitRecord, ShardScan, scan_output
from pipeline.config import JobConfig
from pipeline.manifest import Manifest, ManifestError, code_version, read_manifest
from pipeline.qa import plots
from pipeline.qa.decoder import (
    ROUNDING_TOLERANCE,
    Reconstruction,
    ReconstructionDecoder,
    SampleScore,
    ShardScores,
)
from pipeline.qa.errors import QAError
from pipeline.qa.metrics import error_map, summarize
from pipeline.qa.readback import read_side_index
from pipeline.qa.report import ReportFigures, SampleFigure, render_report
from pipeline.qa.sampling import choose
from pipeline.qa.stats import LatentStatistics

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
#: Examples of rejected images shown per (stage, error) reason.
ERROR_EXAMPLES = 3
#: Samples shown in each of the best / median / worst groups.
GROUP_SIZE = 3
HISTOGRAM_BINS = 40


def _jsonable(value: Any) -> Any:
    """Plain JSON values; NaN and infinities become null (JSON has neither)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class _Decoded:
    """What the decoder actors return for the whole sample."""

    scores: list[SampleScore] = field(default_factory=list)
    histogram: np.ndarray | None = None  # [C, bins] value counts of the stored latents
    reconstructions: dict[tuple[str, str], Reconstruction] = field(default_factory=dict)
    decoder_info: dict[str, Any] = field(default_factory=dict)


class QAStage:
    """One QA run over the output of a job configuration."""

    def __init__(self, config: JobConfig):
        self.config = config
        self.root = config.output.path
        self.so = dict(config.output.storage_options or {})
        self.qa = config.qa

    # -- gathering ---------------------------------------------------------------------------------

    def _manifest(self) -> Manifest:
        try:
            return read_manifest(self.root, self.so)
        except ManifestError as exc:
            raise QAError(f"cannot run QA on {storage.redact(self.root)}: {exc}") from exc

    def _summary(self) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_bytes(layout.summary_url(self.root), self.so))
        except FileNotFoundError:
            return None
        except ValueError as exc:
            log.warning("summary.json of %s is not valid JSON (%s); failed shards are not reported",
                        storage.redact(self.root), exc)
            return None

    def _errors_by_reason(self, records: dict[str, CommitRecord]) -> list[dict[str, Any]]:
        """Reason counts from the commit records (exact); examples from as few ledgers as needed."""
        counts: dict[tuple[str, str], int] = {}
        for record in records.values():
            for reason, n in record.errors_by_reason.items():
                stage, _, error = reason.partition("/")
                counts[(stage, error)] = counts.get((stage, error), 0) + int(n)
        examples: dict[tuple[str, str], list[dict[str, str]]] = {k: [] for k in counts}
        for name, record in records.items():
            if not record.errors:
                continue
            if all(len(v) >= ERROR_EXAMPLES for v in examples.values()):
                break
            try:
                table = pq.read_table(io.BytesIO(storage.read_bytes(layout.errors_url(self.root, name), self.so)))
            except (FileNotFoundError, OSError, ValueError) as exc:
                log.warning("error ledger of shard %s is unreadable: %s", name, exc)
                continue
            for row in table.to_pylist():
                bucket = examples.setdefault((row["stage"], row["error"]), [])
                if len(bucket) < ERROR_EXAMPLES:
                    bucket.append({"shard": name, "key": row["key"], "message": row["message"]})
        return [
            {"stage": stage, "error": error, "count": n, "examples": examples.get((stage, error), [])}
            for (stage, error), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        ]

    def _select(self, records: dict[str, CommitRecord]) -> tuple[int, dict[str, list[tuple[str, str]]]]:
        """All side-table rows of committed shards -> (row count, {shard: [(key, bucket)]} chosen).

        Only committed shards count: a side table left by an interrupted attempt is not vouched for.
        At most `qa.samples` rows are chosen (see `pipeline.qa.sampling`).
        """
        names = [n for n, r in records.items() if r.qa_rows > 0]
        with ThreadPoolExecutor(max_workers=min(16, max(1, len(names)))) as pool:
            indexes = list(pool.map(lambda n: (n, read_side_index(self.root, n, self.so)), names))
        rows = [(n, k, b) for n, index in indexes for k, b in index]
        return len(rows), choose(rows, self.qa.samples)

    # -- decoding on Ray --------------------------------------------------------------------------

    def _ray_actors(self, manifest: Manifest, stats: LatentStatistics | None, count: int):
        import ray

        gpus = float(ray.cluster_resources().get("GPU", 0))
        num_gpus = (self.config.ray.num_gpus_per_worker or 1.0) if gpus > 0 else 0.0
        actor_cls = ray.remote(num_cpus=self.config.ray.num_cpus_per_worker, num_gpus=num_gpus)(ReconstructionDecoder)
        ranges = stats.histogram_ranges() if stats is not None else None
        return [
            actor_cls.remote(
                self.config.model,
                self.root,
                self.so,
                storage_dtype=manifest.dtype,
                batch_size=self.qa.batch_size,
                lpips_weights=self.qa.lpips_weights,
                histogram_ranges=ranges,
                histogram_bins=HISTOGRAM_BINS,
            )
            for _ in range(count)
        ]

    @staticmethod
    def _run_on(actors: list, calls: list[tuple[str, tuple]]) -> list[tuple[tuple, Any]]:
        """Spread method calls over actors (two in flight each); returns (call args, result or exception)."""
        import ray
        from ray.exceptions import RayActorError

        queue = deque(calls)
        idle = [a for a in actors for _ in range(2)]
        dead: set[int] = set()
        pending: dict[Any, tuple[Any, str, tuple]] = {}
        out: list[tuple[tuple, Any]] = []
        while queue or pending:
            while queue and idle:
                actor = idle.pop()
                method, args = queue.popleft()
                pending[getattr(actor, method).remote(*args)] = (actor, method, args)
            done, _ = ray.wait(list(pending), num_returns=1)
            actor, method, args = pending.pop(done[0])
            try:
                out.append((args, ray.get(done[0])))
                idle.append(actor)
            except RayActorError as exc:
                # A dead decoder (out of memory, node lost): its call is retried on the others.
                dead.add(id(actor))
                idle = [a for a in idle if id(a) not in dead]
                if len(dead) == len(actors):
                    raise QAError(f"every QA decoder actor died; last error: {exc}") from exc
                queue.append((method, args))
            except Exception as exc:  # a task error names its shard; the other shards still count
                out.append((args, exc))
                idle.append(actor)
        return out

    # -- the run ----------------------------------------------------------------------------------

    def _decode_sample(self, manifest: Manifest, stats: LatentStatistics | None,
                       chosen: dict[str, list[tuple[str, str]]]) -> _Decoded:
        """Score the chosen samples on Ray decoder actors; reconstruct the ones the report shows."""
        import ray

        from pipeline.driver import connect_ray

        out = _Decoded()
        owns_ray = connect_ray(self.config)
        actors = self._ray_actors(manifest, stats, max(1, min(self.qa.workers, len(chosen))))
        try:
            try:
                out.decoder_info = ray.get(actors[0].info.remote())
            except Exception as exc:  # the actor's constructor failed: weights, device, LPIPS file
                raise QAError(f"the QA decoder could not be started: {exc}") from exc
            calls = [("score_shard", (shard, [k for k, _ in items])) for shard, items in chosen.items()]
            for (shard, keys), result in self._run_on(actors, calls):
                if isinstance(result, ShardScores):
                    out.scores.extend(result.scores)
                    if result.histogram is not None:
                        out.histogram = result.histogram if out.histogram is None else out.histogram + result.histogram
                else:
                    buckets = dict(chosen[shard])
                    out.scores.extend(SampleScore(k, shard, buckets[k], problem=f"shard could not be scored: {result}")
                                      for k in keys)
            out.scores.sort(key=lambda s: (s.shard, s.key))
            shown: dict[str, set[str]] = {}
            for group in _pick_groups(out.scores).values():
                for s in group:
                    shown.setdefault(s.shard, set()).add(s.key)
            calls = [("reconstruct", (shard, sorted(keys))) for shard, keys in shown.items()]
            for _, result in self._run_on(actors, calls):
                if isinstance(result, list):
                    out.reconstructions.update({(r.shard, r.key): r for r in result})
        finally:
            for actor in actors:
                ray.kill(actor)
            if owns_ray:
                ray.shutdown()
        return out

    def run(self) -> dict[str, Any]:
        """Run QA; write report.html and metrics.json under OUTPUT/qa/; return the metrics document."""
        started = time.monotonic()
        manifest = self._manifest()
        scan = scan_output(self.root, self.so)
        stats = LatentStatistics.from_commits(scan.committed.values())
        side_rows, chosen = self._select(scan.committed) if self.qa.samples > 0 else (0, {})
        log.info("QA of %s: %d committed shards, %d QA samples chosen from %d", storage.redact(self.root),
                 len(scan.committed), sum(len(v) for v in chosen.values()), side_rows)
        decoded = self._decode_sample(manifest, stats, chosen) if chosen else _Decoded()
        document = self._document(manifest, scan, stats, self._summary(), side_rows, decoded.scores,
                                  decoded.histogram, decoded.decoder_info, time.monotonic() - started)
        figures = _figures(document, decoded, stats, self.qa.min_psnr)
        storage.put_bytes(layout.qa_metrics_url(self.root),
                          (json.dumps(document, indent=1) + "\n").encode(), self.so)
        storage.put_bytes(layout.qa_report_url(self.root), render_report(document, figures).encode("utf-8"), self.so)
        return document

    # -- the metrics document -----------------------------------------------------------------------

    def _document(self, manifest: Manifest, scan: ShardScan, stats: LatentStatistics | None,
                  summary: dict[str, Any] | None, side_rows: int, scores: list[SampleScore],
                  histogram: np.ndarray | None, decoder_info: dict[str, Any], seconds: float) -> dict[str, Any]:
        records = scan.committed
        qa = self.qa
        lpips_on = bool(qa.lpips_weights)
        scored = [s for s in scores if s.psnr is not None]
        problems = [{"shard": s.shard, "key": s.key, "problem": s.problem} for s in scores if s.problem]

        def block(items: list[SampleScore]) -> dict[str, Any]:
            return {
                "psnr": summarize([s.psnr for s in items]),
                "ssim": summarize([s.ssim for s in items]),
                "lpips": summarize([s.lpips for s in items], higher_is_better=False) if lpips_on else None,
            }

        by_bucket: dict[str, list[SampleScore]] = {}
        by_shard: dict[str, list[SampleScore]] = {}
        for s in scores:
            by_bucket.setdefault(s.bucket, []).append(s)
            by_shard.setdefault(s.shard, []).append(s)

        lost = [s.psnr_fp32 - s.psnr for s in scores if s.psnr is not None and s.psnr_fp32 is not None]
        rtol, atol = ROUNDING_TOLERANCE.get(manifest.dtype, ROUNDING_TOLERANCE["fp32"])
        rel = [s.latent_max_rel_error for s in scores if s.latent_max_rel_error is not None]
        storage_block = {
            "dtype": manifest.dtype,
            "psnr_fp32": summarize([s.psnr_fp32 for s in scores]),
            "psnr_stored": summarize([s.psnr for s in scores]),
            "psnr_lost_db": summarize(lost, higher_is_better=False),
            "decoded_psnr": summarize([s.decoded_psnr for s in scores]),
            "latent_psnr": summarize([s.latent_psnr for s in scores]),
            "max_rel_error": max(rel) if rel else None,
            "rtol": rtol,
            "atol": atol,
            "beyond_rounding": sum(1 for s in scores if s.within_rounding is False),
        }

        latent_stats = None
        if stats is not None:
            latent_stats = stats.report(manifest.scaling_factor, manifest.shift_factor, qa.stats_tolerance)
            if histogram is not None:
                ranges = stats.histogram_ranges()
                latent_stats["histogram"] = {
                    "source": "QA sample, stored latents",
                    "channels": [
                        {"channel": c, "range": list(ranges[c]), "counts": [int(v) for v in histogram[c]]}
                        for c in range(histogram.shape[0])
                    ],
                }

        failed = _failed_shards(summary) + [
            {"name": n, "error": f"commit record does not hold: {why}"} for n, why in sorted(scan.broken.items())
        ]
        manifest_fp = hashlib.sha256(json.dumps(manifest.fingerprint(), sort_keys=True).encode()).hexdigest()
        decoder_fp = decoder_info.get("fingerprint") or {}
        matches = bool(decoder_fp) and _same_model(decoder_fp, manifest.model)

        checks = _checks(qa, scored, scores, problems, latent_stats, stats, failed, decoder_info, matches)
        verdict = "fail" if any(c["status"] == "fail" for c in checks) else "pass"
        document = {
            "schema_version": SCHEMA_VERSION,
            "verdict": verdict,
            "generated": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
            "output": storage.redact(self.root),
            "seconds": seconds,
            "checks": checks,
            "provenance": {
                "manifest_fingerprint": manifest_fp,
                "model": manifest.model,
                "decoder": {k: v for k, v in decoder_info.items() if k != "fingerprint"} or None,
                "decoder_matches_manifest": matches,
                "format": manifest.format,
                "dtype": manifest.dtype,
                "store": manifest.store,
                "shapes": manifest.shapes,
                "scaling_factor": manifest.scaling_factor,
                "shift_factor": manifest.shift_factor,
                "manifest_code_version": manifest.code_version,
                "manifest_created": manifest.created,
                "qa_code_version": code_version(),
                "config": self.config.to_dict(redact=True),
            },
            "counts": {
                "shards_committed": len(records),
                "shards_failed": failed,
                "shards_failed_count": len(failed),
                "images": sum(r.rows for r in records.values()),
                "errors": sum(r.errors for r in records.values()),
                "errors_by_reason": self._errors_by_reason(records),
                "throughput": _throughput(summary),
                "qa_side_rows": side_rows,
                "qa_selected": len(scores),
                "qa_scored": len(scored),
                "qa_problem_count": len(problems),
                "qa_problems": problems,
            },
            "lpips": {
                "enabled": lpips_on,
                "reason": None if lpips_on else "qa.lpips_weights is not set (weights are never downloaded)",
                "weights": qa.lpips_weights,
            },
            "metrics": {
                "overall": block(scores),
                "by_bucket": {b: block(v) for b, v in sorted(by_bucket.items())},
                "by_shard": {n: block(v) for n, v in sorted(by_shard.items())},
            },
            "storage": storage_block,
            "latent_stats": latent_stats,
            "samples": [s.to_dict() for s in scores],
            "groups": {g: [s.key for s in items] for g, items in _pick_groups(scores).items()},
        }
        return _jsonable(document)


def _same_model(decoder: Mapping[str, Any], encoder: Mapping[str, Any]) -> bool:
    """Same architecture and the same weights (two random initialisations are never 'the same')."""
    return (decoder.get("weights_sha256") is not None
            and decoder.get("weights_sha256") == encoder.get("weights_sha256")
            and json.dumps(decoder.get("config"), sort_keys=True) == json.dumps(encoder.get("config"), sort_keys=True))


def _failed_shards(summary: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Failed shards listed by the encode run's summary.json (a list of names/objects or a mapping)."""
    if not summary:
        return []
    failed = summary.get("failed") or summary.get("failed_shards") or []
    if isinstance(failed, Mapping):
        return [{"name": str(k), "error": v if isinstance(v, str) else json.dumps(v)} for k, v in failed.items()]
    out = []
    for item in failed:
        if isinstance(item, Mapping):
            out.append({"name": str(item.get("name") or item.get("shard") or item.get("url")),
                        "error": str(item.get("error") or item.get("reason") or "")})
        else:
            out.append({"name": str(item), "error": ""})
    return out


#: Figures of the last encode run shown from summary.json.
THROUGHPUT_FIELDS = ("images", "seconds", "images_per_second", "workers", "retries")


def _throughput(summary: Mapping[str, Any] | None) -> dict[str, float] | None:
    """How fast the last encode run went (from summary.json; None without one)."""
    if not summary:
        return None
    out = {k: summary[k] for k in THROUGHPUT_FIELDS
           if isinstance(summary.get(k), (int, float)) and not isinstance(summary.get(k), bool)}
    return out or None


def _checks(qa, scored, scores, problems, latent_stats, stats, failed, decoder_info, matches) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []

    def add(name: str, status: str, value: Any, rule: str, message: str) -> None:
        checks.append({"name": name, "status": status, "value": value, "rule": rule, "message": message})

    if qa.samples == 0:
        add("reconstruction", "skip", None, f"mean PSNR >= {qa.min_psnr:g} dB", "qa.samples is 0")
    elif not scored:
        add("reconstruction", "fail", None, f"mean PSNR >= {qa.min_psnr:g} dB",
            "no QA sample could be scored (none kept during encoding, or all failed: see problems)")
    else:
        mean = float(np.mean([s.psnr for s in scored]))
        ok = mean >= qa.min_psnr
        add("reconstruction", "pass" if ok else "fail", mean, f"mean PSNR >= {qa.min_psnr:g} dB",
            f"{len(scored)} samples; worst {min(s.psnr for s in scored):.2f} dB"
            + ("" if ok else ": the decoder does not reconstruct these latents (wrong model, wrong weights, "
                             "colour or layout bug?)"))
    if stats is None:
        add("nan", "fail", None, f"NaN + Inf latent values <= {qa.max_nan}", "no commit record holds statistics")
    else:
        bad = stats.nonfinite
        add("nan", "pass" if bad <= qa.max_nan else "fail", bad, f"NaN + Inf latent values <= {qa.max_nan}",
            f"{int(stats.stats.nan.sum())} NaN, {int(stats.stats.inf.sum())} Inf over the whole dataset")
    if latent_stats is not None:
        tol = qa.stats_tolerance
        add("scaling", "pass" if latent_stats["scale_ok"] else "fail", latent_stats["scale_drift"],
            f"|std * scaling_factor - 1| <= {tol:g}",
            f"configured {latent_stats['configured_scaling_factor']:.6g}, "
            f"recommended {_g(latent_stats['recommended_scaling_factor'])}")
        add("shift", "pass" if latent_stats["shift_ok"] else "fail", latent_stats["shift_drift"],
            f"|mean - shift_factor| / std <= {tol:g}",
            f"configured {latent_stats['configured_shift_factor']:.6g}, "
            f"recommended {_g(latent_stats['recommended_shift_factor'])}")
    if qa.samples > 0:
        add("readback", "fail" if problems else "pass", len(problems), "0 QA samples with problems",
            "every QA key read back through LatentDataset, equal to its fp32 latent up to storage rounding, "
            "decoded to a finite image of the original size" if not problems else problems[0]["problem"])
    add("shards", "warn" if failed else "pass", len(failed), "0 failed shards (not gating)",
        "failed: " + ", ".join(f["name"] for f in failed[:10]) + (" ..." if len(failed) > 10 else "")
        if failed else "every planned shard committed")
    if decoder_info:
        if matches:
            message = "same weights and architecture as the encoder"
        elif decoder_info.get("weights_sha256") is None:
            message = "the decoder has random weights (no checkpoint), so it cannot be the encoder's model"
        else:
            message = ("the decoder differs from the model recorded in the manifest; fine for a fine-tuned "
                       "decoder, otherwise a mistake")
        add("decoder", "pass" if matches else "warn", None, "decoder = the manifest's model (not gating)", message)
    return checks


def _g(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.6g}"


def _pick_groups(scores: list[SampleScore]) -> dict[str, list[SampleScore]]:
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


def _figures(document: dict[str, Any], decoded: _Decoded, stats: LatentStatistics | None,
             min_psnr: float) -> ReportFigures:
    scores, histogram = decoded.scores, decoded.histogram
    figures = ReportFigures()
    position = {(s["shard"], s["key"]): i for i, s in enumerate(document["samples"])}
    figures.colorbar = plots.png_data_uri(plots.colorbar())
    for group, items in _pick_groups(scores).items():
        row = []
        for s in items:
            r = decoded.reconstructions.get((s.shard, s.key))
            if r is None:
                continue
            row.append(SampleFigure(
                index=position[(s.shard, s.key)],
                original=plots.png_data_uri(plots.upscale(Image.fromarray(r.original))),
                reconstruction=plots.png_data_uri(plots.upscale(Image.fromarray(r.reconstruction))),
                error=plots.png_data_uri(plots.upscale(plots.colorize(error_map(r.original, r.reconstruction)))),
            ))
        if row:
            figures.groups[group] = row
    psnrs = [s.psnr for s in scores if s.psnr is not None]
    if psnrs:
        figures.psnr_histogram = plots.png_data_uri(plots.value_histogram(
            psnrs, f"PSNR of {len(psnrs)} QA samples", "PSNR (dB)", markers=[(min_psnr, "min_psnr")]))
    if histogram is not None and stats is not None:
        figures.channel_histograms = plots.png_data_uri(_channel_grid(histogram, stats.histogram_ranges()))
    return figures


def _channel_grid(histogram: np.ndarray, ranges: list[tuple[float, float]], columns: int = 4) -> Image.Image:
    """Small multiples: one value histogram per latent channel."""
    cell = (280, 170)
    channels = histogram.shape[0]
    cols = min(columns, channels)
    rows = math.ceil(channels / cols)
    sheet = Image.new("RGB", (cell[0] * cols, cell[1] * rows), (255, 255, 255))
    for c in range(channels):
        lo, hi = ranges[c]
        edges = np.linspace(lo, hi, histogram.shape[1] + 1).tolist()
        chart = plots.bar_histogram(histogram[c].tolist(), edges, f"channel {c}", "raw latent value", size=cell)
        sheet.paste(chart, ((c % cols) * cell[0], (c // cols) * cell[1]))
    return sheet


def render_summary(document: Mapping[str, Any], report_url: str) -> str:
    """A few lines for the terminal: verdict, each check, where the report is."""
    lines = [f"QA of {document['output']}: {document['verdict'].upper()}"]
    for c in document["checks"]:
        value = "" if c["value"] is None else f" = {c['value']:.4g}" if isinstance(c["value"], float) else f" = {c['value']}"
        lines.append(f"  {c['status'].upper():<5} {c['name']}{value} ({c['rule']}): {c['message']}")
    lines.append(f"  report: {report_url}")
    return "\n".join(lines)


def run_qa(config: JobConfig) -> int:
    """Run the QA stage of `config`'s output; print a summary. Exit code: 0 pass, 1 fail, 2 could not run."""
    try:
        document = QAStage(config).run()
    except (QAError, OSError) as exc:
        print(f"error: QA could not run: {exc}", file=sys.stderr)
        return 2
    print(render_summary(document, layout.qa_report_url(storage.redact(config.output.path))))
    return 0 if document["verdict"] == "pass" else 1
