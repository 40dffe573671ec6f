"""Training-side reader: `LatentDataset`, a PyTorch IterableDataset over a latent OUTPUT.

The epoch plan
    Every rank and DataLoader worker computes the same plan from the shard list, `seed` and the
    epoch, without talking to the others:

    1. Order. The committed shards are shuffled, then the row groups inside each shard (a tar
       shard of format "wds" is one unit); laid end to end they put the epoch's N samples in one
       sequence. Row counts come from the index's columns (numpy, no object per shard), so no
       file is opened to plan.
    2. Ranks. The sequence (after a resume: what is left of it, M samples) is cut into
       `world_size` contiguous slices of one length L: ceil(M / world_size), the last slice
       wrapping around to the start of the sequence for the few samples it lacks (pad, the
       default: fewer than `world_size` repeats), or floor(M / world_size) with the rest dropped
       (`drop_last=True`). `len(dataset)` is L.
    3. Workers. A rank's slice is cut into `num_workers` contiguous parts whose lengths differ by
       at most one, with the longer parts first. Every rank has the same parts, so a DataLoader
       makes the same batches, in the same number, on every rank. A part starts and ends where it
       must, inside a row group if need be: a boundary row group is read by both neighbours and
       nothing else is read twice, so ranks read the same amount.
    4. Shuffle. A consumer's part is cut into blocks of `shuffle_buffer` samples and each block is
       yielded in a seeded permutation: the block is the shuffle window and the memory bound. The
       first blocks are smaller (64, 128, ... samples), so that the first sample comes early.

Resume
    A consumer's position is one number, the samples it has yielded. Block and permutation follow
    from it arithmetically, so resuming reads the position's block and nothing before it. An
    elastic resume (`state_dict(samples_seen)`) works out from the sample count what every old
    consumer had yielded, keeps the rest of the epoch as ranges of the sequence, and cuts those
    ranges up for the new world size as in steps 2-4.

Integrity
    Parquet pages written with checksums are verified on every read, the file's schema is checked
    against the manifest's and its row groups against the commit; tar shards with a per-sample
    checksum member have every member checked. `verify=True` also checks each shard's sha256
    against its commit before any of its rows is used. A failed check raises `ShardError` naming
    the shard and row group (or sample), or with `on_error="skip"` is skipped with a warning and
    counted, the lost samples replaced by repeats so that every rank keeps its length.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import os
import queue
import random
import tarfile
import threading
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from . import storage
from .commit import CommitRecord
from .index import READER_COLUMNS, ShardIndex, load_index
from .manifest import Manifest, read_manifest
from .schema import (
    CHECKSUM_SUFFIX,
    FP8,
    LATENT_COLUMNS,
    SIZE_COLUMNS,
    from_storage,
    latent_scales,
    scale_column,
    storage_arrow_type,
)
from .tarstream import open_members
from .text import TEXT_MEMBER_SUFFIX, TextLayout, read_npz_text, read_parquet_text, text_item

__all__ = [
    "LatentDataset",
    "DatasetError",
    "DatasetWarning",
    "ShardError",
    "bucket_batches",
    "collate",
    "iter_shard_rows",
    "resolve_rank",
]

#: The per-sample checksum member of a tar shard: JSON `{member suffix: crc32 as 8 hex digits}`
#: for every other member of the sample (`{"json": ..., "latent.npy": ..., "txt": ...}`).
_TAR_SUFFIXES = (tuple(f".{c}.npy" for c in LATENT_COLUMNS) + tuple(f".{scale_column(c)}.npy" for c in LATENT_COLUMNS)
                 + (".json", ".txt", CHECKSUM_SUFFIX, TEXT_MEMBER_SUFFIX))
_STATE_VERSION = 1
_MASK64 = (1 << 64) - 1


class DatasetError(ValueError):
    """The dataset cannot be read as asked; the message names the output, shard or option."""


class ShardError(DatasetError):
    """A committed shard failed a check or could not be read: wrong checksum, truncated, missing.

    `shard` names it; `row_group` (Parquet) or `key` (tar sample) says where, when known.
    """

    def __init__(self, url: str, shard: str, reason: str, *, row_group: int | None = None, key: str | None = None):
        self.shard = shard
        self.row_group = row_group
        self.key = key
        where = f", row group {row_group}" if row_group is not None else ""
        where += f", sample {key!r}" if key is not None else ""
        super().__init__(f"{storage.redact(url)}: shard {shard!r}{where}: {reason}")


class DatasetWarning(UserWarning):
    """Shards left out of the dataset (broken or uncommitted), or skipped under `on_error="skip"`."""


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


def _committed_shards(
    url: str, storage_options: Mapping[str, Any] | None, *, sha256: bool
) -> tuple[ShardIndex, dict[str, str]]:
    """The committed shards of OUTPUT `url` as index columns (`READER_COLUMNS`, and `shard_sha256`
    with `sha256`), and the shards present but not read, with why.

    The one place the reader learns the shard list. It comes from the consolidated index
    (`pipeline.index`): a few requests per rank when it is current, a LIST of `_commits/` otherwise,
    never one request per shard. Broken are commits that cannot be parsed and indexed shards whose
    commit is gone. Shard files without any commit are found only when the commits had to be listed
    anyway: one more LIST (of `shards/`), the same order of requests; a current index vouches for
    itself.
    """
    columns = READER_COLUMNS + (("shard_sha256",) if sha256 else ())
    index = load_index(url, storage_options, columns=columns)
    excluded = {name: f"broken: {why}" for name, why in index.broken.items()}
    excluded.update({name: "broken: its commit record is gone (the index listed it)" for name in index.dropped})
    if not index.current:
        files = storage.list_files(storage.join(url, "shards"), storage_options)
        names = {f.rsplit(".", 1)[0] for f in files if not f.startswith(".")}
        for name in sorted(names - set(index.names) - set(excluded)):
            excluded[name] = "uncommitted: a shard file without a commit record"
    return index, excluded


# --------------------------------------------------------------------------------------------
# Decoding rows
# --------------------------------------------------------------------------------------------


def _column_latents(table, col: str, dtype: str, shapes: np.ndarray | None, fixed: tuple[int, ...] | None) -> list:
    arr = table.column(col).combine_chunks()
    values = arr.flatten().to_numpy(zero_copy_only=False)
    # fp16 stays fp16 here: the one copy to float32 is made per item, where it is needed anyway.
    values = from_storage(values, dtype) if dtype == "bf16" else values
    n = len(arr)
    scales = latent_scales(table, col)  # fp8: per row and channel
    if fixed is not None:
        values = values.reshape((n, *fixed))
        return list(values if scales is None else from_storage(values, dtype, scales))
    out = []
    start = 0
    for i, shape in enumerate(shapes):  # type: ignore[arg-type]
        size = int(np.prod(shape))
        value = values[start : start + size].reshape(tuple(int(v) for v in shape))
        out.append(value if scales is None else from_storage(value, dtype, scales[i]))
        start += size
    if start != len(values):
        raise ValueError(f"column {col!r} holds {len(values)} values, its latent_shape says {start}")
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
    for col in SIZE_COLUMNS:
        if col in names:
            cols[col] = list(table.column(col).combine_chunks().flatten().to_numpy().astype(np.int64).reshape(n, 2))
    cols.update(read_parquet_text(table))
    return [{k: v[i] for k, v in cols.items()} for i in range(n)]


def _checksum_problem(parts: Mapping[str, bytes], seen: set[str]) -> str | None:
    """What is wrong with a tar sample against its checksum member (None: every member matches).

    `parts` are the members read (suffix -> bytes), `seen` the suffixes of all its members.
    """
    try:
        listed = json.loads(parts[CHECKSUM_SUFFIX])
    except ValueError:
        return "its checksum member is not valid JSON"
    if not isinstance(listed, dict):
        return "its checksum member is not a JSON object"
    names = {"." + str(k) for k in listed}
    if seen - names - {CHECKSUM_SUFFIX}:
        return f"member(s) {sorted(seen - names - {CHECKSUM_SUFFIX})} have no checksum"
    if names - seen:
        return f"member(s) {sorted(names - seen)} listed in its checksums are missing"
    for suffix, data in parts.items():
        if suffix != CHECKSUM_SUFFIX and f"{zlib.crc32(data):08x}" != listed[suffix[1:]]:
            return f"member {suffix[1:]!r} fails its crc32"
    return None


def _tar_row(parts: Mapping[str, bytes], dtype: str, columns: set[str]) -> dict[str, Any]:
    record = json.loads(parts[".json"])
    meta = record.get("meta", {})
    row: dict[str, Any] = {
        "key": record["key"],
        "source": record.get("source"),
        "index": record.get("index"),
        "caption": record.get("caption"),
        "meta": meta if isinstance(meta, str) else json.dumps(meta, sort_keys=True),
    }
    for col in SIZE_COLUMNS:
        row[col] = np.asarray(record.get(col, (0, 0)), np.int64)
    for col in LATENT_COLUMNS:
        blob = parts.get(f".{col}.npy")
        if blob is not None and col in columns:
            scale = parts.get(f".{scale_column(col)}.npy")  # fp8 only
            row[col] = from_storage(np.load(io.BytesIO(blob), allow_pickle=False), record.get("dtype", dtype),
                                    None if scale is None else np.load(io.BytesIO(scale), allow_pickle=False))
    if TEXT_MEMBER_SUFFIX in parts:
        row.update(read_npz_text(parts[TEXT_MEMBER_SUFFIX], record.get("text_dtypes", {})))
    return row


class _TarCursor:
    """The samples of one tar shard, in order; a skipped sample costs its headers only.

    A sample is the members sharing a key; it is a row when it has a `.json` member. Checksum
    members are checked where present; once a sample has one, every later sample must too.
    """

    def __init__(self, handle, url: str, record: CommitRecord):
        self.url = url
        self.record = record
        self.row = 0
        self._members = open_members(handle)
        self._peek: tuple[str, int, Callable[[], bytes]] | None = None
        self._checked = False

    def _member(self):
        if self._peek is not None:
            m, self._peek = self._peek, None
            return m
        return next(self._members, None)

    def next_sample(self, read: bool) -> tuple[str, dict[str, bytes], set[str]] | None:
        """(key, members read, suffixes of all its members) of the next row, None at the end."""
        while True:
            key: str | None = None
            parts: dict[str, bytes] = {}
            seen: set[str] = set()
            while True:
                m = self._member()
                if m is None:
                    break
                name, _, reader = m
                suffix = next((s for s in _TAR_SUFFIXES if name.endswith(s)), None)
                if suffix is None:
                    continue
                k = name[: -len(suffix)]
                if key is None:
                    key = k
                elif k != key:
                    self._peek = m
                    break
                seen.add(suffix)
                if read:
                    parts[suffix] = reader()
            if key is None:
                return None
            if ".json" in seen:
                self.row += 1
                return key, parts, seen

    def rows(self, count: int, dtype: str, columns: set[str], on_damage: Callable[[ShardError], None]) -> list:
        """Decode the next `count` rows; a damaged one becomes `_DAMAGED` after `on_damage`."""
        out: list = []
        for _ in range(count):
            sample = self.next_sample(read=True)
            if sample is None:
                raise ShardError(self.url, self.record.name,
                                 f"ends after {self.row} samples, its commit lists {self.record.rows}")
            key, parts, seen = sample
            problem = None
            if CHECKSUM_SUFFIX in seen:
                self._checked = True
                problem = _checksum_problem(parts, seen)
            elif self._checked:
                problem = "no checksum member, unlike the samples before it"
            if problem is None:
                try:
                    out.append(_tar_row(parts, dtype, columns))
                    continue
                except (ValueError, KeyError, TypeError) as e:
                    problem = f"cannot be decoded: {e}"
            on_damage(ShardError(self.url, self.record.name, problem, key=key))
            out.append(_DAMAGED)
        return out

    def skip(self, count: int) -> None:
        for _ in range(count):
            if self.next_sample(read=False) is None:
                raise ShardError(self.url, self.record.name,
                                 f"ends after {self.row} samples, its commit lists {self.record.rows}")


def _raise(error: ShardError) -> None:
    raise error


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
    sizes as int64 arrays, `meta` as JSON text). Page checksums and tar checksum members are
    verified where the shard has them; a failed check raises `ShardError`.
    """
    wanted = set(columns) if columns is not None else set(LATENT_COLUMNS)
    fixed = tuple(int(v) for v in fixed_shape) if fixed_shape else None
    url = storage.join(root, record.shard_file)
    with storage.open_input(url, storage_options) as f:
        if record.format == "wds":
            cursor = _TarCursor(f, root, record)
            try:
                while cursor.row < record.rows:
                    yield from cursor.rows(1, record.dtype, wanted, _raise)
            except (OSError, tarfile.TarError) as e:
                raise ShardError(root, record.name, f"cannot be read: {e}") from e
            return
        try:
            pf = pq.ParquetFile(f, page_checksum_verification=True)
        except (OSError, pa.ArrowException) as e:
            raise ShardError(root, record.name, f"is not a readable Parquet file: {e}") from e
        names = [n for n in pf.schema_arrow.names if n not in LATENT_COLUMNS or n in wanted]
        for i in range(pf.metadata.num_row_groups):
            try:
                rows = _parquet_rows(pf.read_row_group(i, columns=names), record.dtype, fixed)
            except (OSError, pa.ArrowException, ValueError) as e:
                raise ShardError(root, record.name, f"cannot be read: {e}", row_group=i) from e
            for row in rows:
                yield {k: v.astype(np.float32, copy=False) if k in LATENT_COLUMNS else v for k, v in row.items()}


