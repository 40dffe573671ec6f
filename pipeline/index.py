"""OUTPUT/index: one Parquet object listing every committed shard, so readers need O(1) requests.

Reading every `_commits/NAME.json` costs one GET per shard: at 10^5 shards and 10^3 training ranks
that is 10^8 requests. The index holds the same records as columns (name, source URL, rows, row
groups, bytes, sha256 of every file, per-channel statistics, ...), one row per shard, readable by
pyarrow and DuckDB (``SELECT name, rows FROM read_parquet('OUTPUT/index')``). The encode job
rewrites it at the end of every run, and `inspect --reindex` rebuilds it from the commits.

When is it current? Each index carries a *generation* (a random id, in the Parquet key-value
metadata). A job holds OUTPUT/lease while it writes shards and releases it after writing the index,
naming that generation (`pipeline.lease`). So `load_index`:

1. GETs the index and the lease. A released lease naming the index's generation means nothing was
   committed since: the index is the answer (2 requests, whatever the shard count).
2. Otherwise (a job is running or crashed, or the output predates leases) it LISTs `_commits/`
   (names, sizes and ETags or mtimes; 1 request per 1000 shards), keeps the index rows whose
   commit is listed unchanged, GETs only the commits that are new or changed, and drops, with a
   warning, indexed shards whose commit is gone.
3. Without an index (or with an unreadable one) it reads every commit, as before indexes.

Each row records the size and ETag (or mtime) of the commit it was made from: that is how the
index says which commits it covers.
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from .commit import ChannelStats, CommitError, CommitRecord
from .jsonutil import utc_now
from .layout import COMMITS_DIR, canonical_url, commit_url, index_url
from .lease import Lease, LeaseError, LeaseRecord, default_holder, read_lease

__all__ = [
    "INDEX_VERSION",
    "READER_COLUMNS",
    "IndexReadError",
    "ShardIndex",
    "WrittenCommits",
    "index_schema",
    "list_commits",
    "load_index",
    "new_generation",
    "refresh_index",
    "reindex",
    "write_index",
]

log = logging.getLogger(__name__)

INDEX_VERSION = 1
_META_KEY = b"latent_precompute_index"

_STATS = pa.struct([
    ("count", pa.list_(pa.int64())),
    ("sum", pa.list_(pa.float64())),
    ("sumsq", pa.list_(pa.float64())),
    ("min", pa.list_(pa.float64())),
    ("max", pa.list_(pa.float64())),
    ("nan", pa.list_(pa.int64())),
    ("inf", pa.list_(pa.int64())),
])
_FILE = pa.struct([("path", pa.string()), ("size", pa.int64()), ("sha256", pa.string())])


#: What a training reader plans from: every column but the statistics and counts by shape or
#: reason, so a rank holds a fraction of the index (records built from them have those empty).
READER_COLUMNS = ("name", "source", "format", "dtype", "rows", "errors", "qa_rows", "row_groups", "bytes",
                  "shard_file", "shard_size", "shard_sha256", "files", "created", "format_version")


def index_schema() -> pa.Schema:
    """Columns of OUTPUT/index. What every reader needs comes first; the statistics come last,
    so a reader that projects them away reads a contiguous prefix of each row group."""
    return pa.schema([
        ("name", pa.string()),
        ("source", pa.string()),
        ("format", pa.string()),
        ("dtype", pa.string()),
        ("rows", pa.int64()),
        ("errors", pa.int64()),
        ("qa_rows", pa.int64()),
        ("row_groups", pa.list_(pa.int64())),
        ("bytes", pa.int64()),
        ("shard_file", pa.string()),
        ("shard_size", pa.int64()),
        ("shard_sha256", pa.string()),
        ("files", pa.list_(_FILE)),
        ("shapes", pa.map_(pa.string(), pa.int64())),
        ("errors_by_reason", pa.map_(pa.string(), pa.int64())),
        ("created", pa.string()),
        ("format_version", pa.int32()),
        ("commit_size", pa.int64()),
        ("commit_stamp", pa.string()),
        ("stats", _STATS),
    ])


class IndexReadError(ValueError):
    """OUTPUT/index is unreadable or of an unknown version; the message names the OUTPUT."""


def new_generation() -> str:
    """A fresh index generation id."""
    return uuid.uuid4().hex[:16]


def list_commits(root: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, tuple[int, str]]:
    """LIST OUTPUT/_commits/: `{name: (size, stamp)}`, stamp the ETag (object stores) or mtime.

    One request per 1000 commits on S3; nothing is read.
    """
    fs, path = storage.filesystem(storage.join(root, COMMITS_DIR), storage_options)
    try:
        entries = fs.ls(path, detail=True, refresh=True)
    except FileNotFoundError:
        return {}
    finally:
        fs.invalidate_cache(path)  # a listing of 10^5 entries must not stay cached
    out: dict[str, tuple[int, str]] = {}
    for entry in entries:
        if entry.get("type") != "file":
            continue
        fname = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if not fname.endswith(".json") or fname.startswith("."):
            continue
        stamp = entry.get("ETag") or entry.get("etag") or entry.get("mtime") or entry.get("LastModified") or ""
        out[fname[: -len(".json")]] = (int(entry.get("size") or 0), str(stamp))
    return out


def _row(record: CommitRecord, commit: tuple[int, str]) -> dict[str, Any]:
    try:
        shard_file = record.shard_file
    except CommitError:
        shard_file = None
    info = record.files.get(shard_file, {}) if shard_file else {}
    return {
        "name": record.name,
        "source": record.source,
        "format": record.format,
        "dtype": record.dtype,
        "rows": int(record.rows),
        "errors": int(record.errors),
        "qa_rows": int(record.qa_rows),
        "row_groups": [int(n) for n in record.row_groups],
        "bytes": sum(int(f["size"]) for f in record.files.values()),
        "shard_file": shard_file,
        "shard_size": int(info["size"]) if "size" in info else None,
        "shard_sha256": info.get("sha256"),
        "files": [{"path": rel, "size": int(f["size"]), "sha256": f.get("sha256")} for rel, f in record.files.items()],
        "shapes": [(k, int(v)) for k, v in record.shapes.items()],
        "errors_by_reason": [(k, int(v)) for k, v in record.errors_by_reason.items()],
        "created": record.created,
        "format_version": int(record.format_version),
        "commit_size": int(commit[0]),
        "commit_stamp": commit[1],
        "stats": record.stats or None,
    }


def _record(row: Mapping[str, Any]) -> CommitRecord:
    """The commit record of an index row; columns not read (see `READER_COLUMNS`) stay empty."""
    return CommitRecord(
        name=row["name"],
        format=row["format"],
        dtype=row["dtype"],
        rows=row["rows"],
        errors=row["errors"],
        files={f["path"]: {"size": f["size"], "sha256": f["sha256"]} for f in row["files"]},
        stats=dict(row["stats"]) if row.get("stats") else {},
        errors_by_reason=dict(row.get("errors_by_reason") or []),
        shapes=dict(row.get("shapes") or []),
        row_groups=list(row["row_groups"]),
        qa_rows=row["qa_rows"],
        source=row["source"],
        created=row["created"],
        format_version=row["format_version"],
    )


class ShardIndex(Mapping[str, CommitRecord]):
    """The committed shards of an OUTPUT, held as Arrow columns (one row per shard, by name).

    As a Mapping it gives each shard's `CommitRecord`, built on access, so holding the index of
    10^5 shards costs its columns, not 10^5 Python records. `table` holds the columns for
    vectorized use (`rows`, `row_groups`, ...); `records()` builds every record at once.

    `current` tells that the index object of `generation` lists exactly the committed shards (known
    from the lease, or from a LIST that matched it); `dropped` names indexed shards whose commit is
    gone; `broken` maps commits that cannot be parsed to why.
    """

    def __init__(
        self,
        table: pa.Table,
        *,
        generation: str | None = None,
        current: bool = False,
        dropped: Sequence[str] = (),
        broken: Mapping[str, str] | None = None,
    ):
        if table.num_rows:
            table = table.take(pc.sort_indices(table.column("name")))
        self.table = table
        self.generation = generation
        self.current = current
        self.dropped = list(dropped)
        self.broken = dict(broken or {})
        self.names: list[str] = table.column("name").to_pylist() if "name" in table.column_names else []
        self._pos = {n: i for i, n in enumerate(self.names)}

    # -- Mapping ---------------------------------------------------------------------------
    def __getitem__(self, name: str) -> CommitRecord:
        i = self._pos[name]
        return _record(self.table.slice(i, 1).to_pylist()[0])

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._pos

    # -- bulk ------------------------------------------------------------------------------
    def records(self) -> dict[str, CommitRecord]:
        """Every shard's `CommitRecord`, by name (columns not read stay empty, see `_record`)."""
        # Column by column: one Arrow -> Python conversion per column, not one dict per row.
        columns = {c: self.table.column(c).to_pylist() for c in self.table.column_names}
        keys = list(columns)
        return {name: _record(dict(zip(keys, values))) for name, values in zip(self.names, zip(*columns.values()))}

    def column(self, name: str) -> list:
        """One column as a Python list, in name order."""
        return self.table.column(name).to_pylist()

    def sources(self) -> dict[str, str]:
        """`canonical_url(source) -> name` of every shard that records its source URL."""
        out: dict[str, str] = {}
        for name, source in zip(self.names, self.table.column("source").to_pylist()):
            if source:
                out.setdefault(canonical_url(source), name)
        return out

    @property
    def total_rows(self) -> int:
        return int(pc.sum(self.table.column("rows")).as_py() or 0) if self.names else 0

    def channel_stats(self) -> ChannelStats | None:
        """The per-channel statistics of all shards merged (vectorized: no per-shard records)."""
        if not self.names or "stats" not in self.table.column_names:
            return None
        stats = self.table.column("stats").combine_chunks()
        valid = stats.is_valid()
        stats = stats.filter(valid)
        if len(stats) == 0:
            return None

        def matrix(field: str, dtype, fill: float) -> np.ndarray:
            lists = stats.field(field)
            values = pc.fill_null(lists.flatten(), fill).to_numpy(zero_copy_only=False).astype(dtype)
            return values.reshape(len(lists), -1)

        count = matrix("count", np.int64, 0)
        out = ChannelStats(count.shape[1])
        out.count = count.sum(axis=0)
        out.sum = matrix("sum", np.float64, 0.0).sum(axis=0)
        out.sumsq = matrix("sumsq", np.float64, 0.0).sum(axis=0)
        out.min = matrix("min", np.float64, np.inf).min(axis=0)
        out.max = matrix("max", np.float64, -np.inf).max(axis=0)
        out.nan = matrix("nan", np.int64, 0).sum(axis=0)
        out.inf = matrix("inf", np.int64, 0).sum(axis=0)
        return out

    @classmethod
    def from_records(
        cls, records: Mapping[str, CommitRecord], commits: Mapping[str, tuple[int, str]], **kwargs: Any
    ) -> ShardIndex:
        """An index of `records`, each covering the commit listed in `commits` (size, stamp)."""
        rows = [_row(r, commits.get(n, (0, ""))) for n, r in records.items()]
        return cls(pa.Table.from_pylist(rows, schema=index_schema()), **kwargs)


