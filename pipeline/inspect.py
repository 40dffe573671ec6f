"""`python -m pipeline inspect OUTPUT [--verify] [--reindex]`: summarize and validate a latent output.

Prints the manifest, shard counts (committed / uncommitted / broken / missing), rows, errors by
reason, latent shapes and dtype, and the exact latent statistics pooled from the commit records;
for an output with caption embeddings, its text encoders and statistics of their columns over the
first `--text-rows` rows of the committed shards.
The records come from the consolidated index (`pipeline.index`; no GET per commit) and are checked
against one listing per folder. `--verify` re-reads every committed file and checks its size and
sha256. `--reindex` first rebuilds OUTPUT/index from every commit record (under the lease).

Exit status: 0 when every commit holds; 1 when a commit record does not match its files (or,
with --verify, a file's sha256 differs); 2 when OUTPUT is not a readable latent output.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import storage
from .commit import CommitRecord, ShardScan, pooled_stats, scan_output
from .index import load_index, reindex
from .layout import index_url
from .lease import LeaseHeld
from .manifest import Manifest, ManifestError, read_manifest
from .summary import EncodeSummary, SummaryError, read_summary
from .text import TextLayout, TextStats, iter_text_rows

__all__ = ["main", "inspect_output", "scan_through_index", "verify_files"]


def _last_run(root: str, storage_options: Mapping[str, Any] | None) -> EncodeSummary | None:
    """The last encode run's summary.json; None when there is none or it is not a run summary."""
    try:
        return read_summary(root, storage_options)
    except SummaryError:
        return None


def scan_through_index(root: str, storage_options: Mapping[str, Any] | None = None) -> ShardScan:
    """The shards of OUTPUT: records from the consolidated index, checked against folder listings."""
    index = load_index(root, storage_options)
    return scan_output(root, storage_options, records=index.records(), unreadable=index.broken)


#: Rows whose text columns `inspect` reads for their statistics, by default.
TEXT_ROWS = 1000


def _text_summary(root: str, storage_options: Mapping[str, Any] | None, manifest: Manifest,
                  records: Mapping[str, CommitRecord], limit: int) -> dict[str, Any]:
    """Statistics of the text columns over the first `limit` rows of the committed shards (in name
    order): commit records carry the latents' statistics only, so these are read from the shards."""
    layout = TextLayout.from_manifest(manifest.text)
    stats = TextStats(layout)
    rows = 0
    for name in sorted(records):
        if rows >= limit:
            break
        record = records[name]
        for row in iter_text_rows(storage.join(root, record.shard_file), record.format, layout, storage_options):
            stats.update(row)
            rows += 1
            if rows >= limit:
                break
    return {"rows_read": rows, **stats.to_dict()}


def inspect_output(
    root: str, storage_options: Mapping[str, Any] | None = None, scan: ShardScan | None = None,
    text_rows: int = TEXT_ROWS,
) -> dict[str, Any]:
    """Everything `inspect` prints, as a JSON-able dict (`text_rows`: see `_text_summary`)."""
    manifest = read_manifest(root, storage_options)
    scan = scan or scan_through_index(root, storage_options)
    summary = _last_run(root, storage_options)
    # The summary names only the shards that failed: those without any file are "missing".
    failed = {f.name: f.error for f in summary.failed} if summary is not None else {}
    seen = set(scan.committed) | set(scan.broken) | set(scan.uncommitted)
    missing = [n for n in sorted(failed) if n not in seen]
    rows = sum(r.rows for r in scan.committed.values())
    errors = sum(r.errors for r in scan.committed.values())
    reasons: Counter[str] = Counter()
    shapes: Counter[str] = Counter()
    dtypes: Counter[str] = Counter()
    size = 0
    for record in scan.committed.values():
        reasons.update(record.errors_by_reason)
        shapes.update(record.shapes)
        dtypes[record.dtype] += 1
        size += sum(int(f["size"]) for f in record.files.values())
    out: dict[str, Any] = {
        "output": storage.redact(root),
        "manifest": manifest.to_dict(),
        "shards": {
            "committed": len(scan.committed),
            "uncommitted": scan.uncommitted,
            "broken": scan.broken,
            "missing": missing,
        },
        "last_run": {"status": summary.status, "failed": failed} if summary is not None else None,
        "rows": rows,
        "errors": errors,
        "errors_by_reason": dict(reasons.most_common()),
        "shapes": dict(shapes.most_common()),
        "dtypes": dict(dtypes),
        "bytes": size,
        "stats": None,
    }
    stats, _ = pooled_stats(scan.committed.values())
    if stats is not None:
        mean, std = stats.overall()
        scale, shift = stats.recommended_factors()
        out["stats"] = {
            "per_channel": {
                "mean": [float(v) for v in stats.mean],
                "std": [float(v) for v in stats.std],
                **{k: v for k, v in stats.to_dict().items() if k in ("min", "max", "nan", "inf", "count")},
            },
            "mean": mean,
            "std": std,
            # What a model trained on these latents would use to bring them to unit variance.
            "suggested_scaling_factor": scale,
            "suggested_shift_factor": shift,
        }
    if manifest.text:
        out["text"] = _text_summary(root, storage_options, manifest, scan.committed, max(0, text_rows))
    return out


