"""One read and decode of a shard, fanned out to the outputs of a config with `outputs:`.

`MultiEncodeWorker` is the encode worker of such a job (a plain class; `multi_driver.py` wraps
it in a Ray actor). It holds one `EncodeWorker` per output, each with that output's manifest,
batch size, writer and QA pick, the outputs' models (one per distinct `model` section, see
`pipeline.outputs`) and one decode pool that prepares every image for every distinct
preprocessing. Per shard:

    read thread     reads the tar once (`ShardReader`) and hands each item to every output (`SampleTee`)
    output threads  one per output that needs the shard: its `EncodeWorker.process_shard`, exactly
                    as a single-output run, except that its batcher takes samples from the tee and
                    decoded images from a `SharedDecode` view: the first output to ask for a chunk
                    of samples has it prepared once for every output; the others get the results
    decode pool     `prepare_all`: one decode per distinct draft reduction, one preprocessing per
                    distinct preprocessing

Each output keeps its own batches (its own bucket state and batch size), so its rows are those
of its single run, whatever the other outputs do.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .config import JobConfig
from .decodepool import DecodePool
from .models import load_model
from .outputs import OutputParts
from .reader import Sample, SampleError, ShardReader
from .worker import EncodeWorker, ShardResult, SharedParts

__all__ = ["FanoutResult", "MultiEncodeWorker", "OutputTask", "SampleTee", "SharedDecode"]

log = logging.getLogger(__name__)

_END = object()


class _Failed:
    """The read failed: each consumer raises (a copy of) `error` in its own thread."""

    def __init__(self, error: BaseException):
        self.error = error


class SampleTee:
    """Reads `samples` (a shard's samples and read errors) once, in a thread of its own, and gives
    each of `consumers` iterators every item in order.

    Each consumer has a queue of `depth` items: the read runs at most that far ahead of the
    slowest consumer. A consumer that stops early must be `release`d, so the read does not wait
    for it; when every consumer is released the read stops. A read error is raised in every
    consumer, after the items before it.
    """

    def __init__(self, samples: Iterable[Sample | SampleError], consumers: int, depth: int):
        self._samples = samples
        self._queues: list[queue.Queue] = [queue.Queue(maxsize=max(1, depth)) for _ in range(consumers)]
        self._released = [threading.Event() for _ in range(consumers)]
        self._thread = threading.Thread(target=self._read, name="shard-read", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for item in self._samples:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumers, which raise it
            self._put(_Failed(e))

    def _put(self, item: Any) -> bool:
        """Queue `item` for every consumer still reading; False when none is."""
        waiting = False
        for q, released in zip(self._queues, self._released):
            while not released.is_set():
                try:
                    q.put(item, timeout=0.1)
                    waiting = True
                    break
                except queue.Full:
                    continue
        return waiting

    def consumer(self, index: int) -> Iterator[Sample | SampleError]:
        """The items for consumer `index`, in shard order."""
        q = self._queues[index]
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                try:
                    error = copy.copy(item.error)
                except Exception:  # an exception type that cannot be copied: share the one object
                    error = item.error
                raise error
            yield item

    def release(self, index: int) -> None:
        """Consumer `index` reads no more: drop what is queued for it and never wait for it."""
        self._released[index].set()
        q = self._queues[index]
        while True:
            try:
                q.get_nowait()
            except queue.Empty:
                return


class SharedDecode:
    """A shard's chunks of samples prepared once for every output.

    Each output's batcher submits the same chunks (the same samples in the same groups: the
    chunking depends only on the shard and the pool's chunk size), through its `view`. The first
    submission of a chunk sends it to `pool`; the result is kept until each of `consumers`
    outputs has taken its part. `pool` applies every preparation (a list of results per sample)
    unless there is only one (`several` False: one result per sample).
    """

    def __init__(self, pool: DecodePool, consumers: int, *, several: bool):
        self.pool = pool
        self.consumers = consumers
        self.several = several
        self._lock = threading.Lock()
        self._chunks: dict[tuple[str, ...], _Chunk] = {}

    def view(self, preparation: int) -> _DecodeView:
        """What one output's batcher uses as its decode pool: the results of `preparation`."""
        return _DecodeView(self, preparation)

    def _submit(self, items: list[tuple[str, bytes]]) -> _Chunk:
        keys = tuple(key for key, _ in items)
        with self._lock:
            chunk = self._chunks.get(keys)
            if chunk is None:
                chunk = self._chunks[keys] = _Chunk(keys, self.pool.submit(items))
            return chunk

    def _results(self, chunk: _Chunk, items: list[tuple[str, bytes]]) -> list[Any]:
        with chunk.lock:  # one output waits for the pool; the others wait for it
            if chunk.results is None:
                chunk.results = self.pool.result(chunk.future, items)
            results = chunk.results
        with self._lock:
            chunk.taken += 1
            if chunk.taken >= self.consumers:
                self._chunks.pop(chunk.keys, None)
        return results


@dataclass
class _Chunk:
    keys: tuple[str, ...]
    future: Future
    results: list[Any] | None = None
    taken: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class _DecodeView:
    """The decode pool as one output's batcher sees it (`submit`, `result`, `workers`, `chunk`)."""

    def __init__(self, shared: SharedDecode, preparation: int):
        self._shared = shared
        self._preparation = preparation
        self.workers = shared.pool.workers
        self.chunk = shared.pool.chunk

    def submit(self, items: list[tuple[str, bytes]]) -> Any:
        return self._shared._submit(items)

    def result(self, handle: _Chunk, items: list[tuple[str, bytes]]) -> list[Any]:
        results = self._shared._results(handle, items)
        if not self._shared.several:
            return results
        return [per_sample[self._preparation] for per_sample in results]


@dataclass(frozen=True)
class OutputTask:
    """One output's part of a shard: the output (index in `JobConfig.output_jobs`), the shard's
    NAME in that OUTPUT and its QA quota there."""

    output: int
    name: str
    qa_rows: int


@dataclass
class FanoutResult:
    """What one shard did in each output asked for: committed ones in `results`, the others'
    exceptions in `errors` (both by output index)."""

    results: dict[int, ShardResult] = field(default_factory=dict)
    errors: dict[int, BaseException] = field(default_factory=dict)


class MultiEncodeWorker:
    """Encodes whole shards into every output of a config with `outputs:` (see the module docstring).

    `device` and `set_threads` as for `EncodeWorker`. Attributes: `parts` (`OutputParts`),
    `workers` (one `EncodeWorker` per output), `manifests`, `decode_pool` (applies every
    distinct preparation), `concurrency` (shards at once).
    """

    def __init__(self, config: JobConfig, *, device: str | None = None, set_threads: bool = False):
        self.parts = parts = OutputParts.of(config)
        models = [load_model(m) for m in parts.models]
        shared = SharedParts(device_lock=threading.Lock(), memory_share=1.0 / len(parts.jobs))
        self.workers = [
            EncodeWorker(job, device=device, set_threads=set_threads, model=models[parts.model_of[i]], shared=shared)
            for i, job in enumerate(parts.jobs)
        ]
        self.manifests = [w.manifest for w in self.workers]
        preparations: list[Any] = [None] * parts.preparations
        for worker, k in zip(self.workers, parts.preparation_of):
            preparations[k] = (worker.decode_options, worker.preprocessor)
        # `ray` is shared by every output, so every worker resolved the same decoders.
        first = self.workers[0]
        self.decode_pool = DecodePool(first.decode_threads, first.decode_mode, *preparations[0],
                                      timeout=config.ray.decode_timeout, more=preparations[1:])
        self.decode_pool.warm_up()
        self.concurrency = first.concurrency
        self.config = config
        # Every output of every shard in flight runs in a thread of its own.
        self._threads = ThreadPoolExecutor(self.concurrency * len(self.workers), thread_name_prefix="output")
        log.info("encode worker for %d outputs: %d model(s), %d preparation(s) per image",
                 len(self.workers), len(parts.models), parts.preparations)

    @property
    def running(self) -> dict[str, int]:
        """Shards being encoded (by NAME) -> images written so far, the most of any output."""
        out: dict[str, int] = {}
        for worker in self.workers:
            for name, rows in list(worker.running.items()):
                out[name] = max(out.get(name, 0), rows)
        return out

    def close(self) -> None:
        """Stop the decoders and the output threads."""
        self.decode_pool.close()
        self._threads.shutdown(wait=False, cancel_futures=True)

    def process_shard(self, url: str, tasks: list[OutputTask], *, num_shards: int = 1,
                      fresh: bool = False) -> FanoutResult:
        """Read input shard `url` once and encode, write and commit it into each output of `tasks`.

        The outputs run side by side; one that fails leaves the others committed: the result says
        which output committed and which raised what. `num_shards` and `fresh` as for
        `EncodeWorker.process_shard`.
        """
        inp = self.config.input
        reader = ShardReader(url, inp.storage_options, image_exts=inp.image_exts, caption_key=inp.caption_key)
        batch = max(w.batch_size for w in self.workers)
        pool = self.decode_pool
        # As far ahead as one output's batcher reads (`ShardBatcher.prefetch`).
        tee = SampleTee(reader, len(tasks), depth=max(2 * batch, pool.workers * max(4, 2 * pool.chunk)))
        decode = SharedDecode(pool, len(tasks), several=self.parts.preparations > 1)
        futures = {
            task.output: self._threads.submit(self._one, j, task, url, tee, decode, num_shards, fresh)
            for j, task in enumerate(tasks)
        }
        result = FanoutResult()
        for output, future in futures.items():
            try:
                result.results[output] = future.result()
            except Exception as e:  # noqa: BLE001 - one output's failure is reported, the others keep theirs
                result.errors[output] = e
        return result

    def _one(self, j: int, task: OutputTask, url: str, tee: SampleTee, decode: SharedDecode, num_shards: int,
             fresh: bool) -> ShardResult:
        worker = self.workers[task.output]
        try:
            return worker.process_shard(url, task.name, num_shards=num_shards, qa_rows=task.qa_rows, fresh=fresh,
                                        samples=tee.consumer(j),
                                        decode_pool=decode.view(self.parts.preparation_of[task.output]))
        finally:
            tee.release(j)