class WrittenCommits:
    """The commit records a job wrote, kept as index rows (Arrow, not Python records) as they come,
    so the index at the end of the run takes them as they are instead of reading them back."""

    _BATCH = 4096

    def __init__(self) -> None:
        self._rows: list[dict[str, Any]] = []
        self._tables: list[pa.Table] = []

    def add(self, record: CommitRecord) -> None:
        # The listing's size of the commit object tells whether this is what is stored now.
        self._rows.append(_row(record, (len(record.to_json().encode()), "")))
        if len(self._rows) >= self._BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            self._tables.append(pa.Table.from_pylist(self._rows, schema=index_schema()))
            self._rows = []

    def table(self) -> pa.Table:
        self._flush()
        return pa.concat_tables(self._tables) if self._tables else pa.Table.from_pylist([], schema=index_schema())


def _meta(generation: str, commits: int) -> dict[bytes, bytes]:
    info = {"version": INDEX_VERSION, "generation": generation, "commits": commits, "created": utc_now()}
    return {_META_KEY: json.dumps(info, sort_keys=True).encode()}


def write_index(
    root: str, index: ShardIndex, storage_options: Mapping[str, Any] | None = None, generation: str | None = None
) -> str:
    """Publish `index` as OUTPUT/index (one whole-object write); returns its generation."""
    generation = generation or new_generation()
    table = index.table.replace_schema_metadata(_meta(generation, len(index)))
    buf = io.BytesIO()
    # One row group per 16k shards: a projected read stays a few ranges however large the index.
    pq.write_table(table, buf, compression="zstd", row_group_size=16384)
    storage.put_bytes(index_url(root), buf.getvalue(), storage_options)
    index.generation = generation
    return generation


