"""Write one output shard: latent rows, the bad-sample ledger, the QA side table, then the commit.

Everything is first written to local temporary files; `commit()` uploads each file as one whole
object and publishes the commit record last, so a crash at any point leaves at most uncommitted
files that the next attempt replaces.

Parquet schema of `shards/NAME.parquet` (see the README for the full table):

    key            string
    source         string          input shard URL (credentials removed)
    index          int64           position of the sample in its input shard
    latent         fixed_size_list<float32|float16|uint16>[C*h*w]   (list<...> when shapes vary)
    logvar         same as latent  (only when the manifest stores mean+logvar)
    latent_flip    same as latent  (only when flipped latents are stored)
    logvar_flip    same as latent  (flip and mean+logvar)
    latent_shape   fixed_size_list<int32>[3]  (only when shapes vary: aspect buckets)
    caption        string, nullable
    meta           string          the sample's JSON metadata, as text
    original_size  fixed_size_list<int32>[2]  (h, w) before resizing
    crop_top_left  fixed_size_list<int32>[2]  (top, left) of the crop in resized coordinates
    target_size    fixed_size_list<int32>[2]  (h, w) of the encoded image

Latents are raw (unscaled), row-major C,h,w. bf16 is stored as its uint16 bit pattern with
`dtype: bf16` in the field metadata (Arrow has no bfloat16).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .commit import ChannelStats, CommitRecord, write_commit
from .layout import commit_url, errors_relpath, qa_sample_relpath, shard_ext, shard_relpath
from .manifest import DTYPES, FORMAT_VERSION, Manifest

__all__ = [
    "LatentRow",
    "ErrorRow",
    "QARow",
    "ShardWriter",
    "WriterError",
    "SCHEMA_METADATA_KEY",
    "LATENT_COLUMNS",
    "to_storage",
    "from_storage",
    "storage_numpy_dtype",
    "storage_arrow_type",
    "errors_schema",
    "qa_schema",
]

SCHEMA_METADATA_KEY = b"latent_precompute"
LATENT_COLUMNS = ("latent", "logvar", "latent_flip", "logvar_flip")
# Uncompressed latent bytes per Parquet row group: large enough for efficient ranged reads from
# object storage, small enough that a reader starts quickly and holds little memory.
ROW_GROUP_BYTES = 32 * 1024 * 1024
MAX_ROW_GROUP_ROWS = 8192


class WriterError(ValueError):
    """A row does not fit the shard being written; the message names the key and field."""


@dataclass
class LatentRow:
    """One encoded sample. Latents are float32 `[C, h, w]`, raw (unscaled)."""

    key: str
    source: str
    index: int
    latent: np.ndarray
    logvar: np.ndarray | None = None
    latent_flip: np.ndarray | None = None
    logvar_flip: np.ndarray | None = None
    caption: str | None = None
    meta: str = "{}"
    original_size: tuple[int, int] = (0, 0)
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] = (0, 0)


@dataclass
class ErrorRow:
    """One bad sample: which stage rejected it, the error type or reason, and the message."""

    key: str
    source: str
    stage: str
    error: str
    message: str


@dataclass
class QARow:
    """A QA sample: the pixels exactly as encoded (uint8 HWC) and the unrounded posterior mean."""

    key: str
    source: str
    pixels: np.ndarray
    latent: np.ndarray
    bucket: str


def storage_numpy_dtype(dtype: str) -> np.dtype:
    """numpy dtype of stored latent values for a manifest dtype."""
    return {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16), "bf16": np.dtype(np.uint16)}[dtype]


def storage_arrow_type(dtype: str) -> pa.DataType:
    return {"fp32": pa.float32(), "fp16": pa.float16(), "bf16": pa.uint16()}[dtype]


def to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 array -> stored representation (float32, float16, or bf16 bits as uint16)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "fp32":
        return x
    if dtype == "fp16":
        return x.astype(np.float16)
    if dtype == "bf16":
        bits = x.view(np.uint32)
        # Round to nearest even on the 16 dropped mantissa bits; NaN stays a quiet NaN.
        rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
        out = rounded.astype(np.uint16)
        nan = np.isnan(x)
        if nan.any():
            out[nan] = ((bits[nan] >> 16) & 0x8000) | 0x7FC0
        return out
    raise ValueError(f"unknown latent dtype {dtype!r}; expected one of {DTYPES}")


def from_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """Stored representation -> float32 array."""
    if dtype == "bf16":
        return (np.asarray(x, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype in ("fp32", "fp16"):
        return np.asarray(x).astype(np.float32, copy=False)
    raise ValueError(f"unknown latent dtype {dtype!r}; expected one of {DTYPES}")


def _size_type() -> pa.DataType:
    return pa.list_(pa.int32(), 2)


def errors_schema() -> pa.Schema:
    """Schema of errors/NAME.parquet, the bad-sample ledger."""
    return pa.schema(
        [
            pa.field("key", pa.string()),
            pa.field("source", pa.string()),
            pa.field("stage", pa.string()),
            pa.field("error", pa.string()),
            pa.field("message", pa.string()),
        ]
    )


def qa_schema() -> pa.Schema:
    """Schema of qa/samples/NAME.parquet: pixels as raw HWC uint8 bytes, latent as float32."""
    return pa.schema(
        [
            pa.field("key", pa.string()),
            pa.field("source", pa.string()),
            pa.field("bucket", pa.string()),
            pa.field("pixels", pa.binary()),
            pa.field("pixels_shape", pa.list_(pa.int32(), 3)),
            pa.field("latent", pa.list_(pa.float32())),
            pa.field("latent_shape", pa.list_(pa.int32(), 3)),
        ]
    )


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
    dtype: stored latent dtype, "fp32", "fp16" or "bf16".
    manifest_info: the output's `Manifest` (or its dict). It fixes the columns: one latent shape
        gives a fixed-size list column, several (aspect buckets) a variable list plus
        `latent_shape`; `store="mean+logvar"` adds `logvar`; `flip` adds the flipped columns.
        Without it the columns follow the first row and shapes may vary.
    row_group_rows: rows per Parquet row group (default: about 32 MiB of latents).

    Use as a context manager: leaving the block without `commit()` discards the temporary files.
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
        self._tmp = tempfile.mkdtemp(prefix=f"shard-{name}-", dir=tmp_dir)
        self._data_path = os.path.join(self._tmp, f"{name}.{shard_ext(fmt)}")
        self._closed = False
        self._rows = 0
        self._row_groups: list[int] = []
        self._pending: list[LatentRow] = []
        self._pending_bytes = 0
        self._errors: list[ErrorRow] = []
        self._qa: list[QARow] = []
        self._shapes: Counter[str] = Counter()
        self._stats: ChannelStats | None = None
        self._sources: Counter[str] = Counter()
        self._keys: set[str] = set()
        # Column layout, fixed by the manifest or by the first row.
        self._fixed_shape: tuple[int, ...] | None = None
        self._variable = True
        self._has_logvar: bool | None = None
        self._has_flip: bool | None = None
        if self.manifest is not None:
            if self.manifest.fixed_shape is not None:
                self._fixed_shape = tuple(self.manifest.fixed_shape)
                self._variable = False
            self._has_logvar = self.manifest.has_logvar
            self._has_flip = bool(self.manifest.flip)
        self._pq_writer: pq.ParquetWriter | None = None
        self._tar: tarfile.TarFile | None = None

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
            self._check_row(row)
            self._pending.append(row)
            self._pending_bytes += row.latent.size * storage_numpy_dtype(self.dtype).itemsize * self._latents_per_row()
            if len(self._pending) >= self._group_rows():
                self._flush()

    def add_error(self, error: ErrorRow) -> None:
        """Record a bad sample in the ledger."""
        self._check_open()
        self._errors.append(
            ErrorRow(
                key=str(error.key),
                source=storage.redact(str(error.source)),
                stage=str(error.stage),
                error=str(error.error),
                message=storage.redact(str(error.message)),
            )
        )

    def add_qa_rows(self, rows: Iterable[QARow]) -> None:
        """Keep QA samples for this shard (written to qa/samples/NAME.parquet on commit)."""
        self._check_open()
        for row in rows:
            pixels = np.asarray(row.pixels)
            if pixels.dtype != np.uint8 or pixels.ndim != 3:
                raise WriterError(f"QA row {row.key!r}: pixels must be uint8 [H, W, 3], got {pixels.dtype} {pixels.shape}")
            self._qa.append(row)

    def commit(self) -> CommitRecord:
        """Publish the shard: upload data, ledger and QA table whole, then the commit record."""
        self._check_open()
        try:
            self._flush()
            self._finish_data()
            files_local: dict[str, str] = {shard_relpath(self.name, self.fmt): self._data_path}
            errors_path = os.path.join(self._tmp, "errors.parquet")
            self._write_errors(errors_path)
            files_local[errors_relpath(self.name)] = errors_path
            if self._qa:
                qa_path = os.path.join(self._tmp, "qa.parquet")
                self._write_qa(qa_path)
                files_local[qa_sample_relpath(self.name)] = qa_path
            files = {
                rel: {"size": os.path.getsize(path), "sha256": _sha256_file(path)} for rel, path in files_local.items()
            }
            # A previous commit must not vouch for the files about to be replaced.
            storage.remove(commit_url(self.root, self.name), self.storage_options)
            if not self._qa:
                storage.remove(storage.join(self.root, qa_sample_relpath(self.name)), self.storage_options)
            for rel, path in files_local.items():
                storage.put_file(path, storage.join(self.root, rel), self.storage_options, move=True)
            by_reason = Counter(f"{e.stage}/{e.error}" for e in self._errors)
            record = CommitRecord(
                name=self.name,
                format=self.fmt,
                dtype=self.dtype,
                rows=self._rows,
                errors=len(self._errors),
                files=files,
                stats=self._stats.to_dict() if self._stats is not None else {},
                errors_by_reason=dict(sorted(by_reason.items())),
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
            if self._pq_writer is not None:
                self._pq_writer.close()
            if self._tar is not None:
                self._tar.close()
        except Exception:
            pass
        self._cleanup()

    # -- internals -------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise WriterError(f"shard writer {self.name!r} is already committed or aborted")

    def _cleanup(self) -> None:
        self._closed = True
        self._pq_writer = None
        self._tar = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _source(self) -> str | None:
        if self._sources:
            return self._sources.most_common(1)[0][0]
        if self._errors:
            return self._errors[0].source
        return None

    def _latents_per_row(self) -> int:
        return 1 + int(bool(self._has_logvar)) + int(bool(self._has_flip)) * (1 + int(bool(self._has_logvar)))

    def _group_rows(self) -> int:
        if self.row_group_rows:
            return self.row_group_rows
        if self.fmt == "wds":
            return 256  # tar members are streamed out in small batches
        row_bytes = max(1, self._pending_bytes // max(1, len(self._pending)))
        return max(1, min(MAX_ROW_GROUP_ROWS, ROW_GROUP_BYTES // row_bytes))

    def _check_row(self, row: LatentRow) -> None:
        key = row.key
        if not isinstance(key, str) or not key:
            raise WriterError(f"shard {self.name!r}: row {row.index} has no key")
        if key in self._keys:
            raise WriterError(f"shard {self.name!r}: duplicate key {key!r}")
        latent = np.asarray(row.latent)
        if latent.ndim != 3:
            raise WriterError(f"shard {self.name!r}, key {key!r}: latent must be [C, h, w], got shape {latent.shape}")
        if self._fixed_shape is not None and tuple(latent.shape) != self._fixed_shape:
            raise WriterError(
                f"shard {self.name!r}, key {key!r}: latent shape {tuple(latent.shape)} differs from the "
                f"manifest's fixed shape {self._fixed_shape}"
            )
        if self._stats is None:
            self._stats = ChannelStats(latent.shape[0])
        elif latent.shape[0] != self._stats.channels:
            raise WriterError(
                f"shard {self.name!r}, key {key!r}: latent has {latent.shape[0]} channels, expected {self._stats.channels}"
            )
        if self.manifest is None and self._has_logvar is None:
            self._has_logvar = row.logvar is not None
            self._has_flip = row.latent_flip is not None
        expect = {
            "logvar": self._has_logvar,
            "latent_flip": self._has_flip,
            "logvar_flip": bool(self._has_flip and self._has_logvar),
        }
        for col, wanted in expect.items():
            value = getattr(row, col)
            if wanted and value is None:
                raise WriterError(f"shard {self.name!r}, key {key!r}: field {col!r} is missing but the output stores it")
            if not wanted and value is not None:
                raise WriterError(f"shard {self.name!r}, key {key!r}: field {col!r} is set but the output does not store it")
            if value is not None and np.shape(value) != latent.shape:
                raise WriterError(
                    f"shard {self.name!r}, key {key!r}: field {col!r} has shape {np.shape(value)}, latent {latent.shape}"
                )
        self._keys.add(key)

    def _flush(self) -> None:
        if not self._pending:
            return
        rows, self._pending, self._pending_bytes = self._pending, [], 0
        stored = {col: [to_storage(getattr(r, col), self.dtype) for r in rows] for col in self._latent_columns()}
        # Statistics describe what readers get back, i.e. the stored (rounded) values; same-shape
        # latents are reduced together.
        by_shape: dict[tuple[int, ...], list[np.ndarray]] = {}
        for arr in stored["latent"]:
            by_shape.setdefault(arr.shape, []).append(arr)
        for arrs in by_shape.values():
            self._stats.update(from_storage(np.stack(arrs), self.dtype))  # type: ignore[union-attr]
        for r in rows:
            self._shapes["x".join(str(v) for v in np.shape(r.latent))] += 1
            self._sources[storage.redact(r.source)] += 1
        if self.fmt == "parquet":
            self._write_parquet(rows, stored)
        else:
            self._write_tar(rows, stored)
        self._rows += len(rows)
        self._row_groups.append(len(rows))

    def _latent_columns(self) -> list[str]:
        cols = ["latent"]
        if self._has_logvar:
            cols.append("logvar")
        if self._has_flip:
            cols.append("latent_flip")
            if self._has_logvar:
                cols.append("logvar_flip")
        return cols

    # -- parquet ---------------------------------------------------------------------------
    def _schema(self, channels: int) -> pa.Schema:
        value_type = storage_arrow_type(self.dtype)
        field_meta = {b"dtype": self.dtype.encode(), b"layout": b"CHW row-major, raw (unscaled)"}
        if self._variable:
            latent_type = pa.list_(value_type)
            field_meta[b"shape"] = b"per row: latent_shape"
        else:
            latent_type = pa.list_(value_type, int(np.prod(self._fixed_shape)))
            field_meta[b"shape"] = json.dumps(list(self._fixed_shape)).encode()
        fields = [
            pa.field("key", pa.string(), nullable=False),
            pa.field("source", pa.string()),
            pa.field("index", pa.int64()),
        ]
        for col in self._latent_columns():
            fields.append(pa.field(col, latent_type, nullable=False, metadata=field_meta))
        if self._variable:
            fields.append(pa.field("latent_shape", pa.list_(pa.int32(), 3)))
        fields += [
            pa.field("caption", pa.string()),
            pa.field("meta", pa.string()),
            pa.field("original_size", _size_type()),
            pa.field("crop_top_left", _size_type()),
            pa.field("target_size", _size_type()),
        ]
        info: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "dtype": self.dtype,
            "channels": channels,
            "shape": list(self._fixed_shape) if self._fixed_shape else None,
            "latent_columns": self._latent_columns(),
            "layout": "CHW row-major; raw latents: scaled = (latent - shift_factor) * scaling_factor",
        }
        if self.manifest is not None:
            info.update(
                scaling_factor=self.manifest.scaling_factor,
                shift_factor=self.manifest.shift_factor,
                store=self.manifest.store,
                model=self.manifest.model,
            )
        return pa.schema(fields, metadata={SCHEMA_METADATA_KEY: json.dumps(info, sort_keys=True).encode()})

    def _write_parquet(self, rows: list[LatentRow], stored: dict[str, list[np.ndarray]]) -> None:
        channels = int(np.shape(rows[0].latent)[0])
        if self._pq_writer is None:
            schema = self._schema(channels)
            latent_cols = self._latent_columns()
            self._pq_writer = pq.ParquetWriter(
                self._data_path,
                schema,
                compression="zstd",
                # Dictionary encoding only pays off for the repeated source URL.
                use_dictionary=["source"],
                # BYTE_STREAM_SPLIT groups the bytes of each float (zstd then finds the redundancy
                # in exponents); DuckDB cannot decode it on float16, so fp16 stays PLAIN.
                use_byte_stream_split=[] if self.dtype == "fp16" else [f"{c}.list.element" for c in latent_cols],
                write_statistics=["key", "source", "index"],
                store_schema=True,
            )
        schema = self._pq_writer.schema
        arrays: dict[str, pa.Array] = {
            "key": pa.array([r.key for r in rows], pa.string()),
            "source": pa.array([storage.redact(r.source) for r in rows], pa.string()),
            "index": pa.array([int(r.index) for r in rows], pa.int64()),
        }
        value_type = storage_arrow_type(self.dtype)
        for col, arrs in stored.items():
            values = pa.array(np.concatenate([a.reshape(-1) for a in arrs]), value_type)
            if self._variable:
                offsets = np.zeros(len(arrs) + 1, np.int32)
                np.cumsum([a.size for a in arrs], out=offsets[1:])
                arrays[col] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, type=schema.field(col).type)
            else:
                arrays[col] = pa.FixedSizeListArray.from_arrays(values, type=schema.field(col).type)
        if self._variable:
            shapes = np.asarray([np.shape(r.latent) for r in rows], np.int32).reshape(-1)
            arrays["latent_shape"] = pa.FixedSizeListArray.from_arrays(pa.array(shapes, pa.int32()), 3)
        arrays["caption"] = pa.array([r.caption for r in rows], pa.string())
        arrays["meta"] = pa.array([_meta_text(r.meta) for r in rows], pa.string())
        for col in ("original_size", "crop_top_left", "target_size"):
            flat = np.asarray([tuple(getattr(r, col)) for r in rows], np.int32).reshape(-1)
            arrays[col] = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.int32()), 2)
        table = pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema)
        self._pq_writer.write_table(table, row_group_size=len(rows))

    # -- webdataset tar --------------------------------------------------------------------
    def _write_tar(self, rows: list[LatentRow], stored: dict[str, list[np.ndarray]]) -> None:
        if self._tar is None:
            self._tar = tarfile.open(self._data_path, "w", format=tarfile.USTAR_FORMAT)
        for i, r in enumerate(rows):
            record = {
                "key": r.key,
                "source": storage.redact(r.source),
                "index": int(r.index),
                "dtype": self.dtype,
                "latent_shape": [int(v) for v in np.shape(r.latent)],
                "caption": r.caption,
                "meta": _meta_object(r.meta),
                "original_size": [int(v) for v in r.original_size],
                "crop_top_left": [int(v) for v in r.crop_top_left],
                "target_size": [int(v) for v in r.target_size],
            }
            members: list[tuple[str, bytes]] = []
            for col, arrs in stored.items():
                buf = io.BytesIO()
                np.save(buf, arrs[i], allow_pickle=False)
                members.append((f"{r.key}.{col}.npy", buf.getvalue()))
            members.append((f"{r.key}.json", json.dumps(record, sort_keys=True).encode()))
            if r.caption is not None:
                members.append((f"{r.key}.txt", r.caption.encode()))
            for member, data in members:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                info.mtime = 0  # reproducible bytes, so reruns give identical sha256
                info.mode = 0o644
                self._tar.addfile(info, io.BytesIO(data))

    def _finish_data(self) -> None:
        if self.fmt == "parquet":
            if self._pq_writer is None:
                # An empty shard (every sample failed) still gets a valid file with the full schema.
                self._pq_writer = pq.ParquetWriter(self._data_path, self._schema(self._channels_hint()), compression="zstd")
            self._pq_writer.close()
            self._pq_writer = None
        else:
            if self._tar is None:
                self._tar = tarfile.open(self._data_path, "w", format=tarfile.USTAR_FORMAT)
            self._tar.close()
            self._tar = None

    def _channels_hint(self) -> int:
        if self._stats is not None:
            return self._stats.channels
        if self.manifest is not None:
            return int(self.manifest.latent_channels)
        return 0

    def _write_errors(self, path: str) -> None:
        schema = errors_schema()
        table = pa.Table.from_pylist(
            [{"key": e.key, "source": e.source, "stage": e.stage, "error": e.error, "message": e.message} for e in self._errors],
            schema=schema,
        )
        pq.write_table(table, path, compression="zstd")

    def _write_qa(self, path: str) -> None:
        rows = []
        for q in self._qa:
            pixels = np.ascontiguousarray(q.pixels, np.uint8)
            latent = np.ascontiguousarray(q.latent, np.float32)
            rows.append(
                {
                    "key": q.key,
                    "source": storage.redact(q.source),
                    "bucket": q.bucket,
                    "pixels": pixels.tobytes(),
                    "pixels_shape": list(pixels.shape),
                    "latent": latent.reshape(-1),
                    "latent_shape": list(latent.shape),
                }
            )
        pq.write_table(pa.Table.from_pylist(rows, schema=qa_schema()), path, compression="zstd")


def _meta_text(meta: Any) -> str:
    if meta is None:
        return "{}"
    if isinstance(meta, (bytes, bytearray)):
        meta = meta.decode("utf-8", "replace")
    if isinstance(meta, str):
        return meta if meta.strip() else "{}"
    return json.dumps(meta, sort_keys=True)


def _meta_object(meta: Any) -> Any:
    text = _meta_text(meta)
    try:
        return json.loads(text)
    except ValueError:
        return text  # not JSON: kept verbatim rather than dropped
