"""Training-side reader: `LatentDataset`, a PyTorch IterableDataset over a latent OUTPUT.

Work split
    The unit of work is one Parquet row group (its row count is in the commit record, so no file
    is opened to plan) or one whole tar shard for format "wds". Every epoch the units are put in
    one order that all ranks and workers compute identically from `(seed, epoch)` (shards
    shuffled, then row groups shuffled within each shard), and unit `i` goes to consumer
    `i % (world_size * num_workers)`, consumer = `rank * num_workers + worker_id`. Every row
    belongs to exactly one unit, so an epoch sees every committed row exactly once across the
    whole job. Consecutive units of one consumer usually share a shard, which keeps the number
    of opened files (and Parquet footer reads) low.

Streaming
    A background thread reads the consumer's units ahead (`readahead` units) while the training
    loop consumes the current one; remote files are read through `storage.open_input`, i.e. in
    large blocks with the next block prefetched. Nothing is downloaded whole before the first
    sample is yielded. Rows then pass through a bounded shuffle buffer.
"""

from __future__ import annotations

import io
import json
import os
import queue
import random
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from . import storage
from .commit import CommitRecord, committed_records
from .manifest import Manifest, read_manifest
from .tarstream import open_members
from .writer import LATENT_COLUMNS, from_storage

__all__ = ["LatentDataset", "DatasetError", "bucket_batches", "collate", "iter_shard_rows", "resolve_rank"]

_TAR_SUFFIXES = tuple(f".{c}.npy" for c in LATENT_COLUMNS) + (".json", ".txt")
_SIZE_COLUMNS = ("original_size", "crop_top_left", "target_size")


class DatasetError(ValueError):
    """The dataset cannot be read as asked; the message names the output, shard or option."""


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Rank and world size: given values, else torch.distributed, else RANK/WORLD_SIZE, else 0/1."""
    if rank is None or world_size is None:
        dist_rank, dist_world = None, None
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist_rank, dist_world = dist.get_rank(), dist.get_world_size()
        except Exception:
            pass
        if dist_rank is None:
            dist_rank = int(os.environ.get("RANK", "0"))
            dist_world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = dist_rank if rank is None else rank
        world_size = dist_world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise DatasetError(f"invalid rank {rank} for world size {world_size}")
    return int(rank), int(world_size)


@dataclass(frozen=True)
class _Unit:
    shard: str
    row_group: int | None  # None: the whole shard
    rows: int


# --------------------------------------------------------------------------------------------
# Reading one shard's rows as decoded numpy batches
# --------------------------------------------------------------------------------------------


def _column_latents(table, col: str, dtype: str, shapes: np.ndarray | None, fixed: tuple[int, ...] | None) -> list:
    arr = table.column(col).combine_chunks()
    values = from_storage(arr.flatten().to_numpy(zero_copy_only=False), dtype)
    n = len(arr)
    if fixed is not None:
        return list(values.reshape((n, *fixed)))
    out = []
    start = 0
    for shape in shapes:  # type: ignore[union-attr]
        size = int(np.prod(shape))
        out.append(values[start : start + size].reshape(tuple(int(v) for v in shape)))
        start += size
    return out


def _parquet_rows(table, dtype: str, fixed: tuple[int, ...] | None) -> list[dict[str, Any]]:
    names = table.column_names
    n = table.num_rows
    shapes = None
    if "latent_shape" in names:
        shapes = table.column("latent_shape").combine_chunks().flatten().to_numpy().reshape(n, 3)
        fixed = None
    cols: dict[str, list] = {}
    for col in LATENT_COLUMNS:
        if col in names:
            cols[col] = _column_latents(table, col, dtype, shapes, fixed)
    for col in ("key", "source", "index", "caption", "meta"):
        if col in names:
            cols[col] = table.column(col).to_pylist()
    for col in _SIZE_COLUMNS:
        if col in names:
            cols[col] = list(table.column(col).combine_chunks().flatten().to_numpy().reshape(n, 2))
    return [{k: v[i] for k, v in cols.items()} for i in range(n)]


def _tar_rows(fileobj, dtype: str, columns: set[str]) -> Iterator[dict[str, Any]]:
    current: str | None = None
    parts: dict[str, bytes] = {}

    def emit() -> dict[str, Any]:
        record = json.loads(parts[".json"])
        meta = record.get("meta", {})
        row: dict[str, Any] = {
            "key": record["key"],
            "source": record.get("source"),
            "index": record.get("index"),
            "caption": record.get("caption"),
            "meta": meta if isinstance(meta, str) else json.dumps(meta, sort_keys=True),
        }
        for col in _SIZE_COLUMNS:
            row[col] = np.asarray(record.get(col, (0, 0)), np.int32)
        for col in LATENT_COLUMNS:
            blob = parts.get(f".{col}.npy")
            if blob is not None and col in columns:
                row[col] = from_storage(np.load(io.BytesIO(blob), allow_pickle=False), record.get("dtype", dtype))
        return row

    # The project's tar reader: a damaged header fails the read instead of ending it early.
    for name, _, read in open_members(fileobj):
        suffix = next((s for s in _TAR_SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            continue
        key = name[: -len(suffix)]
        if key != current:
            if current is not None and ".json" in parts:
                yield emit()
            current, parts = key, {}
        parts[suffix] = read()
    if current is not None and ".json" in parts:
        yield emit()


def _shard_url(root: str, record: CommitRecord) -> str:
    return storage.join(root, record.shard_file)


def iter_shard_rows(
    root: str,
    record: CommitRecord,
    storage_options: Mapping[str, Any] | None = None,
    *,
    fixed_shape: Sequence[int] | None = None,
    columns: Iterable[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Raw rows of one committed shard in stored order, latents decoded to float32 numpy.

    Each row is a dict with the Parquet column names (`latent` etc. as float32 `[C, h, w]`,
    sizes as int32 arrays, `meta` as JSON text).
    """
    wanted = set(columns) if columns is not None else set(LATENT_COLUMNS)
    fixed = tuple(int(v) for v in fixed_shape) if fixed_shape else None
    url = _shard_url(root, record)
    with storage.open_input(url, storage_options) as f:
        if record.format == "wds":
            yield from _tar_rows(f, record.dtype, wanted)
            return
        pf = pq.ParquetFile(f)
        names = [n for n in pf.schema_arrow.names if n not in LATENT_COLUMNS or n in wanted]
        for i in range(pf.metadata.num_row_groups):
            yield from _parquet_rows(pf.read_row_group(i, columns=names), record.dtype, fixed)


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------