def _read_index(
    root: str, storage_options: Mapping[str, Any] | None, columns: Sequence[str] | None
) -> tuple[pa.Table, dict[str, Any]] | None:
    """OUTPUT/index as (table, metadata), None when absent. One GET (or a projected read)."""
    url = index_url(root)
    try:
        blob = storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        return None
    try:
        pf = pq.ParquetFile(io.BytesIO(blob))
        raw = (pf.schema_arrow.metadata or {}).get(_META_KEY)
        meta = json.loads(raw) if raw else {}
        if meta.get("version") != INDEX_VERSION:
            raise IndexReadError(f"{storage.redact(url)} has index version {meta.get('version')!r}, "
                              f"this code reads {INDEX_VERSION}")
        table = pf.read(columns=list(columns) if columns is not None else None)
    except (pa.ArrowException, ValueError) as e:
        raise IndexReadError(f"{storage.redact(url)} is not a readable index: {e}") from e
    return table.replace_schema_metadata(None), meta


def load_index(
    root: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    lease: LeaseRecord | None | bool = True,
    use_index: bool = True,
    columns: Sequence[str] | None = None,
) -> ShardIndex:
    """The committed shards of OUTPUT `root` (see the module docstring for the requests it costs).

    `lease`: True reads OUTPUT/lease to decide whether the index is current; a `LeaseRecord` (or
    None) is the lease as found by a caller that holds the lease now (`Lease.previous`).
    `use_index=False` ignores the index and reads every commit (`inspect --reindex`).
    `columns` restricts the columns read (``name`` and, when completing from a listing,
    ``commit_size`` and ``commit_stamp`` are always included); new commits read from a listing
    have every column.
    """
    so = dict(storage_options or {})
    loaded = None
    if use_index:
        try:
            loaded = _read_index(root, so, None if columns is None else _with_keys(columns))
        except IndexReadError as e:
            log.warning("%s; reading the commit records instead", e)
    if loaded is not None:
        table, meta = loaded
        generation = meta.get("generation")
        if lease is True:
            try:
                lease = read_lease(root, so)
            except LeaseError as e:
                log.warning("%s; listing the commits", e)
                lease = None
        if isinstance(lease, LeaseRecord) and lease.released and generation and lease.generation == generation:
            return ShardIndex(table, generation=generation, current=True)
    else:
        table = pa.Table.from_pylist([], schema=index_schema())
        if columns is not None:
            table = table.select(_with_keys(columns))
        generation = None
    return _complete(root, so, table, generation)


