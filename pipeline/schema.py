"""What the output tables hold: stored latent dtypes and the Arrow schemas of every table written.

Shared by the writer and the training reader, so neither needs the other.

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
    NAME_OUTPUT, NAME_length                  caption embeddings per text encoder (`pipeline.text`)

Latents are raw (unscaled), row-major C,h,w. bf16 is stored as its uint16 bit pattern with
`dtype: bf16` in the field metadata (Arrow has no bfloat16). fp8_e4m3 is stored as one byte per
value (uint8, the OCP E4M3 "fn" bit pattern) in units of a per-sample, per-channel scale: each
latent column `COL` then has a column `COL_scale` (fixed_size_list<float32>[C]) and the value is
`fp8(code) * COL_scale[c]` (see `fp8_scale` for why the scale is chosen per sample).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from .manifest import DTYPES, FORMAT_VERSION, Manifest

if TYPE_CHECKING:
    from .text import TextLayout

__all__ = [
    "CHECKSUM_SUFFIX",
    "SCHEMA_METADATA_KEY",
    "LATENT_COLUMNS",
    "SIZE_COLUMNS",
    "FP8",
    "ShardColumns",
    "scale_column",
    "storage_numpy_dtype",
    "storage_arrow_type",
    "fp8_scale",
    "fp8_values",
    "latent_scales",
    "stored_columns",
    "to_storage",
    "from_storage",
    "latent_schema",
    "errors_schema",
    "qa_schema",
]

SCHEMA_METADATA_KEY = b"latent_precompute"
# Every latent column a shard may hold, in column order; a shard holds `latent` and a subset of
# the others (see `ShardColumns.latent_columns`).
LATENT_COLUMNS = ("latent", "logvar", "latent_flip", "logvar_flip")
# The micro-conditioning columns, each an int32 pair.
SIZE_COLUMNS = ("original_size", "crop_top_left", "target_size")
#: The one-byte stored dtype: OCP FP8 E4M3 "fn" (4 exponent bits, bias 7, 3 mantissa bits, no
#: infinities, one NaN pattern per sign; largest finite value 448), scaled per sample and channel.
FP8 = "fp8_e4m3"


def scale_column(col: str) -> str:
    """The column holding the per-channel fp8 scales of latent column `col`."""
    return f"{col}_scale"


@dataclass(frozen=True)
class ShardColumns:
    """The latent columns of one shard, fixed before its first row is written.

    dtype: stored latent dtype ("fp32", "fp16" or "bf16").
    latent_columns: which of `LATENT_COLUMNS` the shard holds, in that order.
    fixed_shape: the one `[C, h, w]` of every row; None when shapes vary (aspect buckets), which
        stores variable lists plus a `latent_shape` column.
    channels: latent channels C (recorded in the schema metadata).
    text: the text columns (a `pipeline.text.TextLayout`), after the others; None: no text.
    """

    dtype: str
    latent_columns: tuple[str, ...]
    fixed_shape: tuple[int, ...] | None
    channels: int
    text: TextLayout | None = None

    @property
    def variable(self) -> bool:
        """True when rows may have different latent shapes."""
        return self.fixed_shape is None

    @property
    def scale_columns(self) -> tuple[str, ...]:
        """The fp8 scale column of each latent column, in the same order (none for other dtypes)."""
        return tuple(scale_column(c) for c in self.latent_columns) if self.dtype == FP8 else ()


def storage_numpy_dtype(dtype: str) -> np.dtype:
    """numpy dtype of stored latent values for a manifest dtype."""
    return {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16), "bf16": np.dtype(np.uint16),
            FP8: np.dtype(np.uint8)}[dtype]


def storage_arrow_type(dtype: str) -> pa.DataType:
    """Arrow type of stored latent values for a manifest dtype."""
    return {"fp32": pa.float32(), "fp16": pa.float16(), "bf16": pa.uint16(), FP8: pa.uint8()}[dtype]


def _fp8_table() -> np.ndarray:
    codes = np.arange(256)
    exponent, mantissa = (codes >> 3) & 0xF, codes & 0x7
    magnitude = np.where(exponent == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    magnitude[(codes & 0x7F) == 0x7F] = np.nan
    return np.where(codes & 0x80, -magnitude, magnitude).astype(np.float32)


_FP8_VALUES = _fp8_table()


def fp8_values(codes: np.ndarray) -> np.ndarray:
    """E4M3 codes (uint8) -> their float32 values, unscaled."""
    return _FP8_VALUES[np.asarray(codes, dtype=np.uint8)]


def _fp8_codes(y: np.ndarray) -> np.ndarray:
    """float32 -> E4M3 codes, rounded to nearest even; |y| above 448 saturates to 448 (a scaled
    latent never gets there), NaN and infinities become NaN (E4M3 has no infinity)."""
    y = np.ascontiguousarray(y, dtype=np.float32)
    sign = ((y.view(np.uint32) >> 24) & 0x80).astype(np.uint8)
    a = np.abs(y)
    bits = a.view(np.uint32)
    # Normal range (|y| >= 2^-6): round the float32 mantissa to 3 bits (nearest even, a carry moves
    # into the exponent) and rebias the exponent from 127 to 7.
    normal = ((bits + (((bits >> 20) & 1) + 0x7FFFF)) >> 20).astype(np.int64) - (120 << 3)
    # Below: subnormals of 2^-9 steps; rint rounds half to even, and 8 is the smallest normal's code.
    with np.errstate(invalid="ignore"):
        codes = np.where(a < 2.0**-6, np.rint(a * 512.0), np.minimum(normal, 0x7E))
    codes = np.where(np.isfinite(a), codes, 0x7F).astype(np.uint8)
    return codes | sign


def fp8_scale(x: np.ndarray) -> np.ndarray:
    """Per-channel scales of latents `x` [..., C, h, w] for fp8 storage: float32 [..., C].

    Each is the smallest power of two that brings the channel's largest finite |value| to at most
    448 (E4M3's largest), 1 for a channel of zeros. A power of two, so dividing by it and
    multiplying back are exact and the only rounding is E4M3's (3 mantissa bits: relative error
    at most 2^-4). Chosen per sample, so a row's bytes depend on that row alone, never on which
    worker, batch or shard it was encoded in.
    """
    a = np.abs(np.asarray(x, dtype=np.float32))
    amax = np.where(np.isfinite(a), a, 0.0).max(axis=(-2, -1))
    # amax = m * 2^k with m in [0.5, 1); 448 = 0.875 * 2^9: amax / 2^e <= 448 for e = k - 9 when
    # m <= 0.875, else k - 8. Integer arithmetic, so the choice is exact. At least 2^-126, the
    # smallest normal float32, so the scale never underflows to 0.
    m, k = np.frexp(amax)
    e = np.maximum(np.where(m <= 0.875, k - 9, k - 8), -126)
    return np.where(amax > 0, np.ldexp(np.float32(1.0), e), 1.0).astype(np.float32)


def _scale_axes(scale: np.ndarray) -> np.ndarray:
    return np.asarray(scale, dtype=np.float32)[..., None, None]


def stored_columns(col: str, latents: list[np.ndarray], dtype: str) -> dict[str, list[np.ndarray]]:
    """Latent column `col` of some rows in stored form: {col: values}, plus {COL_scale: scales}
    for fp8 (see `fp8_scale`). Latents are float32 [C, h, w]."""
    if dtype != FP8:
        return {col: [to_storage(x, dtype) for x in latents]}
    scales = [fp8_scale(x) for x in latents]
    return {col: [to_storage(x, dtype, s) for x, s in zip(latents, scales)], scale_column(col): scales}


def latent_scales(table: pa.Table, col: str) -> np.ndarray | None:
    """The fp8 scales [rows, C] of latent column `col` of a table read from a shard; None when the
    table has no scale column for it (other dtypes, or the column was not read)."""
    name = scale_column(col)
    if name not in table.column_names:
        return None
    arr = table.column(name).combine_chunks()
    return arr.flatten().to_numpy().reshape(len(arr), -1)


def to_storage(x: np.ndarray, dtype: str, scale: np.ndarray | None = None) -> np.ndarray:
    """float32 array -> stored representation (float32, float16, bf16 bits as uint16, or fp8 codes
    as uint8). fp8 needs the per-channel `scale` ([..., C] for `x` [..., C, h, w], see `fp8_scale`)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == FP8:
        if scale is None:
            raise ValueError("fp8_e4m3 storage needs the per-channel scale of the latent (schema.fp8_scale)")
        return _fp8_codes(x / _scale_axes(scale))
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


