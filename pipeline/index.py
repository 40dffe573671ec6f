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
   committed since: the index is the answer (2 requests, whatever the shard count). A reader that
   asks for a few columns (a training rank) GETs the index's last MiB instead, which holds the
   footer (and all of an index of up to about 2,500 shards), then only the byte ranges of those
   columns, one per 16k shards: at 10^5 shards 8 requests and 3 MB instead of one of 41 MB.
2. Otherwise (a job is running or crashed, or the output predates leases) it LISTs `_commits/`
   (names, sizes and ETags or mtimes; 1 request per 1000 shards), keeps the index rows whose
   commit is listed unchanged, GETs only the commits that are new or changed, and drops, with a
   warning, indexed shards whose commit is gone.
3. Without an index (or with an unreadable one) it reads every commit, as before indexes.

Each row records the size and ETag (or mtime) of the commit it was made from: that is how the
index says which commits it covers.
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from .commit import ChannelStats, CommitError, CommitRecord, read_commits
from .jsonutil import utc_now
from .layout import COMMITS_DIR, canonical_url, index_url
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


#: What a training reader plans from and opens shards with: at 10^5 shards a rank fetches about 3 MB
#: of the 41 MB index (records built from them have only the shard file, its size and, with
#: ``shard_sha256`` added, its sha256; counts, statistics and provenance stay empty).
READER_COLUMNS = ("name", "format", "dtype", "rows", "row_groups", "shard_file", "shard_size")


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
    if "files" in row:
        files = {f["path"]: {"size": f["size"], "sha256": f["sha256"]} for f in row["files"]}
    elif row.get("shard_file"):
        files = {row["shard_file"]: {"size": row.get("shard_size"), "sha256": row.get("shard_sha256")}}
    else:
        files = {}
    return CommitRecord(
        name=row["name"],
        format=row["format"],
        dtype=row["dtype"],
        rows=row["rows"],
        errors=row.get("errors") or 0,
        files=files,
        stats=dict(row["stats"]) if row.get("stats") else {},
        errors_by_reason=dict(row.get("errors_by_reason") or []),
        shapes=dict(row.get("shapes") or []),
        row_groups=list(row.get("row_groups") or []),
        qa_rows=row.get("qa_rows") or 0,
        source=row.get("source"),
        created=row.get("created") or "",
        format_version=row.get("format_version") or 1,
    )


def _empty() -> pa.Table:
    # Not `from_pylist([])` nor `schema.empty_table()`: both import pandas (0.2 s in a fresh process).
    return pa.Table.from_batches([], schema=index_schema())


def _sorted(names: pa.ChunkedArray) -> bool:
    """True when `names` ascend already, as in every index written (no sort, no copy)."""
    return pc.all(pc.less_equal(names[:-1], names[1:])).as_py() is not False


