"""The rows the encode worker hands the writer, and the checks a row must pass to enter a shard."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from .manifest import Manifest
from .schema import storage_numpy_dtype
from .text import TextLayout

__all__ = ["LatentRow", "ErrorRow", "QARow", "WriterError", "RowChecker"]


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
    #: The caption's embeddings when the output stores them: float32 arrays by text column name
    #: and token counts by NAME_length (see `pipeline.text`).
    text: dict[str, Any] | None = None

    def meta_text(self) -> str:
        """`meta` as stored in Parquet: JSON text, "{}" when empty."""
        meta: Any = self.meta
        if meta is None:
            return "{}"
        if isinstance(meta, (bytes, bytearray)):
            meta = meta.decode("utf-8", "replace")
        if isinstance(meta, str):
            return meta if meta.strip() else "{}"
        return json.dumps(meta, sort_keys=True)

    def meta_object(self) -> Any:
        """`meta` as stored in a tar's JSON record: the parsed object."""
        text = self.meta_text()
        try:
            return json.loads(text)
        except ValueError:
            return text  # not JSON: kept verbatim rather than dropped


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


class RowChecker:
    """Fixes the latent columns of shard `shard` and checks each row against them.

    The manifest fixes the columns: one latent shape, `store="mean+logvar"` adds `logvar`, `flip`
    adds the flipped columns, its `text` section the text columns (`text_layout`). Without a
    manifest the first row fixes the latent columns, shapes may vary and no text is stored.
    Keys must be unique within the shard.
    """

    def __init__(self, shard: str, manifest: Manifest | None):
        self.shard = shard
        self.fixed_shape: tuple[int, ...] | None = None
        self.has_logvar: bool | None = None
        self.has_flip: bool | None = None
        # The first row's channel count; every later row must match it.
        self.channels: int | None = None
        self._keys: set[str] = set()
        self.text_layout = TextLayout.from_manifest(manifest.text) if manifest is not None else TextLayout()
        if manifest is not None:
            if manifest.fixed_shape is not None:
                self.fixed_shape = tuple(manifest.fixed_shape)
            self.has_logvar = manifest.has_logvar
            self.has_flip = bool(manifest.flip)

    def latent_columns(self) -> tuple[str, ...]:
        """The latent columns the shard stores, in `schema.LATENT_COLUMNS` order."""
        cols = ["latent"]
        if self.has_logvar:
            cols.append("logvar")
        if self.has_flip:
            cols.append("latent_flip")
            if self.has_logvar:
                cols.append("logvar_flip")
        return tuple(cols)

    def check(self, row: LatentRow) -> None:
        """Accept `row` or raise WriterError naming the shard, the key and the field."""
        where = f"shard {self.shard!r}, key {row.key!r}"
        key = row.key
        if not isinstance(key, str) or not key:
            raise WriterError(f"shard {self.shard!r}: row {row.index} has no key")
        if key in self._keys:
            raise WriterError(f"shard {self.shard!r}: duplicate key {key!r}")
        latent = np.asarray(row.latent)
        if latent.ndim != 3:
            raise WriterError(f"{where}: latent must be [C, h, w], got shape {latent.shape}")
        if self.fixed_shape is not None and tuple(latent.shape) != self.fixed_shape:
            raise WriterError(
                f"{where}: latent shape {tuple(latent.shape)} differs from the manifest's fixed shape {self.fixed_shape}"
            )
        if self.channels is None:
            self.channels = int(latent.shape[0])
        elif latent.shape[0] != self.channels:
            raise WriterError(f"{where}: latent has {latent.shape[0]} channels, expected {self.channels}")
        if self.has_logvar is None:
            self.has_logvar = row.logvar is not None
            self.has_flip = row.latent_flip is not None
        expect = {
            "logvar": self.has_logvar,
            "latent_flip": self.has_flip,
            "logvar_flip": bool(self.has_flip and self.has_logvar),
        }
        for col, wanted in expect.items():
            value = getattr(row, col)
            if wanted and value is None:
                raise WriterError(f"{where}: field {col!r} is missing but the output stores it")
            if not wanted and value is not None:
                raise WriterError(f"{where}: field {col!r} is set but the output does not store it")
            if value is not None and np.shape(value) != latent.shape:
                raise WriterError(f"{where}: field {col!r} has shape {np.shape(value)}, latent {latent.shape}")
        if self.text_layout:
            problem = self.text_layout.check(row.text)
            if problem:
                raise WriterError(f"{where}: {problem}")
        elif row.text is not None:
            raise WriterError(f"{where}: field 'text' is set but the output stores no text embeddings")
        self._keys.add(key)

    def stored_bytes(self, row: LatentRow, dtype: str) -> int:
        """Bytes a checked row's latent and text columns take in storage `dtype` (latents)."""
        latents = np.size(row.latent) * storage_numpy_dtype(dtype).itemsize * len(self.latent_columns())
        return int(latents) + (self.text_layout.stored_bytes(row.text) if row.text is not None else 0)
