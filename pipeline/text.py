"""Caption embeddings as output columns: their names, types, stored forms, reading back, statistics.

The encoders of a job's `text:` section (`pipeline.text_encoders`) give every sample, per encoder
NAME:

    NAME_OUTPUT   one column per stored output (OUTPUT: last, penultimate, pooled, projected)
    NAME_length   int32: the caption's tokens, special tokens included (at most max_length)

Sequence outputs (`last`, `penultimate`) are `[tokens, hidden]`, row-major. With `padding:
max_length` every row holds max_length tokens: `fixed_size_list<T>[max_length * hidden]`. With
`padding: none` a row holds only its NAME_length real tokens: `list<T>` of NAME_length * hidden
values, so a 20-token caption of T5-XXL costs 20 x 4096 values instead of 512 x 4096. Pooled and
projected outputs are `[dim]` vectors: `fixed_size_list<T>[dim]`. T is the encoder's storage dtype,
as for latents (float, halffloat, or uint16 holding bf16 bits). Each column's field metadata holds
`text_encoder`, `output`, `dtype`, `shape` (`[null, hidden]` when rows vary) and `max_length`, so
one file describes itself to pyarrow, pandas or DuckDB users.

WebDataset tensor shards hold one member `KEY.text.npz` per sample with the same arrays (stored
dtypes) and NAME_length as 0-d int32 arrays; `KEY.json` gives each array's dtype in `text_dtypes`.

Nothing here imports transformers (and torch only to hand tensors to training).
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .schema import from_storage, storage_arrow_type, storage_numpy_dtype, to_storage

__all__ = [
    "SEQUENCE_OUTPUTS",
    "TEXT_MEMBER_SUFFIX",
    "TextColumn",
    "TextLayout",
    "TextStats",
    "length_column",
    "mask_column",
    "read_parquet_text",
    "read_npz_text",
    "iter_text_rows",
    "text_item",
]

#: Outputs with one vector per token; the others have one vector per caption.
SEQUENCE_OUTPUTS = ("last", "penultimate")
#: The member of a WebDataset tensor shard holding a sample's text arrays.
TEXT_MEMBER_SUFFIX = ".text.npz"
# Zip entries get a fixed time, so a rerun writes identical tar bytes.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def length_column(encoder: str) -> str:
    """Name of the column holding encoder `encoder`'s token count per caption."""
    return f"{encoder}_length"


def mask_column(encoder: str) -> str:
    """Name of the padding mask `LatentDataset(pad_text=True)` adds per encoder (True: a real token)."""
    return f"{encoder}_mask"


@dataclass(frozen=True)
class TextColumn:
    """One stored text output: `<encoder>_<output>`.

    shape: the padded shape, `(max_length, hidden)` for sequence outputs, `(dim,)` otherwise.
    variable: rows hold only their real tokens (`padding: none`), `(length, hidden)` each.
    """

    encoder: str
    output: str
    dtype: str
    shape: tuple[int, ...]
    max_length: int
    variable: bool

    @property
    def name(self) -> str:
        return f"{self.encoder}_{self.output}"

    @property
    def sequence(self) -> bool:
        return self.output in SEQUENCE_OUTPUTS

    def arrow_type(self) -> pa.DataType:
        value = storage_arrow_type(self.dtype)
        return pa.list_(value) if self.variable else pa.list_(value, int(np.prod(self.shape)))

    def arrow_field(self) -> pa.Field:
        shape = [None, *self.shape[1:]] if self.variable else list(self.shape)
        meta = {
            b"text_encoder": self.encoder.encode(),
            b"output": self.output.encode(),
            b"dtype": self.dtype.encode(),
            b"shape": json.dumps(shape).encode(),
            b"max_length": str(self.max_length).encode(),
            b"layout": b"row-major [tokens, hidden] or [dim]; shape [null, hidden]: NAME_length tokens per row",
        }
        return pa.field(self.name, self.arrow_type(), nullable=False, metadata=meta)

    def stored_bytes(self, value: np.ndarray) -> int:
        return int(np.size(value)) * storage_numpy_dtype(self.dtype).itemsize