def _with_keys(columns: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(["name", *columns, "commit_size", "commit_stamp"]))


def _complete(
    root: str, so: dict[str, Any], table: pa.Table, generation: str | None, written: WrittenCommits | None = None
) -> ShardIndex:
    """The index rows still backed by an unchanged commit, plus every other listed commit: taken
    from `written` when it holds that very commit (same size), else read."""
    listing = list_commits(root, so)
    names = table.column("name").to_pylist()
    sizes = table.column("commit_size").to_pylist()
    stamps = table.column("commit_stamp").to_pylist()
    keep = []
    dropped = []
    for name, size, stamp in zip(names, sizes, stamps):
        listed = listing.get(name)
        if listed is None:
            dropped.append(name)
            keep.append(False)
        else:
            keep.append(listed[0] == size and (not stamp or not listed[1] or listed[1] == stamp))
    if dropped:
        shown = ", ".join(dropped[:10]) + (" ..." if len(dropped) > 10 else "")
        log.warning("%s: %d indexed shard(s) have no commit record any more and are left out: %s",
                    storage.redact(root), len(dropped), shown)
    kept = table.filter(pa.array(keep, pa.bool_())) if names else table
    # The index file still says exactly what the listing does (it needs no rewrite) when every row
    # of it is kept and nothing else is listed.
    unchanged = generation is not None and kept.num_rows == len(names) == len(listing)
    kept_names = set(kept.column("name").to_pylist())
    new = [n for n in sorted(listing) if n not in kept_names]
    if written is not None and new:
        known = written.table()
        if known.num_rows:
            wanted = set(new)
            take = [i for i, (n, size) in enumerate(zip(known.column("name").to_pylist(),
                                                         known.column("commit_size").to_pylist()))
                    if n in wanted and listing[n][0] == size]
            if take:
                # The last write of a shard wins (a retried shard may have committed twice).
                rows = known.take(pa.array(take, pa.int64()))
                rows = rows.take(pa.array(sorted({n: i for i, n in enumerate(rows.column("name").to_pylist())}.values()),
                                          pa.int64()))
                rows = rows.select(kept.column_names)
                kept = pa.concat_tables([kept, rows]) if kept.num_rows else rows
                got = set(rows.column("name").to_pylist())
                new = [n for n in new if n not in got]
    blobs = storage.read_many([commit_url(root, n) for n in new], so)
    records: dict[str, CommitRecord] = {}
    broken: dict[str, str] = {}
    for name in new:
        blob = blobs.get(commit_url(root, name))
        if blob is None:
            continue  # removed between listing and reading
        try:
            records[name] = CommitRecord.from_json(blob, name)
        except CommitError as e:
            broken[name] = str(e)
    if records:
        fresh = ShardIndex.from_records(records, listing).table.select(kept.column_names)
        kept = pa.concat_tables([kept, fresh]) if kept.num_rows else fresh
    return ShardIndex(kept, generation=generation, current=unchanged, dropped=dropped, broken=broken)


