"""Which QA samples are scored: at most `qa.samples`, chosen by a hash of the key.

The encode workers keep a per-shard quota of samples in the side tables (about `qa.samples` over
the run, spread over shards and buckets). QA scores at most `qa.samples` of them: the keys with
the smallest hash, a choice that depends on the keys alone, not on shard order, the number of
workers, or which attempt of a shard committed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

_SALT = b"pipeline.qa.v1:"


def key_hash(key: str) -> int:
    """A stable 64-bit hash of the sample key."""
    return int.from_bytes(hashlib.blake2b(_SALT + key.encode("utf-8"), digest_size=8).digest(), "big")


def choose(rows: Iterable[tuple[str, str, str]], samples: int) -> dict[str, list[tuple[str, str]]]:
    """(shard, key, bucket) rows -> {shard: [(key, bucket), ...]} for at most `samples` rows."""
    ranked = sorted(rows, key=lambda r: (key_hash(r[1]), r[0], r[1]))
    chosen: dict[str, list[tuple[str, str]]] = {}
    for shard, key, bucket in ranked[: max(0, samples)]:
        chosen.setdefault(shard, []).append((key, bucket))
    return {shard: sorted(items) for shard, items in sorted(chosen.items())}
