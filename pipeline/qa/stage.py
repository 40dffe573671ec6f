"""The QA stage: gather, decode on Ray, score, decide, write report.html and metrics.json.

The driver only handles small things (commit records, side-table indexes, scores); pixels and
latents are read by the decoder actors themselves, shard by shard. The document and its checks
are built in `pipeline.qa.document` and `pipeline.qa.checks`, the pictures in
`pipeline.qa.figures`.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray

from pipeline import layout, storage
from pipeline.cluster import ActorPool, ActorsLost, connect_ray, run_calls, start_actors
from pipeline.commit import CommitRecord, ShardScan
from pipeline.config import JobConfig
from pipeline.index import load_index
from pipeline.manifest import Manifest, ManifestError, read_manifest
from pipeline.qa.decoder import Reconstruction, ReconstructionDecoder, SampleScore, ShardScores
from pipeline.qa.document import ErrorExample, Findings, ReasonCount, build_document, pick_groups
from pipeline.qa.errors import QAError
from pipeline.qa.figures import build_figures
from pipeline.qa.readback import read_side_index
from pipeline.qa.report import render_report
from pipeline.qa.sampling import choose
from pipeline.qa.stats import LatentStatistics
from pipeline.reasons import Reason
from pipeline.summary import EncodeSummary, SummaryError, read_summary
from pipeline.text import TextStats

log = logging.getLogger(__name__)

#: Examples of rejected images shown per (stage, error) reason.
ERROR_EXAMPLES = 3
HISTOGRAM_BINS = 40
#: Calls in flight per decoder actor: the next shard's reads overlap the current decode.
CALLS_PER_ACTOR = 2


@dataclass
class _Decoded:
    """What the decoder actors return for the whole sample."""

    scores: list[SampleScore] = field(default_factory=list)
    histogram: np.ndarray | None = None  # [C, bins] value counts of the stored latents
    reconstructions: dict[tuple[str, str], Reconstruction] = field(default_factory=dict)
    decoder_info: dict[str, Any] = field(default_factory=dict)
    text_stats: TextStats | None = None  # of the sample's caption embeddings, as training reads them


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

    def _summary(self) -> EncodeSummary | None:
        try:
            return read_summary(self.root, self.so)
        except SummaryError as exc:
            log.warning("summary.json of %s is not a run summary (%s); failed shards are not reported",
                        storage.redact(self.root), exc)
            return None

    def _errors_by_reason(self, records: dict[str, CommitRecord]) -> list[ReasonCount]:
        """Reason counts from the commit records (exact); examples from as few ledgers as needed."""
        counts: dict[Reason, int] = {}
        for record in records.values():
            for text, n in record.errors_by_reason.items():
                reason = Reason.parse(text)
                counts[reason] = counts.get(reason, 0) + int(n)
        examples: dict[Reason, list[ErrorExample]] = {k: [] for k in counts}
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
                bucket = examples.setdefault(Reason(row["stage"], row["error"]), [])
                if len(bucket) < ERROR_EXAMPLES:
                    bucket.append(ErrorExample(name, row["key"], row["message"]))
        return [ReasonCount(reason, n, examples.get(reason, []))
                for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]

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

    def _start_decoders(self, manifest: Manifest, stats: LatentStatistics | None, count: int) -> ActorPool:
        gpus = float(ray.cluster_resources().get("GPU", 0))
        # A decoder takes a whole GPU unless the config says otherwise (0 GPUs per worker included).
        num_gpus = (self.config.ray.num_gpus_per_worker or 1.0) if gpus > 0 else 0.0
        kwargs = {
            "storage_dtype": manifest.dtype,
            "batch_size": self.qa.batch_size,
            "lpips_weights": self.qa.lpips_weights,
            "histogram_ranges": stats.histogram_ranges() if stats is not None else None,
            "histogram_bins": HISTOGRAM_BINS,
        }
        actors = start_actors(ReconstructionDecoder, count, (self.config.model, self.root, self.so), kwargs,
                              num_cpus=self.config.ray.num_cpus_per_worker, num_gpus=num_gpus)
        return ActorPool(actors, label="QA decoder actor", per_actor=CALLS_PER_ACTOR)

    def _decode_sample(self, manifest: Manifest, stats: LatentStatistics | None,
                       chosen: dict[str, list[tuple[str, str]]]) -> _Decoded:
        """Score the chosen samples on Ray decoder actors; reconstruct the ones the report shows."""
        out = _Decoded()
        owns_ray = connect_ray(self.config)
        pool = self._start_decoders(manifest, stats, max(1, min(self.qa.workers, len(chosen))))
        try:
            try:
                out.decoder_info = ray.get(pool.slots[0].actor.info.remote())
            except Exception as exc:  # the actor's constructor failed: weights, device, LPIPS file
                raise QAError(f"the QA decoder could not be started: {exc}") from exc
            calls = [("score_shard", (shard, [k for k, _ in items])) for shard, items in chosen.items()]
            for (shard, keys), result in self._run(pool, calls):
                if isinstance(result, ShardScores):
                    out.scores.extend(result.scores)
                    if result.histogram is not None:
                        out.histogram = result.histogram if out.histogram is None else out.histogram + result.histogram
                    if result.text_stats is not None:
                        out.text_stats = result.text_stats if out.text_stats is None else out.text_stats.merge(
                            result.text_stats)
                else:
                    buckets = dict(chosen[shard])
                    out.scores.extend(SampleScore(k, shard, buckets[k], problem=f"shard could not be scored: {result}")
                                      for k in keys)
            out.scores.sort(key=lambda s: (s.shard, s.key))
            shown: dict[str, set[str]] = {}
            for group in pick_groups(out.scores).values():
                for s in group:
                    shown.setdefault(s.shard, set()).add(s.key)
            calls = [("reconstruct", (shard, sorted(keys))) for shard, keys in shown.items()]
            for _, result in self._run(pool, calls):
                if isinstance(result, list):
                    out.reconstructions.update({(r.shard, r.key): r for r in result})
        finally:
            pool.kill()
            if owns_ray:
                ray.shutdown()
        return out

    @staticmethod
    def _run(pool: ActorPool, calls: list[tuple[str, tuple]]) -> list[tuple[tuple, Any]]:
        """`run_calls`, with a pool whose decoders all died reported as a QAError."""
        try:
            return run_calls(pool, calls)
        except ActorsLost as exc:
            raise QAError(str(exc)) from exc.last_error

    # -- the run ----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run QA; write report.html and metrics.json under OUTPUT/qa/; return the metrics document."""
        started = time.monotonic()
        manifest = self._manifest()
        # The consolidated index (plus a LIST of _commits/ when it is not current), not a GET per commit.
        index = load_index(self.root, self.so)
        scan = ShardScan(committed=index.records(), broken=dict(index.broken), uncommitted=[])
        stats = LatentStatistics.from_commits(scan.committed.values())
        side_rows, chosen = self._select(scan.committed) if self.qa.samples > 0 else (0, {})
        log.info("QA of %s: %d committed shards, %d QA samples chosen from %d", storage.redact(self.root),
                 len(scan.committed), sum(len(v) for v in chosen.values()), side_rows)
        decoded = self._decode_sample(manifest, stats, chosen) if chosen else _Decoded()
        findings = Findings(
            config=self.config, manifest=manifest, scan=scan, stats=stats, summary=self._summary(),
            side_rows=side_rows, reasons=self._errors_by_reason(scan.committed), scores=decoded.scores,
            histogram=decoded.histogram, decoder_info=decoded.decoder_info, text_stats=decoded.text_stats,
        )
        document = build_document(findings, seconds=time.monotonic() - started)
        figures = build_figures(findings, decoded.reconstructions)
        storage.put_bytes(layout.qa_metrics_url(self.root),
                          (json.dumps(document, indent=1) + "\n").encode(), self.so)
        storage.put_bytes(layout.qa_report_url(self.root), render_report(document, figures).encode("utf-8"), self.so)
        return document


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