def _sha256(url: str, storage_options: Mapping[str, Any] | None) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with storage.open_input(url, storage_options) as f:
        for chunk in storage.iter_chunks(f):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def verify_files(
    root: str, records: Mapping[str, CommitRecord], storage_options: Mapping[str, Any] | None = None, workers: int = 4
) -> list[str]:
    """Re-read every committed file; return one message per size or sha256 mismatch."""
    jobs = [(name, rel, info) for name, rec in records.items() for rel, info in rec.files.items()]

    def check(job) -> str | None:
        name, rel, info = job
        url = storage.join(root, rel)
        try:
            n, digest = _sha256(url, storage_options)
        except FileNotFoundError:
            return f"shard {name}: {rel} is missing"
        if n != int(info["size"]):
            return f"shard {name}: {rel} has {n} bytes, the commit says {info['size']}"
        if digest != info["sha256"]:
            return f"shard {name}: {rel} sha256 {digest[:16]}... differs from the commit's {info['sha256'][:16]}..."
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return [m for m in pool.map(check, jobs) if m]


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _print_report(info: dict[str, Any], manifest: Manifest) -> None:
    m = manifest
    model = m.model or {}
    p = print
    p(f"output       {info['output']}")
    p(f"format       {m.format} (format version {m.format_version}), latent dtype {m.dtype}")
    p(f"stored       {m.store}{', plus flipped' if m.flip else ''}")
    weights = model.get("weights_sha256") or "none (random init)"
    p(f"model        preset {model.get('preset')}, weights sha256 {weights}")
    p(f"factors      scaling {m.scaling_factor}, shift {m.shift_factor}")
    shapes = ", ".join("x".join(str(v) for v in s) for s in m.shapes) or "?"
    p(f"latents      {m.latent_channels} channels, downsample x{m.downsample_factor}, shapes {shapes}")
    p(f"preprocess   {json.dumps(m.preprocess, sort_keys=True)}")
    p(f"created      {m.created} by version {m.code_version}")
    s = info["shards"]
    p(
        f"shards       {s['committed']} committed, {len(s['uncommitted'])} uncommitted, "
        f"{len(s['broken'])} broken, {len(s['missing'])} missing"
    )
    for label in ("uncommitted", "missing"):
        if s[label]:
            names = s[label]
            p(f"  {label}: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}")
    for name, why in list(s["broken"].items())[:20]:
        p(f"  broken {name}: {why}")
    last = info.get("last_run")
    if last:
        p(f"last run     {last.get('status')}, {len(last['failed'])} shard(s) failed")
        for name, why in list(last["failed"].items())[:20]:
            p(f"  failed {name}: {why}")
    p(f"rows         {info['rows']} ({_fmt_bytes(info['bytes'])} committed)")
    p(f"errors       {info['errors']}")
    for reason, n in info["errors_by_reason"].items():
        p(f"  {reason:<40} {n}")
    if info["shapes"]:
        p("row shapes   " + ", ".join(f"{k}: {v}" for k, v in info["shapes"].items()))
    st = info["stats"]
    if st is not None:
        pc = st["per_channel"]
        p("latent statistics (raw stored values, exact over all committed rows)")
        p(f"  {'ch':>3} {'mean':>10} {'std':>10} {'min':>10} {'max':>10} {'nan':>6} {'inf':>6}")
        for c in range(len(pc["mean"])):
            lo = pc["min"][c]
            hi = pc["max"][c]
            p(
                f"  {c:>3} {pc['mean'][c]:>10.4f} {pc['std'][c]:>10.4f} "
                f"{(lo if lo is not None else float('nan')):>10.4f} {(hi if hi is not None else float('nan')):>10.4f} "
                f"{pc['nan'][c]:>6} {pc['inf'][c]:>6}"
            )
        p(f"  all  mean {st['mean']:.4f}  std {st['std']:.4f}")
        if st["suggested_scaling_factor"]:
            p(f"  suggested scaling_factor {st['suggested_scaling_factor']:.5f} (1/std), shift_factor {st['mean']:.5f}")
    _print_text(info.get("text"), manifest)