@dataclass(frozen=True)
class TextLayout:
    """The text columns of an output, fixed by its manifest's `text` section.

    `encoders` maps each encoder name to its max_length; every encoder has a NAME_length column.
    Empty (false) for an output without text encoders.
    """

    columns: tuple[TextColumn, ...] = ()
    encoders: tuple[tuple[str, int], ...] = ()

    @classmethod
    def from_manifest(cls, text: Mapping[str, Mapping[str, Any]] | None) -> TextLayout:
        """The layout of a manifest's `text` entries (each needs the `shapes` a loaded encoder records)."""
        columns: list[TextColumn] = []
        encoders: list[tuple[str, int]] = []
        for name in sorted(text or {}):
            entry = text[name]  # type: ignore[index]
            if "shapes" not in entry:
                raise ValueError(f"text encoder {name!r}: the manifest entry records no output shapes")
            max_length = int(entry["max_length"])
            encoders.append((name, max_length))
            for output in entry["outputs"]:
                shape = tuple(int(v) for v in entry["shapes"][output])
                columns.append(TextColumn(
                    encoder=name, output=output, dtype=entry["storage_dtype"], shape=shape, max_length=max_length,
                    variable=entry["padding"] == "none" and output in SEQUENCE_OUTPUTS,
                ))
        return cls(tuple(columns), tuple(encoders))

    def __bool__(self) -> bool:
        return bool(self.encoders)

    @property
    def names(self) -> list[str]:
        """Every text column name, outputs then lengths."""
        return [c.name for c in self.columns] + [length_column(e) for e, _ in self.encoders]

    def fields(self) -> list[pa.Field]:
        """The Arrow fields of the text columns, in `names` order."""
        lengths = [
            pa.field(length_column(e), pa.int32(), nullable=False,
                     metadata={b"text_length_of": e.encode(), b"max_length": str(n).encode()})
            for e, n in self.encoders
        ]
        return [c.arrow_field() for c in self.columns] + lengths

    def check(self, text: Mapping[str, Any] | None) -> str | None:
        """What is wrong with one row's text values (None when they fit the layout)."""
        if text is None:
            return "has no text embeddings but the output stores them"
        for encoder, max_length in self.encoders:
            n = text.get(length_column(encoder))
            if not isinstance(n, (int, np.integer)) or not 0 <= int(n) <= max_length:
                return f"text field {length_column(encoder)!r} must be a token count 0..{max_length}, got {n!r}"
        for col in self.columns:
            value = text.get(col.name)
            if value is None:
                return f"text field {col.name!r} is missing"
            shape = tuple(np.shape(value))
            expect = ((int(text[length_column(col.encoder)]), *col.shape[1:]) if col.variable else col.shape)
            if shape != expect:
                return f"text field {col.name!r} has shape {shape}, expected {expect}"
        extra = set(text) - set(self.names)
        if extra:
            return f"text field(s) {sorted(extra)} are not stored by this output"
        return None

    def stored_bytes(self, text: Mapping[str, Any]) -> int:
        """Stored bytes of one row's text values."""
        return sum(c.stored_bytes(text[c.name]) for c in self.columns) + 4 * len(self.encoders)

    def arrow_arrays(self, texts: list[Mapping[str, Any]]) -> dict[str, pa.Array]:
        """Arrow arrays of the text columns for rows with these text values (in stored dtypes)."""
        out: dict[str, pa.Array] = {}
        for col in self.columns:
            stored = [to_storage(t[col.name], col.dtype).reshape(-1) for t in texts]
            values = pa.array(np.concatenate(stored), storage_arrow_type(col.dtype))
            if col.variable:
                offsets = np.zeros(len(stored) + 1, np.int32)
                np.cumsum([a.size for a in stored], out=offsets[1:])
                out[col.name] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, type=col.arrow_type())
            else:
                out[col.name] = pa.FixedSizeListArray.from_arrays(values, type=col.arrow_type())
        for encoder, _ in self.encoders:
            name = length_column(encoder)
            out[name] = pa.array([int(t[name]) for t in texts], pa.int32())
        return out

    def dtypes(self) -> dict[str, str]:
        """Stored dtype per text column (what a tar sample's JSON records as `text_dtypes`)."""
        return {c.name: c.dtype for c in self.columns}

    def npz_member(self, text: Mapping[str, Any]) -> bytes:
        """One sample's `KEY.text.npz`: its text arrays in stored dtypes, lengths as int32 scalars."""
        arrays = {c.name: to_storage(text[c.name], c.dtype) for c in self.columns}
        for encoder, _ in self.encoders:
            arrays[length_column(encoder)] = np.asarray(int(text[length_column(encoder)]), np.int32)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for name, arr in arrays.items():
                member = io.BytesIO()
                np.save(member, arr, allow_pickle=False)
                zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME), member.getvalue())
        return buf.getvalue()