def from_storage(x: np.ndarray, dtype: str, scale: np.ndarray | None = None) -> np.ndarray:
    """Stored representation -> float32 array. fp8 needs the row's per-channel `scale` (its
    `COL_scale` column: [..., C] for `x` [..., C, h, w]); the other dtypes have none."""
    if dtype == FP8:
        if scale is None:
            raise ValueError("fp8_e4m3 latents need their per-channel scale (column COL_scale) to be read")
        return fp8_values(x) * _scale_axes(scale)
    if dtype == "bf16":
        return (np.asarray(x, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype in ("fp32", "fp16"):
        return np.asarray(x).astype(np.float32, copy=False)
    raise ValueError(f"unknown latent dtype {dtype!r}; expected one of {DTYPES}")


def latent_schema(columns: ShardColumns, manifest: Manifest | None) -> pa.Schema:
    """Schema of shards/NAME.parquet (see the module docstring), with the output's facts in its metadata."""
    value_type = storage_arrow_type(columns.dtype)
    field_meta = {b"dtype": columns.dtype.encode(), b"layout": b"CHW row-major, raw (unscaled)"}
    if columns.variable:
        latent_type = pa.list_(value_type)
        field_meta[b"shape"] = b"per row: latent_shape"
    else:
        latent_type = pa.list_(value_type, int(np.prod(columns.fixed_shape)))
        field_meta[b"shape"] = json.dumps(list(columns.fixed_shape)).encode()
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("index", pa.int64()),
    ]
    for col in columns.latent_columns:
        meta = {**field_meta, b"scale": scale_column(col).encode()} if columns.scale_columns else field_meta
        fields.append(pa.field(col, latent_type, nullable=False, metadata=meta))
    for col in columns.scale_columns:
        fields.append(pa.field(col, pa.list_(pa.float32(), columns.channels), nullable=False,
                               metadata={b"scale_of": col[: -len("_scale")].encode(),
                                         b"layout": b"per channel; value = fp8_e4m3(code) * scale"}))
    if columns.variable:
        fields.append(pa.field("latent_shape", pa.list_(pa.int32(), 3)))
    fields += [pa.field("caption", pa.string()), pa.field("meta", pa.string())]
    fields += [pa.field(col, pa.list_(pa.int32(), 2)) for col in SIZE_COLUMNS]
    if columns.text:
        fields += columns.text.fields()
    info: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "dtype": columns.dtype,
        "channels": columns.channels,
        "shape": list(columns.fixed_shape) if columns.fixed_shape else None,
        "latent_columns": list(columns.latent_columns),
        "layout": "CHW row-major; raw latents: scaled = (latent - shift_factor) * scaling_factor",
    }
    if columns.scale_columns:
        info["scale"] = ("fp8_e4m3 codes (uint8) in units of a per-sample, per-channel power-of-two scale: "
                         "latent = fp8_e4m3(code) * COL_scale[c]; scale columns: " + ", ".join(columns.scale_columns))
    if manifest is not None:
        info.update(
            scaling_factor=manifest.scaling_factor,
            shift_factor=manifest.shift_factor,
            store=manifest.store,
            model=manifest.model,
        )
        if manifest.text:
            info["text"] = manifest.text
    return pa.schema(fields, metadata={SCHEMA_METADATA_KEY: json.dumps(info, sort_keys=True).encode()})


def _text_fields(*names: str) -> list[pa.Field]:
    return [pa.field(name, pa.string()) for name in names]


def errors_schema() -> pa.Schema:
    """Schema of errors/NAME.parquet, the bad-sample ledger: one string column per `ErrorRow` field."""
    return pa.schema(_text_fields("key", "source", "stage", "error", "message"))


def qa_schema() -> pa.Schema:
    """Schema of qa/samples/NAME.parquet: pixels as raw HWC uint8 bytes, latent as float32."""
    return pa.schema(
        _text_fields("key", "source", "bucket")
        + [
            pa.field("pixels", pa.binary()),
            pa.field("pixels_shape", pa.list_(pa.int32(), 3)),
            pa.field("latent", pa.list_(pa.float32())),
            pa.field("latent_shape", pa.list_(pa.int32(), 3)),
        ]
    )


#: Tensor shards: the member of each sample that lists the crc32 of its other members
#: (`KEY.crc32`, JSON {"latent.npy": "1a2b3c4d", ...}), checked by `LatentDataset` as Parquet's
#: page checksums are.
CHECKSUM_SUFFIX = ".crc32"