def refresh_index(
    root: str,
    storage_options: Mapping[str, Any] | None = None,
    base: ShardIndex | None = None,
    written: WrittenCommits | None = None,
) -> ShardIndex:
    """Bring the index up to date with a LIST of `_commits/` and publish it (a new generation).

    `base` is the index as the caller last read it with every column (the driver's plan): its rows
    are kept where their commit is unchanged. `written` holds the commits the caller wrote since:
    they are taken as they are. Only other commits are read.
    """
    so = dict(storage_options or {})
    if base is None or not base.table.schema.equals(index_schema()):
        loaded = None
        try:
            loaded = _read_index(root, so, None)
        except IndexReadError as e:
            log.warning("%s; rebuilding it from the commit records", e)
        base = ShardIndex(loaded[0], generation=loaded[1].get("generation")) if loaded else None
    table = base.table if base is not None else pa.Table.from_pylist([], schema=index_schema())
    index = _complete(root, so, table, base.generation if base is not None else None, written)
    write_index(root, index, so)
    return index


def reindex(root: str, storage_options: Mapping[str, Any] | None = None, *, force: bool = False) -> ShardIndex:
    """Rebuild OUTPUT/index from every commit record (`inspect --reindex`), under the lease.

    Raises `LeaseHeld` when a job is writing OUTPUT (`force` takes the lease over). One GET per
    commit: the repair for an index that is lost or suspected wrong, not a routine step.
    """
    lease = Lease(root, storage_options, holder=f"inspect --reindex ({default_holder()})").acquire(force=force)
    generation = None
    try:
        index = load_index(root, storage_options, use_index=False)
        generation = write_index(root, index, storage_options)
        return index
    finally:
        lease.release(generation)
