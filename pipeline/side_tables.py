"""The side tables of one shard, next to its latents: the bad-sample ledger and the QA samples.

    errors/NAME.parquet      `ErrorLedger`, schema `schema.errors_schema`
    qa/samples/NAME.parquet  `QASamples`, schema `schema.qa_schema`

Both keep their rows in memory (a shard has few of either) and are written whole at commit.
Sources and error messages are stored without credentials: they are redacted as they come in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .reasons import Reason
from .rows import ErrorRow, QARow, WriterError
from .schema import errors_schema, qa_schema

__all__ = ["ErrorLedger", "QASamples"]


class _SideTable:
    """Rows kept in order, written as one zstd Parquet table with the schema `_schema`."""

    _schema: Callable[[], pa.Schema]

    def __init__(self) -> None:
        self.rows: list[Any] = []

    def __len__(self) -> int:
        return len(self.rows)

    def _records(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def write(self, path: str) -> None:
        """Write the table (possibly empty) to the local file `path`."""
        pq.write_table(pa.Table.from_pylist(self._records(), schema=self._schema()), path, compression="zstd")


class ErrorLedger(_SideTable):
    """The bad samples of a shard, in the order they were reported."""

    _schema = staticmethod(errors_schema)
    rows: list[ErrorRow]

    def add(self, error: ErrorRow) -> None:
        """Record one bad sample."""
        self.rows.append(
            ErrorRow(
                key=str(error.key),
                source=storage.redact(str(error.source)),
                stage=str(error.stage),
                error=str(error.error),
                message=storage.redact(str(error.message)),
            )
        )

    def by_reason(self) -> dict[str, int]:
        """Count of bad samples per "stage/error", sorted by reason."""
        return dict(sorted(Counter(str(Reason(e.stage, e.error)) for e in self.rows).items()))

    def _records(self) -> list[dict[str, Any]]:
        return [{"key": e.key, "source": e.source, "stage": e.stage, "error": e.error, "message": e.message} for e in self.rows]


class QASamples(_SideTable):
    """The QA samples of a shard: pixels exactly as encoded and the unrounded latent."""

    _schema = staticmethod(qa_schema)
    rows: list[QARow]

    def add(self, rows: Iterable[QARow]) -> None:
        """Keep QA samples; raises WriterError for pixels that are not uint8 `[H, W, 3]`."""
        for row in rows:
            pixels = np.asarray(row.pixels)
            if pixels.dtype != np.uint8 or pixels.ndim != 3:
                raise WriterError(f"QA row {row.key!r}: pixels must be uint8 [H, W, 3], got {pixels.dtype} {pixels.shape}")
            self.rows.append(replace(row, source=storage.redact(row.source)))

    def _records(self) -> list[dict[str, Any]]:
        records = []
        for q in self.rows:
            pixels = np.ascontiguousarray(q.pixels, np.uint8)
            latent = np.ascontiguousarray(q.latent, np.float32)
            records.append(
                {
                    "key": q.key,
                    "source": q.source,
                    "bucket": q.bucket,
                    "pixels": pixels.tobytes(),
                    "pixels_shape": list(pixels.shape),
                    "latent": latent.reshape(-1),
                    "latent_shape": list(latent.shape),
                }
            )
        return records