class LatentDataset(IterableDataset):
    """Iterate the committed rows of a latent OUTPUT (local path or fsspec URL) for training.

    Each item is a dict:
      `latent` float32 tensor `[C, h, w]`: scaled as `(z - shift_factor) * scaling_factor` with the
          manifest's factors (`scale=False`: raw); drawn from the posterior `mean + std * eps`
          when logvar is stored (`sample=False`: the mean); the flipped image's latent with
          probability 0.5 when flipped latents are stored (`flip=False`: never).
      `flipped` bool, `key`, `source` (input shard URL), `index` (int), `caption` (str, "" when
      none), `meta` (the sample's JSON metadata as text), `original_size`, `crop_top_left`,
      `target_size` (int64 tensors `[2]`, (h, w) / (top, left) for SDXL micro-conditioning).

    Rows are split across distributed ranks (`rank`/`world_size`, default from torch.distributed,
    else the RANK/WORLD_SIZE environment variables, else 0/1) and DataLoader workers so that each
    row is seen exactly once per epoch. Call `set_epoch(epoch)` before each epoch: the shard order,
    the shuffle buffer and the posterior noise are seeded by `(seed, epoch)`. With
    `persistent_workers=True` DataLoader workers keep the epoch they started with, so use
    non-persistent workers (the default) or a new iterator per epoch.

    Only shards committed when the dataset is constructed are read; pass `shards` to restrict
    (or pin) the list, which all ranks must agree on. `keys` keeps only the samples with those
    keys (a held-out set, a spot check): row groups of Parquet shards that hold none of them are
    skipped after reading their key column, so a few keys cost little more than the key columns.
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        shards: Sequence[str] | None = None,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        scale: bool = True,
        sample: bool = True,
        flip: bool = True,
        readahead: int = 2,
        keys: Iterable[str] | None = None,
    ):
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.manifest: Manifest = read_manifest(url, self.storage_options)
        records = committed_records(url, self.storage_options)
        if shards is not None:
            missing = [s for s in shards if s not in records]
            if missing:
                raise DatasetError(
                    f"{storage.redact(url)}: shard(s) not committed: {', '.join(missing[:10])}"
                    + (" ..." if len(missing) > 10 else "")
                )
            records = {s: records[s] for s in shards}
        self.records: dict[str, CommitRecord] = dict(sorted(records.items()))
        self.shuffle = shuffle
        self.shuffle_buffer = max(1, int(shuffle_buffer)) if shuffle else 1
        self.seed = int(seed)
        self.scale = scale
        self.sample = sample
        self.flip = flip
        self.readahead = max(1, int(readahead))
        self.epoch = 0
        #: Only these sample keys are yielded (None: all). Parquet row groups without any of
        #: them are skipped after reading their key column alone.
        self.keys: frozenset[str] | None = frozenset(keys) if keys is not None else None

    # -- planning --------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        """Committed rows in the dataset (all ranks together)."""
        return sum(r.rows for r in self.records.values())

    @property
    def shards(self) -> list[str]:
        return list(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: shard order, shuffle buffer and noise depend on (seed, epoch)."""
        self.epoch = int(epoch)

    def _units(self) -> list[_Unit]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        names = list(self.records)
        if self.shuffle:
            rng.shuffle(names)
        units: list[_Unit] = []
        for name in names:
            rec = self.records[name]
            if rec.rows == 0:
                continue
            if rec.format == "wds" or not rec.row_groups:
                units.append(_Unit(name, None, rec.rows))
                continue
            groups = [_Unit(name, i, n) for i, n in enumerate(rec.row_groups) if n > 0]
            if self.shuffle:
                rng.shuffle(groups)
            units.extend(groups)
        return units

    def _consumer(self) -> tuple[int, int, int]:
        info = get_worker_info()
        workers, worker_id = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker_id, self.world_size * workers, workers

    def units_for(self, consumer: int, consumers: int) -> list[tuple[str, int | None, int]]:
        """The (shard, row group, rows) units consumer `consumer` of `consumers` reads this epoch."""
        return [(u.shard, u.row_group, u.rows) for u in self._units()[consumer::consumers]]

    # -- reading ---------------------------------------------------------------------------
    def _columns(self) -> set[str]:
        cols = {"latent"}
        if self.sample and self.manifest.has_logvar:
            cols.add("logvar")
        if self.flip and self.manifest.flip:
            cols.add("latent_flip")
            if "logvar" in cols:
                cols.add("logvar_flip")
        return cols

    def _read_units(self, units: list[_Unit], out: queue.Queue, stop: threading.Event) -> None:
        """Producer thread: decode units in order, put lists of rows on `out`, then None."""

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        columns = self._columns()
        fixed = self.manifest.fixed_shape
        key_set = pa.array(sorted(self.keys), pa.string()) if self.keys is not None else None
        open_name: str | None = None
        handle = None
        pf = None
        names: list[str] = []
        shard = "?"
        try:
            for unit in units:
                if stop.is_set():
                    return
                shard = unit.shard
                record = self.records[shard]
                if record.format == "wds":
                    batch: list[dict[str, Any]] = []
                    with storage.open_input(_shard_url(self.url, record), self.storage_options) as f:
                        for row in _tar_rows(f, record.dtype, columns):
                            if self.keys is not None and row["key"] not in self.keys:
                                continue
                            batch.append(row)
                            if len(batch) >= 64:
                                if not put(batch):
                                    return
                                batch = []
                    if batch and not put(batch):
                        return
                    continue
                if open_name != unit.shard:
                    if handle is not None:
                        handle.close()
                    handle = storage.open_input(_shard_url(self.url, record), self.storage_options)
                    pf = pq.ParquetFile(handle)
                    open_name = unit.shard
                    if pf.metadata.num_row_groups != len(record.row_groups):
                        raise DatasetError(
                            f"{record.shard_file} has {pf.metadata.num_row_groups} row groups, its commit lists "
                            f"{len(record.row_groups)}"
                        )
                    names = [n for n in pf.schema_arrow.names if n not in LATENT_COLUMNS or n in columns]
                if key_set is not None:
                    wanted = pc.is_in(pf.read_row_group(unit.row_group, columns=["key"]).column("key"),
                                      value_set=key_set)
                    if not pc.any(wanted).as_py():
                        continue
                    table = pf.read_row_group(unit.row_group, columns=names).filter(wanted)
                else:
                    table = pf.read_row_group(unit.row_group, columns=names)
                if not put(_parquet_rows(table, record.dtype, fixed)):
                    return
            put(None)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(DatasetError(f"{storage.redact(self.url)}: reading shard {shard!r} failed: {e}"))
        finally:
            if handle is not None:
                handle.close()

    def _rows(self, units: list[_Unit]) -> Iterator[dict[str, Any]]:
        out: queue.Queue = queue.Queue(maxsize=self.readahead)
        stop = threading.Event()
        thread = threading.Thread(target=self._read_units, args=(units, out, stop), daemon=True)
        thread.start()
        try:
            while True:
                item = out.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield from item
        finally:
            stop.set()
            thread.join(timeout=5)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        consumer, consumers, _ = self._consumer()
        units = self._units()[consumer::consumers]
        seed = [self.seed, self.epoch, consumer]
        rng = np.random.default_rng(seed)
        noise = torch.Generator().manual_seed(int(np.random.default_rng(seed + [1]).integers(2**62)))
        buffer: list[dict[str, Any]] = []
        size = self.shuffle_buffer
        for row in self._rows(units):
            if len(buffer) < size:
                buffer.append(row)
                continue
            j = int(rng.integers(size))
            buffer[j], row = row, buffer[j]
            yield self._item(row, rng, noise)
        if self.shuffle:
            order = rng.permutation(len(buffer))
            buffer = [buffer[i] for i in order]
        for row in buffer:
            yield self._item(row, rng, noise)

    def _item(self, row: dict[str, Any], rng: np.random.Generator, noise: torch.Generator) -> dict[str, Any]:
        flipped = False
        latent, logvar = row["latent"], row.get("logvar")
        if "latent_flip" in row and rng.random() < 0.5:
            flipped = True
            latent, logvar = row["latent_flip"], row.get("logvar_flip")
        z = torch.from_numpy(np.array(latent, np.float32))
        if self.sample and logvar is not None:
            std = torch.exp(0.5 * torch.from_numpy(np.clip(np.asarray(logvar, np.float32), -30.0, 20.0)))
            z = z + std * torch.randn(z.shape, generator=noise)
        if self.scale:
            z = (z - self.manifest.shift_factor) * self.manifest.scaling_factor
        item: dict[str, Any] = {
            "latent": z,
            "flipped": flipped,
            "key": row["key"],
            "source": row.get("source") or "",
            "index": int(row.get("index") or 0),
            "caption": row.get("caption") or "",
            "meta": row.get("meta") or "{}",
        }
        for col in _SIZE_COLUMNS:
            item[col] = torch.as_tensor(np.asarray(row[col], np.int64))
        return item

    def batched(self, batch_size: int, drop_last: bool = False) -> _BucketBatched:
        """An IterableDataset of same-shape batches (see `bucket_batches`), built in each worker.

        Use with `DataLoader(ds.batched(32), batch_size=None, num_workers=...)`.
        """
        return _BucketBatched(self, batch_size, drop_last)