def _print_text(text: dict[str, Any] | None, manifest: Manifest) -> None:
    """The text encoders of the manifest and the statistics of their columns."""
    if not manifest.text:
        return
    p = print
    for name, e in sorted(manifest.text.items()):
        model = e.get("model", {})
        shapes = ", ".join(f"{name}_{o} {'x'.join(str(v) for v in e['shapes'][o])}" for o in e["outputs"])
        p(f"text         {name}: {model.get('class', e['kind'])}, max_length {e['max_length']}, padding "
          f"{e['padding']}, {e['compute_dtype']} stored as {e['storage_dtype']}, weights sha256 "
          f"{model.get('weights_sha256')}")
        p(f"               {shapes}{' (unpadded rows)' if e['padding'] == 'none' else ''}")
    if text is None:
        return

    def num(v: float | None) -> str:
        return f"{v:>10.4f}" if v is not None else f"{'-':>10}"

    p(f"text statistics (stored values, the first {text['rows_read']} rows of the committed shards)")
    p(f"  {'column':<28} {'values':>10} {'mean':>10} {'std':>10} {'min':>10} {'max':>10} {'nan':>6} {'inf':>6}")
    for col, c in text["columns"].items():
        p(f"  {col:<28} {c['count']:>10} {num(c['mean'])} {num(c['std'])} {num(c['min'])} {num(c['max'])} "
          f"{c['nan']:>6} {c['inf']:>6}")
    for encoder, t in text["tokens"].items():
        mean = f"{t['mean']:.1f}" if t["mean"] is not None else "-"
        p(f"  tokens {encoder:<21} mean {mean}, min {t['min']}, max {t['max']}, "
          f"{t['at_max_length']} of {t['rows']} at max_length {t['max_length']} (possibly truncated)")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of `inspect` (also used to add the subcommand to the main CLI)."""
    p = parser or argparse.ArgumentParser(prog="python -m pipeline inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("output", help="OUTPUT path or URL (s3://bucket/prefix, ...)")
    p.add_argument("--verify", action="store_true", help="re-read every committed file and check size and sha256")
    p.add_argument("--storage-options", default=None, help="JSON object of fsspec storage options for OUTPUT")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--text-rows", type=int, default=TEXT_ROWS,
                   help=f"rows read for the statistics of caption embeddings (default {TEXT_ROWS}; 0: none)")
    p.add_argument("--reindex", action="store_true",
                   help="rebuild OUTPUT/index from every commit record first (refused while a job holds the lease)")
    p.add_argument("--force", action="store_true", help="with --reindex: take the lease over from another job")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run `inspect`; returns the exit status."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    try:
        so = json.loads(args.storage_options) if args.storage_options else None
    except ValueError as e:
        print(f"error: --storage-options is not valid JSON: {e}", file=sys.stderr)
        return 2
    try:
        if args.reindex:
            index = reindex(args.output, so, force=args.force)
            print(f"reindexed    {len(index)} committed shard(s) into {storage.redact(index_url(args.output))}",
                  file=sys.stderr)
        scan = scan_through_index(args.output, so)
        info = inspect_output(args.output, so, scan, text_rows=args.text_rows)
    except LeaseHeld as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ManifestError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    manifest = Manifest.from_dict(info["manifest"])
    status = 1 if info["shards"]["broken"] else 0
    problems: list[str] = []
    if args.verify:
        problems = verify_files(args.output, scan.committed, so)
        info["verify"] = {"checked_shards": len(scan.committed), "problems": problems}
        if problems:
            status = 1
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        _print_report(info, manifest)
        if args.verify:
            if problems:
                print(f"verify       FAILED: {len(problems)} problem(s)")
                for msg in problems:
                    print(f"  {msg}")
            else:
                print(f"verify       ok: every file of {info['shards']['committed']} committed shard(s) matches")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
