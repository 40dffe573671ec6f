"""Read -> decode -> bucket -> batch: the samples of one shard become encoder batches.

`ShardBatcher` sends the shard's samples to the decode pool in chunks, keeps `prefetch` samples
in flight ahead of the encoder, collects the results in shard order, sorts them into one bucket
per target size and hands out a bucket when it holds `batch_size` images. Bad samples (from the
reader or the decoder) go to `on_error` in shard order too. The order of the batches and of the
samples in them depends only on the shard's content and the config, never on timing or on the
decode mode, so a shard gives the same output bytes wherever it is encoded.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future

from .decodepool import DecodeFailure, DecodePool
from .preprocess import Preprocessed
from .reader import Sample, SampleError
from .rows import ErrorRow

__all__ = ["Batch", "ShardBatcher"]

#: Samples of one target size, in shard order.
Batch = list[tuple[Sample, Preprocessed]]


class ShardBatcher:
    """Batches of (sample, preprocessed) of one target size from one shard's samples.

    Parameters
    ----------
    samples: the shard's samples and read errors in shard order (a `ShardReader`).
    source: the shard's URL, recorded in the ledger rows.
    pool: the decode pool that prepares the images (shared with other shards).
    batch_size: images per batch; a bucket is handed out when it is full.
    on_error: receives the ledger row of every bad sample, in shard order.

    Iterate it once. The last batch of each bucket may be short. Partial buckets are capped at
    4 x `batch_size` images in all (the fullest is handed out early), so many aspect buckets
    cannot hold the whole shard in memory. `decode_wait` is the time spent waiting for the pool.
    """

    def __init__(self, samples: Iterable[Sample | SampleError], source: str, pool: DecodePool, batch_size: int,
                 on_error: Callable[[ErrorRow], None]):
        self.samples = samples
        self.source = source
        self.pool = pool
        self.batch_size = batch_size
        self.on_error = on_error
        # Threads: 4 samples per thread; processes: 2 chunks per process.
        self.prefetch = max(2 * batch_size, pool.workers * max(4, 2 * pool.chunk))
        self.max_pending = 4 * batch_size
        #: Seconds spent waiting for decoded images.
        self.decode_wait = 0.0
        # Partial buckets by target size.
        self._pending: dict[tuple[int, int], Batch] = {}
        # Entries in shard order: a read error, or a chunk of samples with the (key, bytes) items
        # sent to the decode pool and its future.
        self._window: deque[SampleError | tuple[list[Sample], list[tuple[str, bytes]], Future]] = deque()
        self._queued = 0  # samples in the window
        self._chunk: list[Sample] = []  # samples not yet sent to the pool

    def __iter__(self) -> Iterator[Batch]:
        for item in self.samples:
            if isinstance(item, SampleError):
                self._submit()
                self._window.append(item)
            else:
                self._chunk.append(item)
                if len(self._chunk) >= self.pool.chunk:
                    self._submit()
            while self._queued >= self.prefetch:
                yield from self._collect_oldest()
        self._submit()
        while self._window:
            yield from self._collect_oldest()
        for size in list(self._pending):
            yield self._pending.pop(size)

    def _submit(self) -> None:
        """Send the samples gathered so far to the decode pool as one chunk."""
        if self._chunk:
            items = [(s.key, s.image) for s in self._chunk]
            self._window.append((self._chunk, items, self.pool.submit(items)))
            self._queued += len(self._chunk)
            self._chunk = []

    def _collect_oldest(self) -> Iterator[Batch]:
        """Collect the oldest window entry; yields the batches it completes."""
        entry = self._window.popleft()
        if isinstance(entry, SampleError):
            self.on_error(ErrorRow(entry.key, self.source, "read", entry.reason, entry.message))
            return
        samples, items, future = entry
        self._queued -= len(samples)
        t0 = time.perf_counter()
        results = self.pool.result(future, items)
        self.decode_wait += time.perf_counter() - t0
        for sample, result in zip(samples, results):
            ready = self._add(sample, result)
            if ready:
                yield ready

    def _add(self, sample: Sample, result: Preprocessed | DecodeFailure) -> Batch | None:
        """Put one prepared sample in its bucket; returns a batch when one is ready."""
        if isinstance(result, DecodeFailure):
            self.on_error(ErrorRow(sample.key, self.source, result.stage, result.reason, result.message))
            return None
        bucket = self._pending.setdefault(result.target_size, [])
        bucket.append((sample, result))
        if len(bucket) >= self.batch_size:
            return self._pending.pop(result.target_size)
        if sum(len(b) for b in self._pending.values()) > self.max_pending:
            fullest = max(self._pending, key=lambda k: (len(self._pending[k]), k))
            return self._pending.pop(fullest)
        return None