class _BucketBatched(IterableDataset):
    def __init__(self, dataset: LatentDataset, batch_size: int, drop_last: bool):
        self.dataset = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return bucket_batches(self.dataset, self.batch_size, drop_last=self.drop_last)


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack same-shape samples: tensors stacked, numbers/bools as tensors, strings as lists."""
    out: dict[str, Any] = {}
    for k in samples[0]:
        values = [s[k] for s in samples]
        first = values[0]
        if isinstance(first, torch.Tensor):
            out[k] = torch.stack(values)
        elif isinstance(first, (bool, int, float)):
            out[k] = torch.tensor(values)
        else:
            out[k] = values
    return out


def bucket_batches(
    samples: Iterable[Mapping[str, Any]],
    batch_size: int,
    *,
    drop_last: bool = False,
    collate_fn=collate,
) -> Iterator[Any]:
    """Group samples whose `latent` shapes match (aspect buckets) into batches of `batch_size`.

    A batch is emitted as soon as one shape has `batch_size` samples; at the end the incomplete
    batches are emitted too unless `drop_last`. `collate_fn=None` yields lists of samples.
    """
    if batch_size < 1:
        raise DatasetError(f"batch_size must be >= 1, got {batch_size}")
    pending: dict[tuple[int, ...], list[Mapping[str, Any]]] = {}
    for s in samples:
        shape = tuple(s["latent"].shape)
        group = pending.setdefault(shape, [])
        group.append(s)
        if len(group) == batch_size:
            del pending[shape]
            yield collate_fn(group) if collate_fn else group
    if not drop_last:
        for group in pending.values():
            yield collate_fn(group) if collate_fn else group
