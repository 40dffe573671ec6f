"""Reading the QA sample back: the side tables, and the stored latents through LatentDataset.

The stored latents are read with `pipeline.LatentDataset`, exactly as training reads them, so a
bug anywhere on the training read path (dtype decoding, shape handling, key order) shows up as a
bad reconstruction or a readback mismatch here instead of in a training run. The same items carry
the samples' caption embeddings when the output stores them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.layout import qa_sample_url
from pipeline.qa.errors import QAError
from pipeline.text import TextLayout


@dataclass
class SideRow:
    """One row of a QA side table (ROOT/qa/samples/NAME.parquet)."""

    key: str
    shard: str
    bucket: str
    pixels: np.ndarray  # uint8 [H, W, 3], exactly as encoded
    latent: np.ndarray  # float32 [C, h, w], the stored latent (mean, or draw for `store: sample`) before storage rounding


@dataclass
class PairedSample:
    """A QA sample with the latent training reads back (None when the dataset lacks the key)."""

    key: str
    shard: str
    bucket: str
    pixels: np.ndarray
    fp32: np.ndarray
    stored: np.ndarray | None
    #: Its text values as training reads them (`pipeline.text` column names), when the output stores them.
    text: dict[str, Any] | None = None


def _read_table(root: str, shard: str, storage_options: Mapping[str, Any] | None, columns: list[str] | None):
    """Read a side table; with `columns`, only those column chunks are fetched (ranged reads)."""
    url = qa_sample_url(root, shard)
    try:
        with storage.open_input(url, storage_options) as f:
            return pq.read_table(f, columns=columns)
    except FileNotFoundError:
        raise QAError(f"shard {shard!r}: its commit lists QA samples but {storage.redact(url)} is missing") from None
    except Exception as exc:
        raise QAError(f"shard {shard!r}: QA side table {storage.redact(url)} is unreadable: {exc}") from exc


def read_side_index(root: str, shard: str, storage_options: Mapping[str, Any] | None = None) -> list[tuple[str, str]]:
    """(key, bucket) of every QA sample of `shard`, without the pixel and latent payload."""
    table = _read_table(root, shard, storage_options, ["key", "bucket"])
    return list(zip(table.column("key").to_pylist(), table.column("bucket").to_pylist()))


def read_side_rows(
    root: str, shard: str, keys: Sequence[str] | None = None, storage_options: Mapping[str, Any] | None = None
) -> list[SideRow]:
    """The QA samples of `shard` (only `keys` when given), in table order."""
    table = _read_table(root, shard, storage_options, None)
    wanted = set(keys) if keys is not None else None
    out = []
    for row in table.to_pylist():
        if wanted is not None and row["key"] not in wanted:
            continue
        pshape = tuple(row["pixels_shape"])
        lshape = tuple(row["latent_shape"])
        pixels = np.frombuffer(row["pixels"], np.uint8).copy()  # writable: it becomes a tensor
        latent = np.asarray(row["latent"], np.float32)
        if pixels.size != int(np.prod(pshape)) or latent.size != int(np.prod(lshape)):
            raise QAError(f"shard {shard!r}, key {row['key']!r}: QA side table row does not match its recorded shapes")
        out.append(SideRow(row["key"], shard, row["bucket"], pixels.reshape(pshape), latent.reshape(lshape)))
    return out


class StoredLatentReader:
    """Reads stored latents of given keys back through `LatentDataset`, as training does.

    Raw latents (`scale=False`), the posterior mean (`sample=False`), never flipped, in stored
    order; one rank of one. The dataset (one scan of the commit records) is built once and
    narrowed to one shard and the requested keys per request.
    """

    def __init__(self, root: str, storage_options: Mapping[str, Any] | None = None):
        self.root = root
        self.storage_options = dict(storage_options or {})
        self._dataset = None

    def _for_shard(self, shard: str | None):
        """The dataset narrowed to `shard` (None: just make sure the dataset is open)."""
        from pipeline.dataset import LatentDataset

        if self._dataset is None:
            self._dataset = LatentDataset(self.root, storage_options=self.storage_options, rank=0, world_size=1,
                                          shuffle=False, scale=False, sample=False, flip=False)
        if shard is None:
            return self._dataset
        if shard not in self._dataset.records:
            raise QAError(f"shard {shard!r} is not committed in {storage.redact(self.root)}")
        view = copy.copy(self._dataset)
        view.records = {shard: self._dataset.records[shard]}
        return view

    @property
    def text_layout(self) -> TextLayout:
        """The output's text columns (empty when it stores no caption embeddings)."""
        return TextLayout.from_manifest(self._for_shard(None).manifest.text)

    def _items(self, shard: str, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The dataset items of `keys` in `shard`, by key; missing keys are absent."""
        wanted = set(keys)
        out: dict[str, dict[str, Any]] = {}
        if not wanted:
            return out
        view = self._for_shard(shard)
        view.keys = frozenset(wanted)  # row groups without any of them are not read
        for item in view:
            out[item["key"]] = item
            if len(out) == len(wanted):
                break  # the rest of the shard is not needed
        return out

    def read(self, shard: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Raw stored latents (float32 [C,h,w]) of `keys` in `shard`; missing keys are absent."""
        return {k: item["latent"].numpy() for k, item in self._items(shard, keys).items()}

    def pairs(self, shard: str, keys: Sequence[str]) -> list[PairedSample]:
        """QA samples `keys` of `shard`, each with its stored latent (None when not found) and text values."""
        side = read_side_rows(self.root, shard, keys, self.storage_options)
        items = self._items(shard, [s.key for s in side])
        names = self.text_layout.names
        out = []
        for s in side:
            item = items.get(s.key)
            text = {n: item[n].numpy() for n in names if n in item} if item is not None and names else None
            out.append(PairedSample(s.key, s.shard, s.bucket, s.pixels, s.latent,
                                    item["latent"].numpy() if item is not None else None, text or None))
        return out