# --------------------------------------------------------------------------------------------
# The epoch plan: one sample sequence, cut into equal slices
# --------------------------------------------------------------------------------------------


def _mix(*values: int) -> int:
    """A 64-bit hash of integers (splitmix64 steps): seeds that differ in any value are unrelated."""
    h = 0
    for v in values:
        h = (h + (int(v) & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h


@dataclass(frozen=True)
class _Unit:
    shard: str
    row_group: int | None  # None: a whole tar shard
    rows: int
    position: int  # the shard's, in the dataset's records


# Arrow <-> numpy through the buffers: pyarrow's own conversions (`to_numpy`, `pa.array`, scalars)
# import pandas, 0.2 s and 50 MB in a process that has no other use for it.


def _numpy(column: pa.ChunkedArray, dtype=np.int64) -> np.ndarray:
    """An integer or boolean Arrow column as numpy `dtype`, nulls as 0 (False)."""
    parts = [np.zeros(0, dtype)]
    for chunk in column.chunks:
        n, offset = len(chunk), chunk.offset
        if not n:
            continue
        if pa.types.is_boolean(chunk.type):
            values = _bits(chunk.buffers()[1], offset, n)
        else:
            width = chunk.type.bit_width // 8
            values = np.frombuffer(chunk.buffers()[1], f"<i{width}", n, offset * width)
        if chunk.null_count:
            values = np.where(_bits(chunk.buffers()[0], offset, n), values, 0)
        parts.append(values.astype(dtype, copy=False))
    return np.concatenate(parts)


def _bits(buffer: pa.Buffer, offset: int, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(buffer, np.uint8), bitorder="little")[offset : offset + n].astype(bool)


def _arrow_positions(positions: np.ndarray) -> pa.Array:
    """int64 numpy as an Arrow array (for `take`)."""
    positions = np.ascontiguousarray(positions, np.int64)
    return pa.Array.from_buffers(pa.int64(), len(positions), [None, pa.py_buffer(positions)])


class _Units:
    """The units of an epoch as arrays: shard position, row group (-1: a whole tar shard), rows.
    `units[u]` builds unit `u`."""

    def __init__(self, names: pa.ChunkedArray, shard: np.ndarray, group: np.ndarray, rows: np.ndarray):
        self._names = names
        self.shard = shard
        self.group = group
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, u: int) -> _Unit:
        group = int(self.group[u])
        shard = int(self.shard[u])
        return _Unit(self._names[shard].as_py(), None if group < 0 else group, int(self.rows[u]), shard)


class _Order:
    """An epoch's sample sequence: shards shuffled, then their row groups; sample g is row
    `g - starts[u]` of unit `u`.

    Built with numpy from the index's columns: at 10^5 shards it makes no Python object per shard
    or row group, except to shuffle the row groups of shards that have several.
    """

    def __init__(self, shards: ShardIndex, seed: int, epoch: int, shuffle: bool):
        rng = random.Random(f"{seed}:{epoch}")
        table = shards.table
        n = table.num_rows
        rows = _numpy(table.column("rows"))
        lists = table.column("row_groups")
        counts = _numpy(pc.list_value_length(lists))
        values = _numpy(pc.list_flatten(lists))
        whole = _numpy(pc.match_substring_regex(table.column("format"), pattern="^wds$"), bool) | (counts == 0)
        # The shards' order. A shuffle's draws depend on the length alone: shuffling positions
        # orders the shards as shuffling their names does.
        order = list(range(n))
        if shuffle:
            rng.shuffle(order)
        order = np.asarray(order, np.int64)
        order = order[rows[order] > 0]
        # Row groups with rows: their flat positions, grouped by shard, and how many each shard has.
        nonzero = np.flatnonzero(values > 0)
        per_shard = np.bincount(np.repeat(np.arange(n), counts)[nonzero], minlength=n)
        first_nonzero = np.cumsum(per_shard) - per_shard
        first_group = np.cumsum(counts) - counts
        # One unit per whole shard, else one per row group with rows, in row group order ...
        per_unit = np.where(whole[order], 1, per_shard[order])
        shard = np.repeat(order, per_unit)
        first_unit = np.cumsum(per_unit) - per_unit
        local = np.arange(len(shard)) - np.repeat(first_unit, per_unit)
        # ... then shuffled within the shard, in shard order (the draws of a shard of one unit are none).
        if shuffle:
            for k in np.flatnonzero(~whole[order] & (per_unit > 1)):
                perm = list(range(int(per_unit[k])))
                rng.shuffle(perm)
                local[first_unit[k] : first_unit[k] + per_unit[k]] = perm
        grouped = np.flatnonzero(~whole[shard])
        flat = nonzero[first_nonzero[shard[grouped]] + local[grouped]]
        group = np.full(len(shard), -1, np.int64)
        group[grouped] = flat - first_group[shard[grouped]]
        unit_rows = rows[shard]
        unit_rows[grouped] = values[flat]
        self.units = _Units(table.column("name"), shard, group, unit_rows)
        self.starts = np.concatenate([[0], np.cumsum(unit_rows)]).astype(np.int64)
        self.total = int(self.starts[-1])

    def runs(self, g: int, n: int) -> Iterator[tuple[int, int, int]]:
        """(unit, first row, end row) covering samples [g, g + n) of the sequence."""
        u = int(np.searchsorted(self.starts, g, side="right")) - 1
        while n > 0:
            row = g - int(self.starts[u])
            take = min(n, int(self.units.rows[u]) - row)
            yield u, row, row + take
            g += take
            n -= take
            u += 1


@dataclass(frozen=True)
class _Plan:
    """What an epoch reads: `ranges` of its sample sequence, in order (the whole sequence unless a
    resume took part of it); `start` samples of the epoch were consumed before the plan began."""

    epoch: int
    ranges: tuple[tuple[int, int], ...]
    start: int = 0

    @cached_property
    def _offsets(self) -> list[int]:
        out = [0]
        for a, b in self.ranges:
            out.append(out[-1] + b - a)
        return out

    @property
    def total(self) -> int:
        """Samples the plan holds (M)."""
        return self._offsets[-1]

    def pieces(self, j: int, n: int) -> Iterator[tuple[int, int, int]]:
        """(plan position, sequence index, length) runs for plan positions [j, j + n); positions
        past the end wrap around to the start (padding)."""
        total = self.total
        while n > 0:
            jm = j % total
            k = bisect.bisect_right(self._offsets, jm) - 1
            a, b = self.ranges[k]
            off = jm - self._offsets[k]
            take = min(n, b - a - off)
            yield j, a + off, take
            j += take
            n -= take

    def sequence_ranges(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Sequence ranges of plan positions [lo, hi) (within [0, total))."""
        return [(g, g + n) for _, g, n in self.pieces(lo, hi - lo)] if hi > lo else []


def _merge(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        elif b > a:
            out.append((a, b))
    return tuple(out)


def _rank_span(total: int, world: int, rank: int, mode: str) -> tuple[int, int]:
    """(first plan position, length) of rank `rank`: "pad" and "drop" give every rank one
    length; "exact" (a `keys` filter) splits without padding."""
    if mode == "pad":
        length = -(-total // world)
        return rank * length, length
    if mode == "drop":
        length = total // world
        return rank * length, length
    lo, hi = rank * total // world, (rank + 1) * total // world
    return lo, hi - lo


def _worker_span(length: int, workers: int, worker: int) -> tuple[int, int]:
    """(offset in the rank's slice, length) of DataLoader worker `worker`; longer parts first."""
    base, extra = divmod(length, workers)
    return worker * base + min(worker, extra), base + (1 if worker < extra else 0)


def _consumed_per_worker(samples: int, lengths: Sequence[int], batch: int) -> list[int]:
    """Samples each DataLoader worker had yielded when a rank had consumed `samples`.

    The DataLoader takes one batch of `batch` (or what is left) from each worker in turn,
    skipping workers that are done. Raises DatasetError when `samples` ends inside a batch.
    """

    def after(rounds: int) -> list[int]:
        return [min(n, rounds * batch) for n in lengths]

    lo, hi = 0, max((-(-n // batch) for n in lengths), default=0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(after(mid)) <= samples:
            lo = mid
        else:
            hi = mid - 1
    done = after(lo)
    left = samples - sum(done)
    for w, n in enumerate(lengths):
        size = min(batch, n - done[w])
        if left <= 0 or size <= 0:
            continue
        if size > left:
            break
        done[w] += size
        left -= size
    if left:
        raise DatasetError(
            f"samples_seen ends inside a batch: with batch_size {batch} and {len(lengths)} worker(s) per rank "
            f"a rank cannot have consumed exactly {samples} samples"
        )
    return done


#: The first shuffle block of a part holds this many samples, the next ones twice as many each, up
#: to `shuffle_buffer`: the first sample needs a few rows read, not a whole block.
_FIRST_BLOCK = 64


def _block_of(p: int, block: int) -> tuple[int, int, int]:
    """(block index, first slot, nominal size) of the block holding slot `p` of a part."""
    if block <= _FIRST_BLOCK:
        b = p // block
        return b, b * block, block
    ramp = max(0, (block - 1) // _FIRST_BLOCK).bit_length()  # blocks of 64, 128, ... below `block`
    ramp_slots = _FIRST_BLOCK * ((1 << ramp) - 1)
    if p < ramp_slots:
        b = (p // _FIRST_BLOCK + 1).bit_length() - 1
        return b, _FIRST_BLOCK * ((1 << b) - 1), _FIRST_BLOCK << b
    b = (p - ramp_slots) // block
    return ramp + b, ramp_slots + b * block, block


def _block_of_index(b: int, block: int) -> tuple[int, int, int]:
    """(b, first slot, nominal size) of block `b` (see `_block_of`)."""
    if block <= _FIRST_BLOCK:
        return b, b * block, block
    ramp = max(0, (block - 1) // _FIRST_BLOCK).bit_length()
    if b < ramp:
        return b, _FIRST_BLOCK * ((1 << b) - 1), _FIRST_BLOCK << b
    return b, _FIRST_BLOCK * ((1 << ramp) - 1) + (b - ramp) * block, block


def _block_perm(seed: int, plan: _Plan, first: int, block: int, size: int) -> np.ndarray:
    """The order in which a consumer starting at plan position `first` yields block `block` (of
    `size` slots)."""
    return np.random.default_rng(_mix(seed, plan.epoch, plan.start, first, block)).permutation(size)


def _advance(plan: _Plan, resume: Mapping[str, Any], seed: int) -> _Plan:
    """What is left of `plan` once the job had consumed `resume["samples_seen"]` samples of the
    epoch, laid out by `resume` (world size, DataLoader workers and batch size, drop_last, block)."""
    world = int(resume["world_size"])
    workers = max(1, int(resume["num_workers"]))
    batch = max(1, int(resume["batch_size"]))
    block = max(1, int(resume["block"]))
    consumed = int(resume["samples_seen"]) - plan.start
    mode = "drop" if resume["drop_last"] else "pad"
    _, length = _rank_span(plan.total, world, 0, mode)
    if consumed < 0 or consumed % world or consumed // world > length:
        raise DatasetError(
            f"samples_seen {resume['samples_seen']} does not fit the epoch: {world} rank(s) of {length} "
            f"samples each after {plan.start} consumed before"
        )
    parts = [_worker_span(length, workers, w) for w in range(workers)]
    done = _consumed_per_worker(consumed // world, [n for _, n in parts], batch)
    left: list[tuple[int, int]] = []
    for r in range(world):
        rank_first, _ = _rank_span(plan.total, world, r, mode)
        for (offset, n), k in zip(parts, done):
            first = rank_first + offset
            # Positions past the plan's end were padding: repeats, not owed to the rest.
            end = min(first + n, plan.total)
            b, start, nominal = _block_of(k, block)
            o = k - start
            lo = first + start
            if o:
                # The block in progress: what its permutation had not reached yet, in slot order.
                size = min(nominal, n - start)
                slots = np.sort(_block_perm(seed, plan, first, b, size)[o:])
                breaks = np.flatnonzero(np.diff(slots) != 1) + 1
                for run in np.split(slots, breaks):
                    left.extend(plan.sequence_ranges(lo + int(run[0]), min(lo + int(run[-1]) + 1, end)))
                lo += size
            left.extend(plan.sequence_ranges(lo, end))
    return _Plan(plan.epoch, _merge(left), int(resume["samples_seen"]))


@dataclass(frozen=True)
class _Consumer:
    """One reader of the plan: DataLoader worker `worker` of `workers` on rank `rank` of `world`;
    it yields plan positions [first, first + length)."""

    rank: int
    world: int
    worker: int
    workers: int
    first: int
    length: int


def _worker_context() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


# --------------------------------------------------------------------------------------------
# Reading planned rows
# --------------------------------------------------------------------------------------------


class _Damaged:
    """Stands for a row that failed its check under `on_error="skip"`."""


_DAMAGED = _Damaged()
_SKIPPED = object()  # a row of a batch that was not decoded


def _expected_types(manifest: Manifest, dtype: str) -> dict[str, pa.DataType]:
    """Arrow type of every column a shard of this output holds (what its writer wrote)."""
    value = storage_arrow_type(dtype)
    fixed = manifest.fixed_shape
    latent = pa.list_(value, int(np.prod(fixed))) if fixed else pa.list_(value)
    types: dict[str, pa.DataType] = {
        "key": pa.string(), "source": pa.string(), "index": pa.int64(), "caption": pa.string(), "meta": pa.string(),
    }
    for col in LATENT_COLUMNS:
        types[col] = latent
        if dtype == FP8:
            types[scale_column(col)] = pa.list_(pa.float32(), manifest.latent_channels)
    if not fixed:
        types["latent_shape"] = pa.list_(pa.int32(), 3)
    for col in SIZE_COLUMNS:
        types[col] = pa.list_(pa.int32(), 2)
    types.update({f.name: f.type for f in TextLayout.from_manifest(manifest.text).fields()})
    return types


#: The reader decodes row groups in batches of about this many stored bytes (64 to 1024 rows):
#: small enough that the first sample is not held up by a whole row group.
_BATCH_BYTES = 1 << 19
_BATCH_ROWS = (64, 1024)
_REMOTE_BLOCK = 4 << 20


class _RowGroupRows:
    """The rows of one Parquet row group, decoded batch by batch as far as asked; batches wholly
    before the first row asked for are not decoded."""

    def __init__(self, key: tuple[str, int], batches: Iterator, dtype: str, fixed: tuple[int, ...] | None):
        self.key = key
        self.rows: list = []
        self._batches = batches
        self._dtype = dtype
        self._fixed = fixed

    def skipped(self, lo: int) -> bool:
        """True when row `lo` went by undecoded (a range before it was asked for first)."""
        return lo < len(self.rows) and self.rows[lo] is _SKIPPED

    def decode(self, lo: int, hi: int) -> Iterator[int]:
        """Decode up to row `hi`, yielding the rows available after each batch."""
        if len(self.rows) >= hi:
            yield hi
            return
        while len(self.rows) < hi:
            batch = next(self._batches, None)
            if batch is None:
                raise ValueError(f"the row group ends after {len(self.rows)} rows")
            if len(self.rows) + batch.num_rows <= lo:
                self.rows.extend([_SKIPPED] * batch.num_rows)
                continue
            self.rows.extend(_parquet_rows(pa.Table.from_batches([batch]), self._dtype, self._fixed))
            yield min(len(self.rows), hi)


class _ShardReader:
    """Reads rows of planned units for one consumer: keeps the current Parquet file (or tar
    stream) open across units and the last row group decoded, checks every shard it opens."""

    def __init__(self, ds: LatentDataset, on_damage: Callable[[ShardError], None]):
        self.ds = ds
        self.on_damage = on_damage
        self.columns = ds._columns()
        self.key_set = pa.array(sorted(ds.keys), pa.string()) if ds.keys is not None else None
        self._pq: tuple[str, Any, pq.ParquetFile, list[str]] | None = None
        self._tar: tuple[str, Any, _TarCursor] | None = None
        self._rows: _RowGroupRows | None = None

    def close(self) -> None:
        for held in (self._pq, self._tar):
            if held is not None:
                held[1].close()
        self._pq = self._tar = None

    def _url(self, record: CommitRecord) -> str:
        return storage.join(self.ds.url, record.shard_file)

    def _open(self, record: CommitRecord):
        """Open the shard file, checking its size against the commit (it may have changed since
        the listing)."""
        # Remote blocks of 4 MiB (the next one prefetched): the first sample waits for one, not
        # for a whole shard.
        handle = storage.open_input(self._url(record), self.ds.storage_options, block_size=_REMOTE_BLOCK)
        size = getattr(handle, "size", None)
        want = record.files.get(record.shard_file, {}).get("size")
        if size is not None and want is not None and int(size) != int(want):
            handle.close()
            raise ShardError(self.ds.url, record.name, f"has {size} bytes, its commit says {want}")
        return handle

    def _verify(self, record: CommitRecord) -> None:
        if not self.ds.verify or record.name in self.ds._verified:
            return
        want = record.files.get(record.shard_file, {}).get("sha256")
        h = hashlib.sha256()
        try:
            with storage.open_input(self._url(record), self.ds.storage_options) as f:
                for chunk in storage.iter_chunks(f):
                    h.update(chunk)
        except OSError as e:
            raise ShardError(self.ds.url, record.name, f"cannot be read: {e}") from e
        if h.hexdigest() != want:
            raise ShardError(self.ds.url, record.name,
                             f"sha256 {h.hexdigest()[:16]}... differs from its commit's {str(want)[:16]}...")
        self.ds._verified.add(record.name)

    def chunks(self, unit: _Unit, lo: int, hi: int) -> Iterator[list]:
        """Rows `lo:hi` of `unit` in consecutive chunks, as they are decoded: row dicts, None for
        rows the `keys` filter drops, `_DAMAGED`."""
        record = self.ds.records.at(unit.position)
        try:
            self._verify(record)
            if record.format == "wds":
                yield from self._tar_chunks(record, lo, hi)
            elif self.key_set is not None:
                yield self._read_parquet_keys(record, unit.row_group, lo, hi)
            else:
                yield from self._parquet_chunks(record, unit.row_group, lo, hi)
        except ShardError:
            raise
        except Exception as e:  # anything wrong inside a shard is about that shard
            raise ShardError(self.ds.url, record.name, f"cannot be read: {type(e).__name__}: {e}",
                             row_group=unit.row_group) from e

    def read(self, unit: _Unit, lo: int, hi: int) -> list:
        """Rows `lo:hi` of `unit` (see `chunks`)."""
        return [row for chunk in self.chunks(unit, lo, hi) for row in chunk]

    # -- parquet ---------------------------------------------------------------------------
    def _parquet(self, record: CommitRecord) -> tuple[pq.ParquetFile, list[str]]:
        if self._pq is not None and self._pq[0] == record.name:
            return self._pq[2], self._pq[3]
        if self._pq is not None:
            self._pq[1].close()
            self._pq = None
            self._rows = None
        handle = self._open(record)
        try:
            # buffer_size: column chunks are read in pieces as the batches need them, not whole.
            pf = pq.ParquetFile(handle, page_checksum_verification=True, buffer_size=_REMOTE_BLOCK // 4)
            names = self._check_parquet(record, pf)
        except BaseException:
            handle.close()
            raise
        self._pq = (record.name, handle, pf, names)
        return pf, names

    def _check_parquet(self, record: CommitRecord, pf: pq.ParquetFile) -> list[str]:
        """The columns to read, after checking the footer against the commit and the manifest
        (the footer has no checksum of its own)."""
        meta = pf.metadata
        counts = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        if counts != list(record.row_groups):
            raise ShardError(self.ds.url, record.name,
                             f"its row groups hold {counts} rows, its commit lists {list(record.row_groups)}")
        schema = pf.schema_arrow
        names = []
        unread = {c for c in LATENT_COLUMNS if c not in self.columns}
        for name, dtype in _expected_types(self.ds.manifest, record.dtype).items():
            if name in unread or name.removesuffix("_scale") in unread:
                continue
            if name not in schema.names:
                raise ShardError(self.ds.url, record.name, f"has no column {name!r}")
            got = schema.field(name).type
            if got != dtype:
                raise ShardError(self.ds.url, record.name, f"column {name!r} has type {got}, expected {dtype}")
            names.append(name)
        return names

    def _parquet_chunks(self, record: CommitRecord, rg: int, lo: int, hi: int) -> Iterator[list]:
        """Rows `lo:hi` of row group `rg`, decoded batch by batch (the first rows come before the
        row group is read whole). The row group stays open: the next range of it continues."""
        cursor = self._rows
        if cursor is None or cursor.key != (record.name, rg) or cursor.skipped(lo):
            pf, names = self._parquet(record)
            meta = pf.metadata.row_group(rg)
            size = _BATCH_BYTES * max(1, meta.num_rows) // max(1, meta.total_byte_size)
            batches = pf.iter_batches(batch_size=min(max(size, _BATCH_ROWS[0]), _BATCH_ROWS[1]), row_groups=[rg],
                                      columns=names)
            cursor = self._rows = _RowGroupRows((record.name, rg), batches, record.dtype, self.ds.manifest.fixed_shape)
        sent = lo
        try:
            for n in cursor.decode(lo, hi):
                if n > sent:
                    yield cursor.rows[sent:n]
                    sent = n
        except (OSError, pa.ArrowException, ValueError) as e:
            # Page checksum failures surface here as OSError.
            self._rows = None
            raise ShardError(self.ds.url, record.name, f"cannot be read: {e}", row_group=rg) from e

    def _read_parquet_keys(self, record: CommitRecord, rg: int, lo: int, hi: int) -> list:
        """Rows `lo:hi` of row group `rg` with a `keys` filter: the key column first, the rest only
        when a wanted key is there."""
        n = hi - lo
        pf, names = self._parquet(record)
        try:
            keys = pf.read_row_group(rg, columns=["key"]).column("key").slice(lo, n)
            mask = pc.is_in(keys, value_set=self.key_set)
            if not pc.any(mask).as_py():
                return [None] * n
            wanted = pf.read_row_group(rg, columns=names).slice(lo, n).filter(mask)
            decoded = iter(_parquet_rows(wanted, record.dtype, self.ds.manifest.fixed_shape))
        except (OSError, pa.ArrowException, ValueError) as e:
            raise ShardError(self.ds.url, record.name, f"cannot be read: {e}", row_group=rg) from e
        return [next(decoded) if m else None for m in mask.to_pylist()]

    # -- tar -------------------------------------------------------------------------------
    def _tar_chunks(self, record: CommitRecord, lo: int, hi: int) -> Iterator[list]:
        if self._tar is None or self._tar[0] != record.name or self._tar[2].row > lo:
            if self._tar is not None:
                self._tar[1].close()
                self._tar = None
            handle = self._open(record)
            self._tar = (record.name, handle, _TarCursor(handle, self.ds.url, record))
        cursor = self._tar[2]
        try:
            cursor.skip(lo - cursor.row)
            while cursor.row < hi:
                rows = cursor.rows(min(_BATCH_ROWS[0], hi - cursor.row), record.dtype, self.columns, self._tar_damage)
                if self.ds.keys is not None:
                    rows = [r if isinstance(r, dict) and r["key"] in self.ds.keys else None for r in rows]
                yield rows
        except (OSError, tarfile.TarError) as e:
            self._tar[1].close()
            self._tar = None
            raise ShardError(self.ds.url, record.name, f"cannot be read: {e}") from e

    def _tar_damage(self, error: ShardError) -> None:
        if self.ds.on_error != "skip":
            raise error
        self.on_damage(error)


class _Stream:
    """One consumer's pass over its part of the plan, from `position` on."""

    def __init__(self, ds: LatentDataset, plan: _Plan, order: _Order, consumer: _Consumer, position: int):
        self.ds = ds
        self.plan = plan
        self.order = order
        self.consumer = consumer
        self.position = min(max(0, int(position)), consumer.length)
        self.block = ds._block()
        self._perms: dict[int, np.ndarray | None] = {}
        self._noise = torch.Generator()

    # -- arithmetic ------------------------------------------------------------------------
    def _perm(self, b: int) -> np.ndarray | None:
        if self.block == 1:
            return None
        if b not in self._perms:
            self._perms.clear()
            _, start, nominal = _block_of_index(b, self.block)
            size = min(nominal, self.consumer.length - start)
            self._perms[b] = _block_perm(self.ds.seed, self.plan, self.consumer.first, b, size)
        return self._perms[b]

    def slot(self, p: int) -> int:
        """The slot (position in the consumer's part) yielded at output position `p`."""
        b, start, _ = _block_of(p, self.block)
        perm = self._perm(b)
        return start + (int(perm[p - start]) if perm is not None else p - start)

    def jobs(self, q_lo: int, q_hi: int) -> Iterator[tuple[int, int, int, int]]:
        """(first slot, unit, first row, end row) for slots [q_lo, q_hi), in slot order."""
        if q_hi <= q_lo:
            return
        q = q_lo
        for _, g, n in self.plan.pieces(self.consumer.first + q_lo, q_hi - q_lo):
            for u, lo, hi in self.order.runs(g, n):
                yield q, u, lo, hi
                q += hi - lo

    def sample_key(self, q: int) -> int:
        """The seed of the sample in slot `q`: the same plan position gets the same noise and flip
        whichever consumer reads it."""
        return _mix(self.ds.seed, self.plan.epoch, self.plan.start, self.consumer.first + q)

    # -- reading ---------------------------------------------------------------------------
    def _damage(self, error: ShardError) -> None:
        self.ds._report_damage(error)

    def _chunks(self, reader: _ShardReader, unit: _Unit, lo: int, hi: int) -> Iterator[list]:
        """`reader.chunks`, with the rest of the range `_DAMAGED` when it fails under "skip"."""
        done = lo
        try:
            for rows in reader.chunks(unit, lo, hi):
                yield rows
                done += len(rows)
        except ShardError as e:
            if self.ds.on_error != "skip":
                raise
            self._damage(e)
            yield [_DAMAGED] * (hi - done)

    def _read(self, reader: _ShardReader, unit: _Unit, lo: int, hi: int) -> list:
        return [row for rows in self._chunks(reader, unit, lo, hi) for row in rows]

    def _produce(self, q_lo: int, out: queue.Queue, stop: threading.Event) -> None:
        """Reader thread: decoded rows of slots q_lo.. in order, as (first slot, rows); then None."""

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.02)
                    return True
                except queue.Full:
                    continue
            return False

        reader = _ShardReader(self.ds, self._damage)
        try:
            for q, u, lo, hi in self.jobs(q_lo, self.consumer.length):
                for rows in self._chunks(reader, self.order.units[u], lo, hi):
                    if stop.is_set() or not put((q, rows)):
                        return
                    q += len(rows)
            put(None)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(e)
        finally:
            reader.close()

    def positioned(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(output position, item) from `position` to the end of the part."""
        length = self.consumer.length
        if self.position >= length:
            return
        first_slot = _block_of(self.position, self.block)[1]
        out: queue.Queue = queue.Queue(maxsize=self.ds.readahead)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(first_slot, out, stop), daemon=True)
        thread.start()
        got: dict[int, Any] = {}
        state = {"avail": first_slot}
        last_valid: list[dict[str, Any]] = []

        def need(q: int) -> Any:
            while q >= state["avail"]:
                item = out.get()
                if item is None:
                    raise DatasetError(f"{storage.redact(self.ds.url)}: the reader ended before slot {q}")
                if isinstance(item, BaseException):
                    raise item
                q0, rows = item
                for i, r in enumerate(rows):
                    got[q0 + i] = r
                state["avail"] = q0 + len(rows)
            return got[q]

        current = first_slot
        try:
            while self.position < length:
                p = self.position
                b, start, _ = _block_of(p, self.block)
                if start != current:
                    for q in [q for q in got if q < start]:
                        del got[q]
                    current = start
                q = self.slot(p)
                row = need(q)
                if row is _DAMAGED:
                    row = None if self.ds.keys is not None else self._substitute(b, q, need, last_valid)
                self.position = p + 1
                if row is None:
                    continue
                last_valid[:] = [row]
                yield p, self.ds._item(row, lambda q=q: self.sample_key(q), self._noise)
        finally:
            stop.set()
            thread.join(timeout=5)

    def _substitute(self, b: int, q: int, need: Callable[[int], Any], last_valid: list) -> dict[str, Any]:
        """A repeat for a damaged slot: the next sound row of its block (wrapping), else the last
        row yielded, so that the consumer keeps its length."""
        _, lo, nominal = _block_of_index(b, self.block)
        n = min(nominal, self.consumer.length - lo)
        for k in range(1, n):
            row = need(lo + (q - lo + k) % n)
            if isinstance(row, dict):
                return row
        if last_valid:
            return last_valid[0]
        raise DatasetError(
            f"{storage.redact(self.ds.url)}: every sample of a block of rank {self.consumer.rank}, "
            f"worker {self.consumer.worker} is damaged; nothing to repeat in their place"
        )

    def items_at(self, positions: Iterable[int]) -> dict[int, dict[str, Any]]:
        """The items at output positions `positions`, read directly (a resume's pending batch)."""
        wanted: dict[int, int] = {int(p): self.slot(int(p)) for p in positions}
        by_unit: dict[int, list[tuple[int, int, int]]] = {}
        for p, q in wanted.items():
            for _, u, lo, _ in self.jobs(q, q + 1):
                by_unit.setdefault(u, []).append((lo, p, q))
        reader = _ShardReader(self.ds, self._damage)
        out: dict[int, dict[str, Any]] = {}
        try:
            for u, needs in by_unit.items():
                lo = min(r for r, _, _ in needs)
                hi = max(r for r, _, _ in needs) + 1
                rows = self._read(reader, self.order.units[u], lo, hi)
                for r, p, q in needs:
                    row = rows[r - lo]
                    if isinstance(row, dict):
                        out[p] = self.ds._item(row, lambda q=q: self.sample_key(q), self._noise)
        finally:
            reader.close()
        return out


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
      With caption embeddings (`pipeline.text`): each `NAME_OUTPUT` (float32) and `NAME_length`
      (int64); `pad_text=True` pads unpadded outputs to `[max_length, hidden]` and adds `NAME_mask`.

    Ranks (`rank`/`world_size`, default from torch.distributed, else the RANK/WORLD_SIZE
    environment variables, else 0/1) and DataLoader workers split each epoch as the module
    docstring says: every rank yields exactly `len(dataset)` samples, padded with repeats from the
    same epoch (`drop_last=True`: the remainder dropped instead). Call `set_epoch(epoch)` before
    each epoch: order, shuffle, posterior noise and flips depend on `(seed, epoch)` only.

    `state_dict()` / `load_state_dict()` make it resumable mid-epoch: through torchdata's
    `StatefulDataLoader` exactly (each worker's position), or from a sample count at another
    world size with `state_dict(samples_seen, batch_size=..., num_workers=...)`.

    Only shards committed when the dataset is constructed are read; broken or uncommitted shards
    are left out with a `DatasetWarning` and listed in `excluded`. Pass `shards` to restrict (or
    pin) the list, which all ranks must agree on. `keys` keeps only the samples with those keys (a
    held-out set, a spot check; ranks are then not padded to one length): row groups of Parquet
    shards that hold none of them are skipped after reading their key column.

    `verify=True` checks each shard's sha256 against its commit before using it; `on_error`
    ("raise" or "skip") says what a damaged shard does (see `ShardError`); skipped ones are counted
    in `damaged`. A background thread holds up to `readahead` decoded batches (about 512 KiB of
    stored latents each) ready.
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
        readahead: int = 16,
        keys: Iterable[str] | None = None,
        drop_last: bool = False,
        verify: bool = False,
        on_error: str = "raise",
        pad_text: bool = False,
    ):
        if on_error not in ("raise", "skip"):
            raise DatasetError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.manifest: Manifest = read_manifest(url, self.storage_options)
        index, excluded = _committed_shards(url, self.storage_options, sha256=bool(verify))
        #: Shards found but not read, with why: broken commits (a file missing or of the wrong
        #: size) and shard files without a commit.
        self.excluded: dict[str, str] = excluded
        if shards is not None:
            positions = {name: i for i, name in enumerate(index.table.column("name").to_pylist())}
            missing = [s for s in shards if s not in positions]
            if missing:
                listing = ", ".join(f"{s} ({self.excluded[s]})" if s in self.excluded else s for s in missing[:10])
                raise DatasetError(
                    f"{storage.redact(url)}: shard(s) not committed: {listing}" + (" ..." if len(missing) > 10 else "")
                )
            keep = np.unique(np.fromiter((positions[s] for s in shards), np.int64))
            index = ShardIndex(index.table.take(_arrow_positions(keep)))
            self.excluded = {}
        elif self.excluded:
            listing = "; ".join(f"{n}: {why}" for n, why in list(self.excluded.items())[:5])
            warnings.warn(
                f"{storage.redact(url)}: {len(self.excluded)} shard(s) present but not read "
                f"({listing}{' ...' if len(self.excluded) > 5 else ''})",
                DatasetWarning,
                stacklevel=2,
            )
        self.records = index
        self.shuffle = shuffle
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.seed = int(seed)
        self.scale = scale
        self.sample = sample
        self.flip = flip
        self.readahead = max(1, int(readahead))
        self.drop_last = bool(drop_last)
        self.verify = bool(verify)
        self.on_error = on_error
        self.pad_text = bool(pad_text)
        self._text = TextLayout.from_manifest(self.manifest.text)
        self.epoch = 0
        #: Only these sample keys are yielded (None: all). Parquet row groups without any of
        #: them are skipped after reading their key column alone.
        self.keys: frozenset[str] | None = frozenset(keys) if keys is not None else None
        #: Damage skipped under on_error="skip" in this process: one message per shard problem.
        self.damaged: list[str] = []
        # Elastic resumes applied to the current epoch, in order; the plan replays them.
        self._resumes: list[dict[str, Any]] = []
        self._plan: tuple[str, _Plan] | None = None
        self._resume_at: int | None = None
        self._stream: _Stream | None = None
        self._verified: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get a copy without this process's open stream.
        state = dict(self.__dict__)
        state["_stream"] = None
        return state

    # -- planning --------------------------------------------------------------------------
    @property
    def records(self) -> ShardIndex:
        """The shards read, by name: index columns, each shard's `CommitRecord` built when asked for
        (it holds what reading needs: format, dtype, rows, row groups, the shard file's size and,
        with `verify`, its sha256). May be set to a narrower mapping of records."""
        return self._records

    @records.setter
    def records(self, records: Mapping[str, CommitRecord]) -> None:
        self._records = records if isinstance(records, ShardIndex) else ShardIndex.from_records(records, {})
        self._plan = None
        self._fingerprints: dict[bool, str] = {}

    @property
    def num_rows(self) -> int:
        """Committed rows in the dataset (all ranks together)."""
        return self.records.total_rows

    @property
    def shards(self) -> list[str]:
        return list(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: order, shuffle, noise and flips depend on (seed, epoch). A position
        loaded with `load_state_dict` holds until another epoch is selected."""
        if int(epoch) != self.epoch:
            self._resumes = []
            self._resume_at = None
        self.epoch = int(epoch)

    def _mode(self) -> str:
        return "exact" if self.keys is not None else ("drop" if self.drop_last else "pad")

    def _block(self) -> int:
        return self.shuffle_buffer if self.shuffle else 1

    def _current_plan(self) -> _Plan:
        key = json.dumps([self.epoch, self.num_rows, self._resumes])
        if self._plan is None or self._plan[0] != key:
            plan = _Plan(self.epoch, _merge([(0, self.num_rows)]))
            for resume in self._resumes:
                plan = _advance(plan, resume, self.seed)
            self._plan = (key, plan)
        return self._plan[1]

    def _consumer(self, plan: _Plan, worker: int, workers: int) -> _Consumer:
        first, length = _rank_span(plan.total, self.world_size, self.rank, self._mode())
        offset, part = _worker_span(length, workers, worker)
        return _Consumer(self.rank, self.world_size, worker, workers, first + offset, part)

    def __len__(self) -> int:
        """Samples this rank yields in the current epoch (with `keys`: before the filter)."""
        return _rank_span(self._current_plan().total, self.world_size, self.rank, self._mode())[1]

    def _fingerprint(self) -> str:
        """The shard list and order rule a saved state belongs to (kept: half a second at 10^5 shards)."""
        if self.shuffle not in self._fingerprints:
            table = self.records.table
            groups = [list(g or ()) for g in table.column("row_groups").to_pylist()]
            listing = list(zip(table.column("name").to_pylist(), table.column("rows").to_pylist(), groups,
                               table.column("format").to_pylist()))
            digest = hashlib.sha256(json.dumps([listing, self.shuffle]).encode()).hexdigest()[:16]
            self._fingerprints[self.shuffle] = digest
        return self._fingerprints[self.shuffle]

    def _shapes_present(self) -> int:
        """Distinct latent shapes of the dataset (what bounds the number of aspect buckets): from
        the records' shape counts where they hold them, else the manifest's."""
        table = self.records.table
        shapes = len(pc.unique(table.column("shapes").combine_chunks().keys)) if "shapes" in table.column_names else 0
        return max(1, shapes or len(self.manifest.shapes))

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

    def _report_damage(self, error: ShardError) -> None:
        self.damaged.append(str(error))
        warnings.warn(f"skipped ({len(self.damaged)} so far in this process): {error}", DatasetWarning, stacklevel=2)

    def _open_stream(self) -> _Stream:
        plan = self._current_plan()
        worker, workers = _worker_context()
        consumer = self._consumer(plan, worker, workers)
        position, self._resume_at = self._resume_at or 0, None
        order = _Order(self.records, self.seed, plan.epoch, self.shuffle)
        self._stream = _Stream(self, plan, order, consumer, position)
        return self._stream

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # The stream is opened here, not when the generator first runs: StatefulDataLoader asks
        # for state_dict() between the two.
        stream = self._open_stream()
        return (item for _, item in stream.positioned())

    def _item(self, row: dict[str, Any], key: Callable[[], int], noise: torch.Generator) -> dict[str, Any]:
        """The training item of a decoded row; `key()` is the sample's seed (computed only when a
        flip or the posterior noise needs it)."""
        flipped = False
        latent, logvar = row["latent"], row.get("logvar")
        seed = None
        if "latent_flip" in row:
            seed = key()
            if seed >> 63:
                flipped = True
                latent, logvar = row["latent_flip"], row.get("logvar_flip")
        z = np.array(latent, np.float32)
        if self.sample and logvar is not None:
            noise.manual_seed(_mix(key() if seed is None else seed, 1))
            std = np.exp(0.5 * np.clip(np.asarray(logvar, np.float32), -30.0, 20.0))
            z += std * torch.randn(z.shape, generator=noise).numpy()
        if self.scale:
            z -= self.manifest.shift_factor
            z *= self.manifest.scaling_factor
        item: dict[str, Any] = {
            "latent": torch.from_numpy(z),
            "flipped": flipped,
            "key": row["key"],
            "source": row.get("source") or "",
            "index": int(row.get("index") or 0),
            "caption": row.get("caption") or "",
            "meta": row.get("meta") or "{}",
        }
        for col in SIZE_COLUMNS:
            item[col] = torch.from_numpy(np.asarray(row[col], np.int64))
        if self._text:
            item.update(text_item(row, self._text, pad=self.pad_text))
        return item

    # -- resume ----------------------------------------------------------------------------
    def state_dict(self, samples_seen: int | None = None, *, batch_size: int = 1, num_workers: int = 0) -> dict[str, Any]:
        """Where the current epoch stands, as a JSON-able dict for `load_state_dict`.

        Without `samples_seen`: this consumer's exact position (what StatefulDataLoader stores per
        worker); it resumes on the same rank, world size and worker count. With `samples_seen`,
        the samples all ranks together consumed since the epoch began, drawn by DataLoaders of
        `batch_size` with `num_workers` workers on each rank: loadable at any world size (elastic).
        """
        if self.keys is not None:
            raise DatasetError("a LatentDataset with keys= has no resumable state")
        plan = self._current_plan()
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "shards": self._fingerprint(),
            "seed": self.seed,
            "epoch": self.epoch,
            "resumes": [dict(r) for r in self._resumes],
            "world_size": self.world_size,
            "drop_last": self.drop_last,
            "block": self._block(),
        }
        if samples_seen is not None:
            state.update(samples_seen=int(samples_seen), batch_size=int(batch_size), num_workers=int(num_workers))
            return state
        stream = self._stream
        if stream is not None and stream.plan == plan:
            consumer, position = stream.consumer, stream.position
        else:
            consumer, position = self._consumer(plan, *_worker_context()), self._resume_at or 0
        state.update(rank=self.rank, worker=consumer.worker, num_workers=consumer.workers, position=position)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from `state_dict()`: the rest of that epoch is what the next iteration reads."""
        if self.keys is not None:
            raise DatasetError("a LatentDataset with keys= has no resumable state")
        if state.get("version") != _STATE_VERSION:
            raise DatasetError(f"unsupported LatentDataset state version {state.get('version')!r}")
        if state["shards"] != self._fingerprint() or state["seed"] != self.seed:
            raise DatasetError(
                f"{storage.redact(self.url)}: the state was saved for another shard list or seed "
                "(pin the list with shards=[...] while an output is still being written)"
            )
        resumes = [dict(r) for r in state["resumes"]]
        if "samples_seen" in state:
            resumes.append({k: state[k] for k in
                            ("samples_seen", "world_size", "num_workers", "batch_size", "drop_last", "block")})
            position = None
        else:
            worker, workers = _worker_context()
            mine = (self.rank, self.world_size, worker, workers, self.drop_last, self._block())
            saved = tuple(state[k] for k in ("rank", "world_size", "worker", "num_workers", "drop_last", "block"))
            if mine != saved:
                raise DatasetError(
                    "a position saved by rank {} of {}, worker {} of {} (drop_last={}, block {}) cannot resume "
                    "rank {} of {}, worker {} of {} (drop_last={}, block {}); to change the world size use "
                    "state_dict(samples_seen, ...)".format(*saved, *mine)
                )
            position = int(state["position"])
        self.epoch = int(state["epoch"])
        self._resumes = resumes
        self._current_plan()  # a samples_seen that does not fit the epoch fails here, not later
        self._resume_at = position

    # -- batching --------------------------------------------------------------------------
    def batched(self, batch_size: int, drop_last: bool = False, collate_fn=collate) -> _BucketBatched:
        """An IterableDataset of same-shape batches (see `bucket_batches`), built in each worker.

        Use with `DataLoader(ds.batched(32), batch_size=None, num_workers=...)`. With several
        ranks every rank gets the same number of batches; resumable like the dataset.
        """
        if batch_size < 1:
            raise DatasetError(f"batch_size must be >= 1, got {batch_size}")
        return _BucketBatched(self, batch_size, drop_last, collate_fn)


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def bucket_batches(
    samples: Iterable[Mapping[str, Any]],
    batch_size: int,
    *,
    drop_last: bool = False,
    collate_fn=collate,
) -> Iterator[Any]:
    """Group samples whose `latent` shapes match (aspect buckets) into batches of `batch_size`.

    A batch is emitted as soon as one shape has `batch_size` samples; at the end the incomplete
    batches are emitted too unless `drop_last`. `collate_fn=None` yields lists of samples. Given
    a `LatentDataset`, this is `iter(samples.batched(...))`: the same number of batches per rank.
    """
    if batch_size < 1:
        raise DatasetError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(samples, LatentDataset):
        yield from samples.batched(batch_size, drop_last, collate_fn)
        return
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


@dataclass
class _Buckets:
    """A consumer's bucketing state: batches emitted, samples waiting per shape, the last batch."""

    emitted: int = 0
    pending: dict[tuple[int, ...], list[tuple[int, dict[str, Any]]]] = field(default_factory=dict)
    last: list[tuple[int, dict[str, Any]]] = field(default_factory=list)


class _BucketBatched(IterableDataset):
    """Aspect-bucketed batches of a LatentDataset, the same number on every rank.

    A consumer of n samples with at most S shapes makes at most floor((n + S(B-1)) / B) batches
    of up to B; with several ranks each consumer makes exactly that many, the missing ones
    repeats of its last batch (`drop_last`: exactly ceil((n - S(B-1)) / B) full batches, the
    fewest any consumer can make). Every rank has the same consumers' lengths, hence batches.
    """

    def __init__(self, dataset: LatentDataset, batch_size: int, drop_last: bool, collate_fn=collate):
        self.dataset = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.collate_fn = collate_fn
        self._buckets: _Buckets | None = None
        self._resume: Mapping[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_buckets"] = None
        return state

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """The dataset's position plus the samples waiting in buckets (by position)."""
        state = self.dataset.state_dict()
        b = self._buckets or _Buckets()
        state["buckets"] = {
            "emitted": b.emitted,
            "pending": [[list(shape), [p for p, _ in group]] for shape, group in b.pending.items()],
            "last": [p for p, _ in b.last],
        }
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.dataset.load_state_dict({k: v for k, v in state.items() if k != "buckets"})
        self._resume = state.get("buckets")

    def _target(self, stream: _Stream) -> int | None:
        ds = self.dataset
        if ds.world_size == 1 or ds.keys is not None:
            return None
        n, b = stream.consumer.length, self.batch_size
        s = min(ds._shapes_present(), n)
        if self.drop_last:
            return max(0, -(-(n - s * (b - 1)) // b))
        return (n + s * (b - 1)) // b

    def __iter__(self) -> Iterator[Any]:
        stream = self.dataset._open_stream()
        resume, self._resume = self._resume, None
        self._buckets = buckets = _Buckets()
        if resume:
            positions = [p for _, ps in resume["pending"] for p in ps] + list(resume["last"])
            items = stream.items_at(positions)
            buckets.emitted = int(resume["emitted"])
            buckets.pending = {tuple(s): [(p, items[p]) for p in ps if p in items] for s, ps in resume["pending"]}
            buckets.last = [(p, items[p]) for p in resume["last"] if p in items]
        return self._batches(stream, buckets, self._target(stream))

    def _emit(self, buckets: _Buckets, group: list[tuple[int, dict[str, Any]]]) -> Any:
        buckets.emitted += 1
        buckets.last = group
        samples = [item for _, item in group]
        return self.collate_fn(samples) if self.collate_fn else samples

    def _batches(self, stream: _Stream, buckets: _Buckets, target: int | None) -> Iterator[Any]:
        def room() -> bool:
            return target is None or buckets.emitted < target

        for p, item in stream.positioned():
            if not room():
                break
            shape = tuple(item["latent"].shape)
            group = buckets.pending.setdefault(shape, [])
            group.append((p, item))
            if len(group) == self.batch_size:
                del buckets.pending[shape]
                yield self._emit(buckets, group)
        if not self.drop_last:
            for shape in list(buckets.pending):
                if not room():
                    break
                yield self._emit(buckets, buckets.pending.pop(shape))
        buckets.pending.clear()
        while target is not None and buckets.last and room():
            yield self._emit(buckets, buckets.last)
