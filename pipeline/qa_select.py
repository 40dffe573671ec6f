"""Which samples of a shard the encode worker keeps for QA (the `qa/samples/` side table).

Each shard keeps the `qa_per_shard` samples whose sha1(key) is smallest: a choice that depends
on the keys alone (not on the order of the rows, the batching or the worker), spread evenly over
the shard, and made in one pass with a bounded heap, so a shard costs k rows of memory whatever
its size.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections.abc import Callable

from .rows import QARow

__all__ = ["QASelector", "qa_per_shard"]


def qa_per_shard(samples: int, num_shards: int) -> int:
    """QA samples each shard keeps so the whole run keeps about `samples`."""
    if samples <= 0:
        return 0
    return math.ceil(samples / max(1, num_shards))


def _key_hash(key: str) -> int:
    # surrogateescape: a key that is not valid UTF-8 hashes to its bytes rather than failing the
    # shard (the reader ledgers such keys; this keeps the choice total for any caller).
    return int.from_bytes(hashlib.sha1(key.encode("utf-8", "surrogateescape")).digest()[:8], "big")


class _Entry:
    """Heap entry ordered so that heapq's min-heap keeps the largest (hash, key) on top."""

    __slots__ = ("rank", "row")

    def __init__(self, rank: tuple[int, str], row: QARow):
        self.rank = rank
        self.row = row

    def __lt__(self, other: _Entry) -> bool:
        return self.rank > other.rank


class QASelector:
    """Keeps the `k` samples offered whose (sha1(key), key) is smallest."""

    def __init__(self, k: int):
        self.k = k
        self._heap: list[_Entry] = []

    def offer(self, key: str, make_row: Callable[[], QARow]) -> None:
        """Consider sample `key`; `make_row` builds its row, called only when the sample is kept."""
        if self.k <= 0:
            return
        rank = (_key_hash(key), key)
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, _Entry(rank, make_row()))
        elif rank < self._heap[0].rank:
            heapq.heapreplace(self._heap, _Entry(rank, make_row()))

    def rows(self) -> list[QARow]:
        """The kept rows, smallest hash first."""
        return [e.row for e in sorted(self._heap, key=lambda e: e.rank)]
