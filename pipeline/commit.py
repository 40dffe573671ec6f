"""Per-shard commit records: OUTPUT/_commits/NAME.json, the last object a shard writes.

A shard is done if and only if its commit record exists and every file it lists exists with the
recorded size (`--verify` in `inspect` also rechecks the sha256). The record carries exact
per-channel latent statistics so dataset statistics need no second pass over the latents.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import storage
from .jsonutil import parse_object, utc_now
from .layout import COMMITS_DIR, commit_url

__all__ = [
    "CommitError",
    "ChannelStats",
    "CommitRecord",
    "ShardScan",
    "read_commit",
    "read_commits",
    "write_commit",
    "committed_names",
    "committed_records",
    "is_committed",
    "pooled_stats",
    "scan_output",
]


class CommitError(ValueError):
    """A commit record is malformed; the message names the shard."""


class ChannelStats:
    """Exact per-channel statistics of latents: count, sum, sumsq, min, max, nan, inf.

    `count`, `sum` and `sumsq` cover the finite values only, so `mean = sum / count` is exact and
    non-finite values are reported separately instead of poisoning the totals.
    """

    KEYS = ("count", "sum", "sumsq", "min", "max", "nan", "inf")

    def __init__(self, channels: int):
        self.channels = channels
        self.count = np.zeros(channels, np.int64)
        self.sum = np.zeros(channels, np.float64)
        self.sumsq = np.zeros(channels, np.float64)
        self.min = np.full(channels, np.inf)
        self.max = np.full(channels, -np.inf)
        self.nan = np.zeros(channels, np.int64)
        self.inf = np.zeros(channels, np.int64)

    def update(self, latent: np.ndarray) -> None:
        """Add one latent `[C, h, w]` (or a batch `[N, C, h, w]`)."""
        x = np.asarray(latent)
        if x.ndim == 3:
            x = x[None]
        if x.shape[1] != self.channels:
            raise ValueError(f"latent has {x.shape[1]} channels, expected {self.channels}")
        x = np.moveaxis(x, 1, 0).reshape(self.channels, -1).astype(np.float64)
        finite = np.isfinite(x)
        self.nan += np.isnan(x).sum(axis=1)
        self.inf += np.isinf(x).sum(axis=1)
        self.count += finite.sum(axis=1)
        xf = np.where(finite, x, 0.0)
        self.sum += xf.sum(axis=1)
        self.sumsq += (xf * xf).sum(axis=1)
        self.min = np.minimum(self.min, np.where(finite, x, np.inf).min(axis=1, initial=np.inf))
        self.max = np.maximum(self.max, np.where(finite, x, -np.inf).max(axis=1, initial=-np.inf))

    def merge(self, other: ChannelStats) -> ChannelStats:
        if other.channels != self.channels:
            raise ValueError(f"cannot merge stats of {other.channels} channels into {self.channels}")
        self.count += other.count
        self.sum += other.sum
        self.sumsq += other.sumsq
        self.min = np.minimum(self.min, other.min)
        self.max = np.maximum(self.max, other.max)
        self.nan += other.nan
        self.inf += other.inf
        return self

    @property
    def mean(self) -> np.ndarray:
        return self.sum / np.maximum(self.count, 1)

    @property
    def std(self) -> np.ndarray:
        var = self.sumsq / np.maximum(self.count, 1) - self.mean**2
        return np.sqrt(np.maximum(var, 0.0))

    def overall(self) -> tuple[float, float]:
        """Mean and standard deviation over all channels together."""
        n = max(int(self.count.sum()), 1)
        mean = float(self.sum.sum() / n)
        var = float(self.sumsq.sum() / n - mean * mean)
        return mean, max(var, 0.0) ** 0.5

    def recommended_factors(self) -> tuple[float | None, float]:
        """(scaling_factor, shift_factor) that give these latents mean 0 and std 1 under
        ``(z - shift) * scale``, pooled over all channels as the published SD/SDXL/SD3/FLUX factors
        are; the scaling factor is None when the std is 0."""
        mean, std = self.overall()
        return (1.0 / std if std > 0 else None), mean

    def to_dict(self) -> dict[str, list]:
        def floats(a: np.ndarray) -> list:
            # JSON has no infinity: channels without finite values report null.
            return [float(v) if np.isfinite(v) else None for v in a]

        return {
            "count": [int(v) for v in self.count],
            "sum": [float(v) for v in self.sum],
            "sumsq": [float(v) for v in self.sumsq],
            "min": floats(self.min),
            "max": floats(self.max),
            "nan": [int(v) for v in self.nan],
            "inf": [int(v) for v in self.inf],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, list]) -> ChannelStats:
        channels = len(data["count"])
        s = cls(channels)
        s.count = np.asarray(data["count"], np.int64)
        s.sum = np.asarray(data["sum"], np.float64)
        s.sumsq = np.asarray(data["sumsq"], np.float64)
        s.min = np.asarray([np.inf if v is None else v for v in data["min"]], np.float64)
        s.max = np.asarray([-np.inf if v is None else v for v in data["max"]], np.float64)
        s.nan = np.asarray(data.get("nan", [0] * channels), np.int64)
        s.inf = np.asarray(data.get("inf", [0] * channels), np.int64)
        return s


@dataclass
class CommitRecord:
    """Contents of OUTPUT/_commits/NAME.json.

    `files` maps each committed file's path relative to OUTPUT to `{"size", "sha256"}`; `stats`
    holds the per-channel latent statistics (`ChannelStats.to_dict()`, empty when no rows);
    `row_groups` lists the rows of each Parquet row group (one entry for a tar shard), which lets
    readers split work below shard granularity without opening the file.
    """

    name: str
    format: str
    dtype: str
    rows: int
    errors: int
    files: dict[str, dict[str, Any]]
    stats: dict[str, list] = field(default_factory=dict)
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, int] = field(default_factory=dict)
    row_groups: list[int] = field(default_factory=list)
    qa_rows: int = 0
    source: str | None = None
    created: str = field(default_factory=utc_now)
    format_version: int = 1

    @property
    def shard_file(self) -> str:
        """Relative path of the latent shard file."""
        for rel in self.files:
            if rel.startswith("shards/"):
                return rel
        raise CommitError(f"commit of shard {self.name!r} lists no shard file")

    def channel_stats(self) -> ChannelStats | None:
        return ChannelStats.from_dict(self.stats) if self.stats else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CommitRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as e:
            raise CommitError(f"commit record of shard {data.get('name')!r} is incomplete: {e}") from e

    @classmethod
    def from_json(cls, text: str | bytes, name: str = "?") -> CommitRecord:
        return cls.from_dict(parse_object(text, f"commit record of shard {name!r}", CommitError))


def pooled_stats(records: Iterable[CommitRecord]) -> tuple[ChannelStats | None, int]:
    """The latent statistics of `records` merged in their order, and how many records hold any
    (None and 0 when none does)."""
    total: ChannelStats | None = None
    shards = 0
    for record in records:
        stats = record.channel_stats()
        if stats is None:
            continue
        shards += 1
        total = stats if total is None else total.merge(stats)
    return total, shards


def write_commit(root: str, record: CommitRecord, storage_options: Mapping[str, Any] | None = None) -> None:
    """Publish the commit record of a shard (one whole-object write)."""
    storage.put_bytes(commit_url(root, record.name), record.to_json().encode(), storage_options)


def read_commit(
    root: str, name: str, storage_options: Mapping[str, Any] | None = None
) -> CommitRecord | None:
    """The commit record of shard `name`, or None when it has none. Does not check its files."""
    try:
        text = storage.read_bytes(commit_url(root, name), storage_options)
    except FileNotFoundError:
        return None
    return CommitRecord.from_json(text, name)


def read_commits(
    root: str, names: list[str], storage_options: Mapping[str, Any] | None = None
) -> tuple[dict[str, CommitRecord], dict[str, str]]:
    """The commit records of shards `names`, read concurrently: (records by name, name -> why its
    record does not parse). A commit removed since it was listed is in neither."""
    blobs = storage.read_many([commit_url(root, n) for n in names], storage_options)
    records: dict[str, CommitRecord] = {}
    broken: dict[str, str] = {}
    for name in names:
        blob = blobs.get(commit_url(root, name))
        if blob is None:
            continue  # removed between listing and reading
        try:
            records[name] = CommitRecord.from_json(blob, name)
        except CommitError as e:
            broken[name] = str(e)
    return records, broken


def _file_problems(
    root: str, record: CommitRecord, storage_options, listings: dict[str, dict[str, int]]
) -> list[str]:
    """What is wrong with the files a commit lists (empty when all exist with the recorded size)."""
    problems = []
    for rel, info in record.files.items():
        folder, _, fname = rel.rpartition("/")
        if folder not in listings:
            listings[folder] = storage.list_files(storage.join(root, folder), storage_options)
        got = listings[folder].get(fname)
        if got is None:
            problems.append(f"{rel} is missing")
        elif got != int(info["size"]):
            problems.append(f"{rel} has {got} bytes, the commit says {info['size']}")
    return problems


def is_committed(root: str, name: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """True iff shard `name` has a commit record and all its files exist with the recorded sizes."""
    try:
        record = read_commit(root, name, storage_options)
    except CommitError:
        return False
    if record is None:
        return False
    for rel, info in record.files.items():
        if storage.size(storage.join(root, rel), storage_options) != int(info["size"]):
            return False
    return True


@dataclass
class ShardScan:
    """State of every shard found in an OUTPUT."""

    committed: dict[str, CommitRecord]
    broken: dict[str, str]  # name -> why its commit record does not hold
    uncommitted: list[str]  # shard files with no commit record (an interrupted attempt)


def scan_output(
    root: str,
    storage_options: Mapping[str, Any] | None = None,
    records: Mapping[str, CommitRecord] | None = None,
    unreadable: Mapping[str, str] | None = None,
) -> ShardScan:
    """Check every commit record against one listing per folder: which shards hold, which not.

    Without `records` it reads all commit records at once: a few LIST requests plus one
    (concurrent) GET per commit. With `records` (and `unreadable`: commits that do not parse, by
    name), as the consolidated index gives them, it only lists the folders (`inspect`).
    """
    broken: dict[str, str] = dict(unreadable or {})
    if records is None:
        commits_dir = storage.join(root, COMMITS_DIR)
        names = sorted(n[: -len(".json")] for n in storage.list_files(commits_dir, storage_options) if n.endswith(".json"))
        records, unparsed = read_commits(root, names, storage_options)
        broken.update(unparsed)
    listings: dict[str, dict[str, int]] = {}
    committed: dict[str, CommitRecord] = {}
    for name, record in records.items():
        problems = _file_problems(root, record, storage_options, listings)
        if problems:
            broken[name] = "; ".join(problems)
        else:
            committed[name] = record
    shard_files = storage.list_files(storage.join(root, "shards"), storage_options)
    uncommitted = sorted(
        {f.rsplit(".", 1)[0] for f in shard_files if not f.startswith(".")} - set(committed) - set(broken)
    )
    return ShardScan(committed=committed, broken=broken, uncommitted=uncommitted)


def committed_records(root: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, CommitRecord]:
    """Commit records of every committed shard, by name (sorted)."""
    return scan_output(root, storage_options).committed


def committed_names(root: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Names of all committed shards (commit record present and its files matching), sorted."""
    return list(scan_output(root, storage_options).committed)