# --------------------------------------------------------------------------------------------
# reading back


def read_parquet_text(table: pa.Table) -> dict[str, list]:
    """The text columns of a table read from a shard, found by their field metadata.

    Outputs become float32 arrays per row (`[tokens, hidden]` or `[dim]`), lengths ints.
    """
    out: dict[str, list] = {}
    n = table.num_rows
    for field in table.schema:
        meta = field.metadata or {}
        if b"text_length_of" in meta:
            out[field.name] = [int(v) for v in table.column(field.name).to_pylist()]
            continue
        if b"text_encoder" not in meta:
            continue
        shape = json.loads(meta[b"shape"])
        arr = table.column(field.name).combine_chunks()
        values = from_storage(arr.flatten().to_numpy(zero_copy_only=False), meta[b"dtype"].decode())
        if shape[0] is not None:
            out[field.name] = list(values.reshape((n, *shape)))
            continue
        offsets = arr.offsets.to_numpy()
        base = int(offsets[0])  # a sliced array's values start at its first offset
        out[field.name] = [values[a - base : b - base].reshape((-1, *shape[1:]))
                           for a, b in zip(offsets[:-1], offsets[1:])]
    return out


def read_npz_text(blob: bytes, dtypes: Mapping[str, str]) -> dict[str, Any]:
    """A tar sample's `KEY.text.npz`: outputs as float32 arrays, lengths as ints."""
    out: dict[str, Any] = {}
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        for name in npz.files:
            arr = npz[name]
            out[name] = from_storage(arr, dtypes[name]) if name in dtypes else int(arr)
    return out


