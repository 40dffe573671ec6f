"""Write the latent rows of one shard as a Parquet file (`shards/NAME.parquet`, see `schema.py`)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .manifest import Manifest
from .rows import LatentRow
from .schema import SIZE_COLUMNS, ShardColumns, latent_schema, storage_arrow_type

__all__ = ["ParquetShardFormat"]

# Uncompressed latent bytes per Parquet row group: large enough for efficient ranged reads from
# object storage, small enough that a reader starts quickly and holds little memory.
ROW_GROUP_BYTES = 32 * 1024 * 1024
MAX_ROW_GROUP_ROWS = 8192


class ParquetShardFormat:
    """One Parquet file; each `write_rows` call becomes one row group.

    The file itself is created on the first `write_rows` (or by `finish` when there are none).
    """

    suffix = "parquet"

    @staticmethod
    def rows_per_group(row_bytes: int) -> int:
        """Rows per row group for rows of `row_bytes` stored latent bytes each (about ROW_GROUP_BYTES)."""
        return max(1, min(MAX_ROW_GROUP_ROWS, ROW_GROUP_BYTES // row_bytes))

    def __init__(self, path: str, columns: ShardColumns, manifest: Manifest | None):
        """Open the file at local `path` for rows with `columns`; `manifest` adds its facts to the schema."""
        self.path = path
        self.columns = columns
        self.schema = latent_schema(columns, manifest)
        self._writer: pq.ParquetWriter | None = None

    def write_rows(self, rows: list[LatentRow], stored: dict[str, list[np.ndarray]]) -> None:
        """Append one row group: `rows` with their latents in stored form, per latent column."""
        if self._writer is None:
            self._writer = pq.ParquetWriter(
                self.path,
                self.schema,
                compression="zstd",
                # Readers verify every page (`LatentDataset`): a flipped byte is an error, not a latent.
                write_page_checksum=True,
                # Dictionary encoding only pays off for the repeated source URL.
                use_dictionary=["source"],
                # BYTE_STREAM_SPLIT groups the bytes of each float (zstd then finds the redundancy
                # in exponents); DuckDB cannot decode it on float16, so fp16 stays PLAIN. Parquet
                # keeps fp8's uint8 codes as INT32: split, the three zero bytes of each compress away
                # (a third fewer bytes than PLAIN measured, as small as the raw codes).
                use_byte_stream_split=(
                    [] if self.columns.dtype == "fp16" else [f"{c}.list.element" for c in self.columns.latent_columns]
                ) + [f"{c.name}.list.element" for c in (self.columns.text.columns if self.columns.text else ())
                     if c.dtype != "fp16"],
                write_statistics=["key", "source", "index"],
                store_schema=True,
            )
        schema = self._writer.schema
        arrays: dict[str, pa.Array] = {
            "key": pa.array([r.key for r in rows], pa.string()),
            "source": pa.array([r.source for r in rows], pa.string()),
            "index": pa.array([int(r.index) for r in rows], pa.int64()),
        }
        value_type = storage_arrow_type(self.columns.dtype)
        for col, arrs in stored.items():
            if col in self.columns.scale_columns:
                scales = pa.array(np.concatenate(arrs).astype(np.float32, copy=False), pa.float32())
                arrays[col] = pa.FixedSizeListArray.from_arrays(scales, type=schema.field(col).type)
                continue
            values = pa.array(np.concatenate([a.reshape(-1) for a in arrs]), value_type)
            if self.columns.variable:
                offsets = np.zeros(len(arrs) + 1, np.int32)
                np.cumsum([a.size for a in arrs], out=offsets[1:])
                arrays[col] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, type=schema.field(col).type)
            else:
                arrays[col] = pa.FixedSizeListArray.from_arrays(values, type=schema.field(col).type)
        if self.columns.variable:
            shapes = np.asarray([np.shape(r.latent) for r in rows], np.int32).reshape(-1)
            arrays["latent_shape"] = pa.FixedSizeListArray.from_arrays(pa.array(shapes, pa.int32()), 3)
        arrays["caption"] = pa.array([r.caption for r in rows], pa.string())
        arrays["meta"] = pa.array([r.meta_text() for r in rows], pa.string())
        for col in SIZE_COLUMNS:
            flat = np.asarray([tuple(getattr(r, col)) for r in rows], np.int32).reshape(-1)
            arrays[col] = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.int32()), 2)
        if self.columns.text:
            arrays.update(self.columns.text.arrow_arrays([r.text for r in rows]))
        table = pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema)
        self._writer.write_table(table, row_group_size=len(rows))

    def finish(self) -> None:
        """Close the file; a shard without rows (every sample failed) still gets the full schema."""
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, self.schema, compression="zstd", write_page_checksum=True)
        self.close()

    def close(self) -> None:
        """Close the file as it is (abort: nothing more is written)."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()
