"""Write one output shard: latent rows, the bad-sample ledger, the QA side table, then the commit.

Everything is first written to local temporary files; `commit()` uploads each file as one whole
object and publishes the commit record last, so a crash at any point leaves at most uncommitted
files that the next attempt replaces.

The row types are in `rows.py`, the table schemas and stored dtypes in `schema.py`, one module
per shard format (`format_parquet.py`, `format_wds.py`), the ledger and the QA side table in
`side_tables.py`; this module puts them together and publishes the result.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any, Protocol

import numpy as np

from . import storage
from .commit import ChannelStats, CommitRecord, write_commit
from .format_parquet import ParquetShardFormat
from .format_wds import WdsShardFormat
from .layout import commit_url, errors_relpath, qa_sample_relpath, shard_ext, shard_relpath
from .manifest import DTYPES, FORMAT_VERSION, Manifest
from .rows import ErrorRow, LatentRow, QARow, RowChecker, WriterError
from .schema import (
    LATENT_COLUMNS,  # noqa: F401  (pipeline.dataset still imports it from here)
    ShardColumns,
    from_storage,
    scale_column,
    stored_columns,
)
from .side_tables import ErrorLedger, QASamples
from .writer_thread import WriterThread

__all__ = [
    "LatentRow",
    "ErrorRow",
    "QARow",
    "ShardWriter",
    "WriterThread",
    "WriterError",
]


class ShardFormat(Protocol):
    """How latent rows become one shard file; constructing one opens the file at `path`."""

    suffix: str  # the file's extension (as `layout.shard_ext`)

    def __init__(self, path: str, columns: ShardColumns, manifest: Manifest | None): ...

    @staticmethod
    def rows_per_group(row_bytes: int) -> int:
        """Rows to hand `write_rows` at once, for rows of `row_bytes` stored latent bytes each."""
        ...

    def write_rows(self, rows: list[LatentRow], stored: dict[str, list[np.ndarray]]) -> None:
        """Append `rows`; `stored` holds their latents in stored form, per latent column."""
        ...

    def finish(self) -> None:
        """Complete and close the file (a valid file even without rows)."""
        ...

    def close(self) -> None:
        """Close the file as it is."""
        ...


_FORMATS: dict[str, type[ShardFormat]] = {"parquet": ParquetShardFormat, "wds": WdsShardFormat}


def _manifest_from(info: Manifest | Mapping[str, Any] | None) -> Manifest | None:
    if info is None or isinstance(info, Manifest):
        return info
    return Manifest.from_dict(info)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in storage.iter_chunks(f):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Writes output shard NAME under OUTPUT `root`.

    Parameters
    ----------
    root, name: OUTPUT URL and shard name (see `layout.shard_name`).
    fmt: "parquet" or "wds" (WebDataset tar of `.npy` latents).
    dtype: stored latent dtype, "fp32", "fp16", "bf16" or "fp8_e4m3" (see `schema`).
    manifest_info: the output's `Manifest` (or its dict). It fixes the columns: one latent shape
        gives a fixed-size list column, several (aspect buckets) a variable list plus
        `latent_shape`; `store="mean+logvar"` adds `logvar`; `flip` adds the flipped columns.
        Without it the columns follow the first row and shapes may vary.
    row_group_rows: rows per Parquet row group (default: about 32 MiB of latents).
    fresh: the caller knows NAME has no valid commit (the plan handed it out as to do), so
        `commit()` skips deleting a previous commit record: one request less per shard.

    Use as a context manager: leaving the block without `commit()` discards the temporary files.
    Sources and error messages are stored without credentials.
    """

    def __init__(
        self,
        root: str,
        name: str,
        fmt: str = "parquet",
        dtype: str = "fp32",
        storage_options: Mapping[str, Any] | None = None,
        manifest_info: Manifest | Mapping[str, Any] | None = None,
        *,
        row_group_rows: int | None = None,
        tmp_dir: str | None = None,
        fresh: bool = False,
    ):
        shard_ext(fmt)  # validates fmt
        if dtype not in DTYPES:
            raise WriterError(f"unknown latent dtype {dtype!r} for shard {name!r}; expected one of {DTYPES}")
        self.root = root
        self.name = name
        self.fmt = fmt
        self.dtype = dtype
        self.storage_options = dict(storage_options or {})
        self.manifest = _manifest_from(manifest_info)
        self.row_group_rows = row_group_rows
        self.fresh = fresh
        self._format = _FORMATS[fmt]
        self._tmp = tempfile.mkdtemp(prefix=f"shard-{name}-", dir=tmp_dir)
        self._data_path = os.path.join(self._tmp, f"{name}.{self._format.suffix}")
        self._out: ShardFormat | None = None  # opened when the columns are known
        self._closed = False
        self._check = RowChecker(name, self.manifest)
        self._rows = 0
        self._row_groups: list[int] = []
        self._pending: list[LatentRow] = []
        self._pending_bytes = 0
        self._errors = ErrorLedger()
        self._qa = QASamples()
        self._shapes: Counter[str] = Counter()
        self._stats: ChannelStats | None = None
        self._sources: Counter[str] = Counter()

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if not self._closed:
            self.abort()

    # -- public API ------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        """Rows accepted so far."""
        return self._rows + len(self._pending)

    def write(self, rows: Iterable[LatentRow]) -> None:
        """Add latent rows (in order). Raises WriterError naming the key of a row that does not fit."""
        self._check_open()
        for row in rows:
            self._check.check(row)
            self._pending.append(replace(row, source=storage.redact(row.source)))
            self._pending_bytes += self._check.stored_bytes(row, self.dtype)
            if len(self._pending) >= self._group_rows():
                self._flush()

    def add_error(self, error: ErrorRow) -> None:
        """Record a bad sample in the ledger."""
        self._check_open()
        self._errors.add(error)

    def add_qa_rows(self, rows: Iterable[QARow]) -> None:
        """Keep QA samples for this shard (written to qa/samples/NAME.parquet on commit)."""
        self._check_open()
        self._qa.add(rows)

    def commit(self) -> CommitRecord:
        """Publish the shard: upload data, ledger (when there are bad samples) and QA table (when it
        keeps QA samples) whole, then the commit record.

        A previous commit record is deleted first, so it never vouches for the files about to be
        replaced, unless the writer is `fresh`: then a shard without errors or QA samples costs
        2 requests on an object store. Readers trust only the files a commit lists, so a stale
        ledger or QA table of an earlier attempt needs no deleting.
        """
        self._check_open()
        try:
            self._flush()
            self._open_output().finish()
            files_local: dict[str, str] = {shard_relpath(self.name, self.fmt): self._data_path}
            if len(self._errors):
                errors_path = os.path.join(self._tmp, "errors.parquet")
                self._errors.write(errors_path)
                files_local[errors_relpath(self.name)] = errors_path
            if self._qa:
                qa_path = os.path.join(self._tmp, "qa.parquet")
                self._qa.write(qa_path)
                files_local[qa_sample_relpath(self.name)] = qa_path
            files = {
                rel: {"size": os.path.getsize(path), "sha256": _sha256_file(path)} for rel, path in files_local.items()
            }
            if not self.fresh:
                storage.remove(commit_url(self.root, self.name), self.storage_options)
            for rel, path in files_local.items():
                storage.put_file(path, storage.join(self.root, rel), self.storage_options, move=True)
            record = CommitRecord(
                name=self.name,
                format=self.fmt,
                dtype=self.dtype,
                rows=self._rows,
                errors=len(self._errors),
                files=files,
                stats=self._stats.to_dict() if self._stats is not None else {},
                errors_by_reason=self._errors.by_reason(),
                shapes=dict(sorted(self._shapes.items())),
                row_groups=list(self._row_groups),
                qa_rows=len(self._qa),
                source=self._source(),
                format_version=FORMAT_VERSION,
            )
            write_commit(self.root, record, self.storage_options)
            return record
        finally:
            self._cleanup()

    def abort(self) -> None:
        """Discard everything written so far; nothing is published."""
        if self._closed:
            return
        try:
            if self._out is not None:
                self._out.close()
        except Exception:
            pass
        self._cleanup()

    # -- internals -------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise WriterError(f"shard writer {self.name!r} is already committed or aborted")

    def _cleanup(self) -> None:
        self._closed = True
        self._out = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _source(self) -> str | None:
        if self._sources:
            return self._sources.most_common(1)[0][0]
        if self._errors:
            return self._errors.rows[0].source
        return None

    def _group_rows(self) -> int:
        if self.row_group_rows:
            return self.row_group_rows
        return self._format.rows_per_group(max(1, self._pending_bytes // max(1, len(self._pending))))

    def _open_output(self) -> ShardFormat:
        """The shard file, opened once the first row (or the manifest) has fixed the columns."""
        if self._out is None:
            channels = self._check.channels
            if channels is None:
                channels = int(self.manifest.latent_channels) if self.manifest is not None else 0
            columns = ShardColumns(self.dtype, self._check.latent_columns(), self._check.fixed_shape, channels,
                                   text=self._check.text_layout or None)
            self._out = self._format(self._data_path, columns, self.manifest)
        return self._out

    def _flush(self) -> None:
        if not self._pending:
            return
        rows, self._pending, self._pending_bytes = self._pending, [], 0
        columns = self._check.latent_columns()
        stored: dict[str, list[np.ndarray]] = {}
        for col in columns:
            stored.update(stored_columns(col, [getattr(r, col) for r in rows], self.dtype))
        # Statistics describe what readers get back, i.e. the stored (rounded) values; same-shape
        # latents are reduced together.
        if self._stats is None:
            self._stats = ChannelStats(self._check.channels)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, arr in enumerate(stored["latent"]):
            by_shape.setdefault(arr.shape, []).append(i)
        scales = stored.get(scale_column("latent"))
        for idx in by_shape.values():
            self._stats.update(from_storage(np.stack([stored["latent"][i] for i in idx]), self.dtype,
                                            np.stack([scales[i] for i in idx]) if scales is not None else None))
        for r in rows:
            self._shapes["x".join(str(v) for v in np.shape(r.latent))] += 1
            self._sources[r.source] += 1
        self._open_output().write_rows(rows, stored)
        self._rows += len(rows)
        self._row_groups.append(len(rows))