def iter_text_rows(url: str, fmt: str, layout: TextLayout,
                   storage_options: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """The text values of each row of one shard file (Parquet: row group by row group, only the
    text columns; a tar: only its text members), as `read_parquet_text`/`read_npz_text` give them."""
    from . import storage
    from .tarstream import open_members

    with storage.open_input(url, storage_options) as f:
        if fmt == "wds":
            dtypes = layout.dtypes()
            for name, _, read in open_members(f):
                if name.endswith(TEXT_MEMBER_SUFFIX):
                    yield read_npz_text(read(), dtypes)
            return
        pf = pq.ParquetFile(f)
        for i in range(pf.num_row_groups):
            columns = read_parquet_text(pf.read_row_group(i, columns=layout.names))
            for j in range(pf.metadata.row_group(i).num_rows):
                yield {name: values[j] for name, values in columns.items()}


def text_item(row: Mapping[str, Any], layout: TextLayout, *, pad: bool) -> dict[str, Any]:
    """The text values of one dataset row as tensors: outputs float32, lengths int64.

    With `pad`, sequence outputs stored unpadded are padded with zeros to `[max_length, hidden]`
    and each encoder with a sequence output gets NAME_mask (bool `[max_length]`, True on real
    tokens), so every item has the same shapes and batches collate.
    """
    import torch

    out: dict[str, Any] = {}
    for encoder, max_length in layout.encoders:
        name = length_column(encoder)
        if name not in row:
            continue
        n = int(row[name])
        out[name] = torch.tensor(n, dtype=torch.int64)
        if pad and any(c.sequence and c.encoder == encoder for c in layout.columns):
            out[mask_column(encoder)] = torch.arange(max_length) < n
    for col in layout.columns:
        if col.name not in row:
            continue
        value = np.asarray(row[col.name], np.float32)
        if pad and col.variable:
            full = np.zeros(col.shape, np.float32)
            full[: len(value)] = value
            value = full
        elif not value.flags.writeable:  # a view of Arrow's buffers: torch wants memory it may write
            value = value.copy()
        out[col.name] = torch.from_numpy(np.ascontiguousarray(value))
    return out


# --------------------------------------------------------------------------------------------
# statistics


class _Moments:
    """Count, sum, sum of squares, min, max of the finite values; NaN and Inf counts."""

    def __init__(self) -> None:
        self.rows = 0
        self.count = 0
        self.sum = 0.0
        self.sumsq = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.nan = 0
        self.inf = 0

    def update(self, value: np.ndarray) -> None:
        x = np.asarray(value, np.float64).ravel()
        finite = np.isfinite(x)
        self.rows += 1
        self.nan += int(np.isnan(x).sum())
        self.inf += int(np.isinf(x).sum())
        xf = x[finite]
        self.count += int(xf.size)
        if xf.size:
            self.sum += float(xf.sum())
            self.sumsq += float((xf * xf).sum())
            self.min = min(self.min, float(xf.min()))
            self.max = max(self.max, float(xf.max()))

    def merge(self, other: _Moments) -> None:
        self.rows += other.rows
        self.count += other.count
        self.sum += other.sum
        self.sumsq += other.sumsq
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.nan += other.nan
        self.inf += other.inf

    def to_dict(self) -> dict[str, Any]:
        mean = self.sum / self.count if self.count else None
        var = self.sumsq / self.count - mean * mean if mean is not None else None
        return {
            "rows": self.rows,
            "count": self.count,
            "mean": mean,
            "std": max(var, 0.0) ** 0.5 if var is not None else None,
            "min": self.min if math.isfinite(self.min) else None,
            "max": self.max if math.isfinite(self.max) else None,
            "nan": self.nan,
            "inf": self.inf,
        }


class _Tokens:
    """Token counts of one encoder's captions: rows, sum, min, max, rows at max_length."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.rows = 0
        self.sum = 0
        self.min: int | None = None
        self.max: int | None = None
        self.at_max_length = 0

    def update(self, n: int) -> None:
        self.rows += 1
        self.sum += n
        self.min = n if self.min is None else min(self.min, n)
        self.max = n if self.max is None else max(self.max, n)
        self.at_max_length += int(n >= self.max_length)

    def merge(self, other: _Tokens) -> None:
        self.rows += other.rows
        self.sum += other.sum
        for attr, pick in (("min", min), ("max", max)):
            a, b = getattr(self, attr), getattr(other, attr)
            setattr(self, attr, b if a is None else a if b is None else pick(a, b))
        self.at_max_length += other.at_max_length

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "mean": self.sum / self.rows if self.rows else None,
            "min": self.min,
            "max": self.max,
            "max_length": self.max_length,
            "at_max_length": self.at_max_length,
        }


class TextStats:
    """Statistics of the text columns over the rows given to `update`: per output column the
    count, mean, std, min and max of its finite values and its NaN/Inf counts; per encoder the
    token counts (mean, min, max, and rows that reached max_length, i.e. were possibly truncated).

    Merge the statistics of several shards with `merge`; `to_dict` is JSON-able (None where
    there are no values).
    """

    def __init__(self, layout: TextLayout):
        self.layout = layout
        self.columns = {c.name: _Moments() for c in layout.columns}
        self.tokens = {e: _Tokens(n) for e, n in layout.encoders}

    def update(self, row: Mapping[str, Any]) -> None:
        """Add one row's text values (as `read_parquet_text`/`read_npz_text` or an item give them)."""
        for name, moments in self.columns.items():
            if name in row:
                moments.update(np.asarray(row[name]))
        for encoder, tokens in self.tokens.items():
            name = length_column(encoder)
            if name in row:
                tokens.update(int(row[name]))

    def update_all(self, rows: Iterable[Mapping[str, Any]]) -> TextStats:
        for row in rows:
            self.update(row)
        return self

    def merge(self, other: TextStats) -> TextStats:
        for name, moments in other.columns.items():
            self.columns.setdefault(name, _Moments()).merge(moments)
        for encoder, tokens in other.tokens.items():
            self.tokens.setdefault(encoder, _Tokens(tokens.max_length)).merge(tokens)
        return self

    @property
    def nonfinite(self) -> int:
        """NaN plus Inf values over every text column."""
        return sum(m.nan + m.inf for m in self.columns.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "columns": {name: m.to_dict() for name, m in self.columns.items()},
            "tokens": {encoder: t.to_dict() for encoder, t in self.tokens.items()},
        }