class ShardIndex(Mapping[str, CommitRecord]):
    """The committed shards of an OUTPUT, held as Arrow columns (one row per shard, by name).

    As a Mapping it gives each shard's `CommitRecord`, built on access, so holding the index of
    10^5 shards costs its columns, not 10^5 Python records; the names (`names`, and their positions
    for lookups by name) become Python objects when first used. `at(i)` gives the record of the
    i-th shard without them. `table` holds the columns for vectorized use (`rows`, `row_groups`,
    ...); `records()` builds every record at once.

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
        if table.num_rows > 1 and not _sorted(table.column("name")):
            table = table.take(pc.sort_indices(table.column("name")))
        self.table = table
        self.generation = generation
        self.current = current
        self.dropped = list(dropped)
        self.broken = dict(broken or {})

    @cached_property
    def names(self) -> list[str]:
        """Every shard's name, sorted."""
        return self.table.column("name").to_pylist() if "name" in self.table.column_names else []

    @cached_property
    def _positions(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def at(self, i: int) -> CommitRecord:
        """The `CommitRecord` of the i-th shard in name order."""
        return _record(self.table.slice(i, 1).to_pylist()[0])

    # -- Mapping ---------------------------------------------------------------------------
    def __getitem__(self, name: str) -> CommitRecord:
        return self.at(self._positions[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return self.table.num_rows

    def __contains__(self, name: object) -> bool:
        return name in self._positions

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
        return int(pc.sum(self.table.column("rows")).as_py() or 0) if len(self) else 0

    def channel_stats(self) -> ChannelStats | None:
        """The per-channel statistics of all shards merged (vectorized: no per-shard records)."""
        if not len(self) or "stats" not in self.table.column_names:
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
        table = pa.Table.from_pylist(rows, schema=index_schema()) if rows else _empty()
        return cls(table, **kwargs)


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
        return pa.concat_tables(self._tables) if self._tables else _empty()


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


#: A projected read first GETs this many bytes from the end of the index: the footer, and the
#: whole index when it is smaller (up to about 2,500 shards).
_TAIL = 1 << 20
#: Wanted column chunks less than this apart are fetched in one request (a request costs more).
_GAP = 1 << 20


class _Parts(io.RawIOBase):
    """A read-only file of `size` bytes of which only `parts` (`{offset: bytes}`) are known: what a
    projected read hands pyarrow, which reads nothing else (the footer is given to it parsed)."""

    def __init__(self, parts: Mapping[int, bytes], size: int):
        self._parts = dict(parts)
        self._starts = sorted(self._parts)
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = offset + (0, self._pos, self._size)[whence]
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._pos + n, self._size)
        i = bisect.bisect_right(self._starts, self._pos) - 1
        start = self._starts[i] if i >= 0 else 0
        part = self._parts.get(start, b"")
        if end > start + len(part):
            raise OSError(f"bytes {self._pos}-{end} of the index were not fetched")
        out = part[self._pos - start : end - start]
        self._pos = end
        return out


class _StoredIndex:
    """OUTPUT/index as stored: its footer (key-value metadata, column chunk offsets) and the bytes
    fetched so far, from which `read` decodes columns."""

    def __init__(self, url: str, so: Mapping[str, Any], parts: dict[int, bytes], size: int, meta: pq.FileMetaData):
        self.url = url
        self.so = so
        self.parts = parts
        self.size = size
        self.meta = meta
        raw = (meta.metadata or {}).get(_META_KEY)
        try:
            info = json.loads(raw) if raw else {}
        except ValueError as e:
            raise IndexReadError(f"{storage.redact(url)} is not a readable index: {e}") from e
        if info.get("version") != INDEX_VERSION:
            raise IndexReadError(f"{storage.redact(url)} has index version {info.get('version')!r}, "
                                 f"this code reads {INDEX_VERSION}")
        self.generation: str | None = info.get("generation")

    @classmethod
    def open(cls, root: str, so: Mapping[str, Any], *, whole: bool) -> _StoredIndex | None:
        """The index of `root`, None when there is none. `whole`: one GET of all of it (to read
        every column); else one GET of its last `_TAIL` bytes (two when the footer is larger)."""
        url = index_url(root)
        try:
            if whole:
                blob = storage.read_bytes(url, so)
                return cls._parse(url, so, blob, len(blob))
            fs, path = storage.filesystem(url, so)
            try:
                tail = fs.cat_file(path, start=-_TAIL)
            except FileNotFoundError:
                raise
            except OSError:
                # An empty object has no range to GET (HTTP 416); a real failure raises here again.
                tail = storage.read_bytes(url, so)
            if len(tail) < _TAIL:
                return cls._parse(url, so, tail, len(tail))  # the whole index
            footer = int.from_bytes(tail[-8:-4], "little") + 8
            if footer > len(tail) and tail[-4:] == b"PAR1":
                tail = _fetch(fs, path, url, [(-footer, None)])[0]
            return cls._parse(url, so, tail, None)
        except FileNotFoundError:
            return None

    @classmethod
    def _parse(cls, url: str, so: Mapping[str, Any], tail: bytes, size: int | None) -> _StoredIndex:
        """Parse the footer at the end of `tail`, the last bytes of an index of `size` bytes (None:
        unknown, then worked out from the footer)."""
        footer = int.from_bytes(tail[-8:-4], "little") + 8
        if len(tail) < 12 or tail[-4:] != b"PAR1" or footer > len(tail):
            raise IndexReadError(f"{storage.redact(url)} is not a readable index: no Parquet footer")
        try:
            meta = pq.read_metadata(io.BytesIO(b"PAR1" + tail[-footer:]))
        except (pa.ArrowException, OSError, ValueError) as e:
            raise IndexReadError(f"{storage.redact(url)} is not a readable index: {e}") from e
        if size is None:
            size = _file_size(meta, footer)
            if size is None or size < len(tail):
                fs, path = storage.filesystem(url, so)
                size = int(fs.size(path))
        return cls(url, so, {size - len(tail): tail}, size, meta)

    def read(self, columns: Sequence[str] | None) -> pa.Table:
        """The table of `columns` (None: all), fetching the byte ranges not in hand in one
        request each (concurrently on object stores)."""
        if columns is not None:
            missing = [r for r in _chunk_ranges(self.meta, columns) if not self._has(*r)]
            if missing:
                fs, path = storage.filesystem(self.url, self.so)
                self.parts.update({a: blob for (a, _), blob in zip(missing, _fetch(fs, path, self.url, missing))})
        whole = self.parts.get(0, b"")
        # A whole index is read in place; of a partial one, pyarrow reads the ranges fetched.
        source = pa.BufferReader(whole) if len(whole) == self.size else _Parts(self.parts, self.size)
        try:
            pf = pq.ParquetFile(source, metadata=self.meta)
            wanted = list(columns) if columns is not None else None
            # Row group by row group on this thread: the same table, and at 10^5 shards a peak of
            # memory about 15 MB lower than with decoding threads (each with its own heap).
            groups = [pf.read_row_group(i, columns=wanted, use_threads=False) for i in range(pf.num_row_groups)]
            table = pa.concat_tables(groups) if groups else pf.read(columns=wanted, use_threads=False)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise IndexReadError(f"{storage.redact(self.url)} is not a readable index: {e}") from e
        return table.replace_schema_metadata(None)

    def _has(self, start: int, end: int) -> bool:
        return any(a <= start and end <= a + len(blob) for a, blob in self.parts.items())


def _file_size(meta: pq.FileMetaData, footer: int) -> int | None:
    """The size of a Parquet file whose footer (with its length and magic) is `footer` bytes: the
    end of its last column chunk plus the footer, when nothing (page indexes, bloom filters) lies
    between them; None when something may."""
    end = 4
    for r in range(meta.num_row_groups):
        group = meta.row_group(r)
        for c in range(group.num_columns):
            chunk = group.column(c)
            if chunk.has_column_index or chunk.has_offset_index or chunk.bloom_filter_offset is not None:
                return None
            end = max(end, _chunk_start(chunk) + chunk.total_compressed_size)
    return end + footer


def _chunk_start(chunk: pq.ColumnChunkMetaData) -> int:
    return chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset


def _chunk_ranges(meta: pq.FileMetaData, columns: Sequence[str]) -> list[tuple[int, int]]:
    """Byte ranges of the column chunks of `columns`, neighbours less than `_GAP` apart merged:
    the wanted columns come first in each row group, so one range per row group."""
    wanted = set(columns)
    spans = []
    for r in range(meta.num_row_groups):
        group = meta.row_group(r)
        for c in range(group.num_columns):
            chunk = group.column(c)
            if chunk.path_in_schema.split(".", 1)[0] in wanted:
                start = _chunk_start(chunk)
                spans.append((start, start + chunk.total_compressed_size))
    merged: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if merged and a - merged[-1][1] <= _GAP:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def _fetch(fs, path: str, url: str, ranges: Sequence[tuple[int, int | None]]) -> list[bytes]:
    """The bytes of `ranges` of one object (a negative start counts from its end), one GET each."""
    try:
        got = fs.cat_ranges([path] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges], on_error="raise")
    except FileNotFoundError:
        raise
    except OSError as e:
        raise storage.StorageError(f"could not read {storage.redact(url)}: {e}") from e
    return list(got)


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
    ``commit_size`` and ``commit_stamp`` are always included) and fetches only their byte ranges;
    new commits read from a listing have every column.
    """
    so = dict(storage_options or {})
    table = None
    generation = None
    if use_index:
        try:
            stored = _StoredIndex.open(root, so, whole=columns is None)
            if stored is not None:
                generation = stored.generation
                if lease is True:
                    try:
                        lease = read_lease(root, so)
                    except LeaseError as e:
                        log.warning("%s; listing the commits", e)
                        lease = None
                if isinstance(lease, LeaseRecord) and lease.released and generation and lease.generation == generation:
                    wanted = None if columns is None else list(dict.fromkeys(["name", *columns]))
                    return ShardIndex(stored.read(wanted), generation=generation, current=True)
                table = stored.read(None if columns is None else _with_keys(columns))
        except IndexReadError as e:
            log.warning("%s; reading the commit records instead", e)
            table = generation = None
    if table is None:
        table = _empty()
        if columns is not None:
            table = table.select(_with_keys(columns))
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
    records, broken = read_commits(root, new, so)
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
        base = None
        try:
            stored = _StoredIndex.open(root, so, whole=True)
            if stored is not None:
                base = ShardIndex(stored.read(None), generation=stored.generation)
        except IndexReadError as e:
            log.warning("%s; rebuilding it from the commit records", e)
    table = base.table if base is not None else _empty()
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
