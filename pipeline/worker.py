"""The encode worker: one input shard in, one committed output shard out.

`EncodeWorker` is a plain class (tests drive it directly); `driver.py` wraps it in a Ray actor.
Inside `process_shard` the stages overlap:

    main thread    read tar (prefetching cache) -> submit decode -> collect in order -> batch per
                   bucket -> encode on the device
    decode pool    decode + preprocess, `decode_threads` wide, kept `prefetch` samples ahead of
                   the encoder: threads of this process, or processes of their own
                   (`ray.decode_mode`, see decodepool.py)
    writer thread  storage rounding, Parquet/tar writing (local temp files)

and the shard is committed (uploaded whole, commit record last) at the end. Output rows come in
a deterministic order that depends only on the shard's content and the config, so a shard gives
the same bytes whichever worker encodes it and however many workers there are.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import os
import queue
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import storage
from .batching import auto_batch_size, batch_warning, memory_budget
from .config import ConfigError, JobConfig
from .decode import DecodeOptions
from .decodepool import DecodeFailure, DecodePool, prepare, resolve_mode
from .manifest import Manifest
from .models import load_model
from .preprocess import Preprocessed, Preprocessor
from .reader import Sample, SampleError, ShardReader
from .writer import ErrorRow, LatentRow, QARow, ShardWriter

__all__ = ["EncodeWorker", "ShardResult", "build_manifest", "default_decoders", "qa_per_shard", "torch_threads",
           "FAULT_KILL_AFTER", "FAULT_MARKER"]

log = logging.getLogger(__name__)

#: Test-only fault hook: kill the worker process (SIGKILL) after this many encoded rows of a
#: shard, once per marker file (see `_FaultHook`).
FAULT_KILL_AFTER = "LATENT_FAULT_KILL_AFTER"
FAULT_MARKER = "LATENT_FAULT_MARKER"


@dataclass
class ShardResult:
    """What one `process_shard` call produced (the commit record has the full detail)."""

    name: str
    url: str
    rows: int
    errors: int
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    qa_rows: int = 0
    seconds: float = 0.0
    #: Where the shard's thread spent its time (see `STAGES`): waiting for decoded images,
    #: encoding (launching plus waiting for the device), waiting for the writer, committing.
    #: The rest of `seconds` is reading the tar, batching and building rows.
    stage_seconds: dict[str, float] = field(default_factory=dict)
    #: Images per encoder call (`ray.batch_size`, resolved).
    batch_size: int = 0


#: Keys of `ShardResult.stage_seconds`.
STAGES = ("decode_wait", "encode", "write_wait", "commit")


def qa_per_shard(samples: int, num_shards: int) -> int:
    """QA samples each shard keeps so the whole run keeps about `samples`."""
    if samples <= 0:
        return 0
    return math.ceil(samples / max(1, num_shards))


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")


def _key_seed(seed: int, key: str, what: str) -> int:
    digest = hashlib.sha256(f"{seed}\0{what}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


class _QAEntry:
    """Heap entry ordered so that heapq's min-heap keeps the largest (hash, key) on top."""

    __slots__ = ("rank", "row")

    def __init__(self, rank: tuple[int, str], row: QARow):
        self.rank = rank
        self.row = row

    def __lt__(self, other: _QAEntry) -> bool:
        return self.rank > other.rank


class _QASelector:
    """Keeps the k samples of a shard whose sha1(key) is smallest (a stable, spread-out choice)."""

    def __init__(self, k: int):
        self.k = k
        self._heap: list[_QAEntry] = []

    def offer(self, key: str, make_row: Callable[[], QARow]) -> None:
        if self.k <= 0:
            return
        rank = (_key_hash(key), key)
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, _QAEntry(rank, make_row()))
        elif rank < self._heap[0].rank:
            heapq.heapreplace(self._heap, _QAEntry(rank, make_row()))

    def rows(self) -> list[QARow]:
        return [e.row for e in sorted(self._heap, key=lambda e: e.rank)]


class _FaultHook:
    """Test-only crash injection: SIGKILL the process mid-shard, once per marker file.

    Active only when both LATENT_FAULT_KILL_AFTER=N and LATENT_FAULT_MARKER=PATH are set. The
    first worker to pass N encoded rows in a shard creates PATH (atomically) and kills itself;
    later attempts see PATH and carry on, so the retry succeeds.
    """

    def __init__(self) -> None:
        after = os.environ.get(FAULT_KILL_AFTER)
        self.marker = os.environ.get(FAULT_MARKER)
        self.after = int(after) if after and self.marker else None

    def check(self, rows: int) -> None:
        if self.after is None or rows < self.after or os.path.exists(self.marker):  # type: ignore[arg-type]
            return
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # type: ignore[arg-type]
        except FileExistsError:
            return
        os.write(fd, f"killed pid {os.getpid()} after {rows} rows\n".encode())
        os.close(fd)
        log.warning("fault hook: killing worker process %d after %d rows", os.getpid(), rows)
        os.kill(os.getpid(), signal.SIGKILL)


def torch_threads(device_type: str, cpus: float) -> int:
    """Torch CPU threads of an encode worker: all its CPUs on CPU; on a GPU, where the encoder
    only launches kernels, at most two."""
    n = max(1, int(cpus))
    return n if device_type == "cpu" else min(2, n)


def default_decoders(device_type: str, cpus: float) -> int:
    """Decoders of an encode worker when `ray.decode_threads` is unset: its CPUs; on a GPU with 4
    or more CPUs, two fewer, left to the worker's own threads (reading, batching and kernel
    launches; the writer), as the GPU benchmark runs it (14 decoders of 16 CPUs)."""
    n = max(1, int(cpus))
    return n - 2 if device_type != "cpu" and n >= 4 else n


def check_sizes(config: JobConfig, factor: int) -> None:
    """Every target size must be divisible by the model's downsampling factor."""
    p = config.preprocess
    key = "preprocess.buckets" if p.buckets else "preprocess.resolution"
    for i, (h, w) in enumerate(p.target_sizes()):
        if h % factor or w % factor:
            where = f"{key}[{i}]" if p.buckets else key
            raise ConfigError(where, f"{h}x{w} is not divisible by the model's downsampling factor {factor}")


def build_manifest(config: JobConfig, model: Any) -> Manifest:
    """The output manifest for this config and loaded model."""
    factor = int(model.downsample_factor)
    channels = int(model.latent_channels)
    sizes = config.preprocess.target_sizes()
    fingerprint = dict(model.fingerprint())
    # The compute dtype changes the latents' low bits: runs sharing an OUTPUT must agree on it.
    fingerprint["compute_dtype"] = config.model.dtype
    p = config.preprocess
    return Manifest(
        format=config.output.format,
        dtype=config.output.dtype,
        store=config.output.store,
        flip=config.output.flip,
        model=fingerprint,
        scaling_factor=float(model.scaling_factor),
        shift_factor=float(model.shift_factor),
        latent_channels=channels,
        downsample_factor=factor,
        shapes=[[channels, h // factor, w // factor] for h, w in sizes],
        preprocess={
            "sizes": [[h, w] for h, w in sizes],
            "buckets": p.buckets is not None,
            "crop": p.crop,
            "seed": p.seed,
            "background": list(p.background),
            "resize": "shorter side to cover the target, Lanczos over the crop box; JPEG draft decoding",
            "min_size": p.min_size,
            "max_pixels": p.max_pixels,
            "image_exts": list(config.input.image_exts),
            "caption_key": config.input.caption_key,
        },
    )


class EncodeWorker:
    """Encodes whole shards with one autoencoder held on one device.

    Parameters
    ----------
    config: the validated job config.
    device: "cpu", "cuda", "cuda:1", ...; default: CUDA when available, else CPU.
    set_threads: set torch's CPU thread count from `ray.num_cpus_per_worker` (actors do; a
        plain caller keeps its process-wide setting).
    model: an already loaded `AutoencoderKL` (default: loaded from `config.model`).
    """

    def __init__(self, config: JobConfig, *, device: str | None = None, set_threads: bool = False, model: Any = None):
        import torch

        self.config = config
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        cpus = max(1, int(config.ray.num_cpus_per_worker))
        if set_threads:
            torch.set_num_threads(torch_threads(self.device.type, cpus))
        self.decode_threads = config.ray.decode_threads or default_decoders(self.device.type, cpus)
        self.model = model if model is not None else load_model(config.model)
        check_sizes(config, int(self.model.downsample_factor))
        self.model.prepare(
            device=str(self.device),
            dtype=config.model.dtype,
            channels_last=config.model.channels_last_on(self.device.type),
            compile=config.model.compile,
        )
        self.manifest = build_manifest(config, self.model)
        sizes = config.preprocess.target_sizes()
        batch = config.ray.batch_size
        self.batch_size = auto_batch_size(self.device.type, sizes) if batch == "auto" else int(batch)
        warning = batch_warning(
            self.batch_size, sizes, int(self.model.config.ch), self.device.type, config.model.dtype,
            memory_budget(self.device, gpu_share=config.ray.num_gpus_per_worker, cpus=cpus),
        )
        if warning:
            log.warning(warning)
        # Shards this worker may encode at the same time (one lane of device buffers each).
        self.concurrency = config.ray.shards_in_flight(gpu=self.device.type == "cuda")
        self._encoder = _DeviceEncoder(
            self.model, self.device, cuda_graphs=config.model.cuda_graphs and not config.model.compile,
            lanes=self.concurrency,
        )
        self._lanes: queue.SimpleQueue[int] = queue.SimpleQueue()
        for lane in range(self.concurrency):
            self._lanes.put(lane)
        self.preprocessor = Preprocessor.from_config(config.preprocess)
        p = config.preprocess
        self.decode_options = DecodeOptions(
            background=(int(p.background[0]), int(p.background[1]), int(p.background[2])),
            max_pixels=p.max_pixels,
            min_size=p.min_size,
        )
        self.decode_mode = resolve_mode(config.ray.decode_mode, gpu=self.device.type == "cuda", workers=self.decode_threads)
        self._decoder = DecodePool(self.decode_threads, self.decode_mode, self.decode_options, self.preprocessor,
                                   timeout=config.ray.decode_timeout)
        self._decoder.warm_up()
        log.info("encode worker: %s on %s, batch %d, %d decode %s, %d shard(s) at a time", type(self.model).__name__,
                 self.device, self.batch_size, self.decode_threads, self.decode_mode, self.concurrency)
        self._fault = _FaultHook()
        # Shards being encoded -> images written so far. Read from other threads by the actor's
        # progress(); written under the GIL one key at a time.
        self.running: dict[str, int] = {}

    def close(self) -> None:
        """Stop the decode threads or processes."""
        self._decoder.close()

    # -- one shard --------------------------------------------------------------------------

    def process_shard(self, url: str, name: str, *, num_shards: int = 1) -> ShardResult:
        """Read, encode, write and commit input shard `url` as output shard `name`.

        `num_shards` is the number of shards of the whole job (it sets the per-shard QA quota).
        Bad samples become ledger rows; a shard-level problem (unreadable tar, storage or device
        failure) raises, and nothing of the shard is committed.

        Up to `concurrency` shards may be processed at once, from different threads (a Ray actor
        with several shards in flight): they share the decode pool and the device, so one shard's
        start overlaps another's end. Each shard's output is what it would be alone.
        """
        lane = self._lanes.get()
        self.running[name] = 0
        try:
            return self._process_shard(url, name, num_shards, lane)
        finally:
            self.running.pop(name, None)
            self._lanes.put(lane)

    def _process_shard(self, url: str, name: str, num_shards: int, lane: int) -> ShardResult:
        start = time.monotonic()
        out = self.config.output
        reader = ShardReader(
            url,
            self.config.input.storage_options,
            image_exts=self.config.input.image_exts,
            caption_key=self.config.input.caption_key,
        )
        qa = _QASelector(qa_per_shard(self.config.qa.samples, num_shards))
        reasons: Counter[str] = Counter()
        clock = dict.fromkeys(STAGES, 0.0)
        rows = 0
        with ShardWriter(
            out.path, name, fmt=out.format, dtype=out.dtype, storage_options=out.storage_options,
            manifest_info=self.manifest,
        ) as writer:
            sink = _WriterThread(writer, clock)

            def finish(launched: _Launched) -> None:
                nonlocal rows
                t0 = time.perf_counter()
                launched.result.wait()
                clock["encode"] += time.perf_counter() - t0
                latent_rows = self._rows(launched, url, qa)
                sink.put(("rows", latent_rows))
                rows += len(latent_rows)
                self.running[name] = rows
                self._fault.check(rows)

            try:
                # One batch stays in flight on the device while the next one is assembled: on
                # CUDA the encoder computes batch N while this thread collects decoded samples
                # and builds the rows of batch N-1.
                in_flight: _Launched | None = None
                for batch in self._batches(reader, url, reasons, sink, clock):
                    t0 = time.perf_counter()
                    launched = self._launch(batch, lane)
                    clock["encode"] += time.perf_counter() - t0
                    if in_flight is not None:
                        finish(in_flight)
                    in_flight = launched
                if in_flight is not None:
                    finish(in_flight)
                t0 = time.perf_counter()
                sink.close()
                clock["write_wait"] += time.perf_counter() - t0
            except BaseException:
                sink.abort()
                raise
            t0 = time.perf_counter()
            writer.add_qa_rows(qa.rows())
            record = writer.commit()
            clock["commit"] = time.perf_counter() - t0
        seconds = time.monotonic() - start
        log.info("shard %s: %d rows, %d errors in %.1fs", name, record.rows, record.errors, seconds)
        return ShardResult(
            name=name, url=storage.redact(url), rows=record.rows, errors=record.errors,
            errors_by_reason=dict(reasons), qa_rows=record.qa_rows, seconds=seconds,
            stage_seconds={k: round(v, 3) for k, v in clock.items()}, batch_size=self.batch_size,
        )

    # -- read + decode + batch ---------------------------------------------------------------

    def _prepare(self, sample: Sample) -> Preprocessed | ErrorRow:
        """Decode + preprocess one sample here, in the calling thread."""
        result = prepare(sample.image, sample.key, self.decode_options, self.preprocessor)
        if isinstance(result, DecodeFailure):
            return ErrorRow(sample.key, "", result.stage, result.reason, result.message)
        return result

    def _batches(self, reader: ShardReader, url: str, reasons: Counter[str], sink: _WriterThread,
                 clock: dict[str, float]):
        """Yield lists of (sample, preprocessed) of one target size, in a deterministic order.

        Samples go to the decode pool in chunks and come back in shard order; bad samples (from
        the reader or the decoder) reach the ledger in shard order too, whatever the pool.
        """
        batch_size = self.batch_size
        # Threads: 4 samples per thread; processes: 2 chunks per process.
        prefetch = max(2 * batch_size, self.decode_threads * max(4, 2 * self._decoder.chunk))
        # Partial buckets hold decoded images; cap them so many buckets cannot exhaust memory.
        max_pending = 4 * batch_size
        pending: dict[tuple[int, int], list[tuple[Sample, Preprocessed]]] = {}
        # Entries in shard order: a read error, or a chunk of samples with the (key, bytes) items
        # sent to the decode pool and its future.
        window: deque[SampleError | tuple[list[Sample], list[tuple[str, bytes]], Future]] = deque()
        queued = 0  # samples in the window
        chunk: list[Sample] = []

        def error(row: ErrorRow) -> None:
            reasons[f"{row.stage}/{row.error}"] += 1
            sink.put(("error", row))

        def add(sample: Sample, result: Preprocessed | DecodeFailure):
            if isinstance(result, DecodeFailure):
                error(ErrorRow(sample.key, url, result.stage, result.reason, result.message))
                return None
            bucket = pending.setdefault(result.target_size, [])
            bucket.append((sample, result))
            if len(bucket) >= batch_size:
                return pending.pop(result.target_size)
            if sum(len(b) for b in pending.values()) > max_pending:
                fullest = max(pending, key=lambda k: (len(pending[k]), k))
                return pending.pop(fullest)
            return None

        def oldest():
            """Collect the oldest window entry; yields the batches it completes."""
            nonlocal queued
            entry = window.popleft()
            if isinstance(entry, SampleError):
                error(ErrorRow(entry.key, url, "read", entry.reason, entry.message))
                return
            samples, items, future = entry
            queued -= len(samples)
            t0 = time.perf_counter()
            results = self._decoder.result(future, items)
            clock["decode_wait"] += time.perf_counter() - t0
            for sample, result in zip(samples, results):
                ready = add(sample, result)
                if ready:
                    yield ready

        def flush() -> None:
            nonlocal chunk, queued
            if chunk:
                items = [(s.key, s.image) for s in chunk]
                window.append((chunk, items, self._decoder.submit(items)))
                queued += len(chunk)
                chunk = []

        for item in reader:
            if isinstance(item, SampleError):
                flush()
                window.append(item)
            else:
                chunk.append(item)
                if len(chunk) >= self._decoder.chunk:
                    flush()
            while queued >= prefetch:
                yield from oldest()
        flush()
        while window:
            yield from oldest()
        for size in list(pending):
            yield pending.pop(size)

    # -- encode -------------------------------------------------------------------------------

    def _launch(self, batch: list[tuple[Sample, Preprocessed]], lane: int = 0) -> _Launched:
        """Start encoding `batch` (asynchronously on CUDA); `_rows` collects the result."""
        pixels = np.stack([p.pixels for _, p in batch])
        return _Launched(batch, self._encoder.launch(pixels, flip=self.config.output.flip, lane=lane))

    def _rows(self, launched: _Launched, url: str, qa: _QASelector) -> list[LatentRow]:
        import torch

        out = self.config.output
        keep_logvar = out.store == "mean+logvar"
        mean, logvar, flip_mean, flip_logvar = launched.result.get()
        rows = []
        for i, (sample, pre) in enumerate(launched.batch):
            latent = mean[i]
            row = LatentRow(
                key=sample.key,
                source=url,
                index=sample.index,
                latent=latent,
                logvar=logvar[i] if keep_logvar else None,
                caption=sample.caption,
                meta=sample.meta,
                original_size=pre.original_size,
                crop_top_left=pre.crop_top_left,
                target_size=pre.target_size,
            )
            if out.store == "sample":
                row.latent = self._sample(mean[i], logvar[i], sample.key, "sample", torch)
            if out.flip:
                assert flip_mean is not None and flip_logvar is not None
                row.latent_flip = (
                    self._sample(flip_mean[i], flip_logvar[i], sample.key, "sample-flip", torch)
                    if out.store == "sample"
                    else flip_mean[i]
                )
                row.logvar_flip = flip_logvar[i] if keep_logvar else None
            rows.append(row)
            qa.offer(
                sample.key,
                lambda s=sample, p=pre, m=latent: QARow(key=s.key, source=url, pixels=p.pixels, latent=m.copy(), bucket=p.bucket),
            )
        return rows

    def _posterior(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [B, H, W, 3] -> fp32 posterior mean and logvar [B, C, h, w] as numpy (synchronous)."""
        mean, logvar, _, _ = self._encoder.launch(pixels, flip=False).get()
        return mean, logvar

    def _sample(self, mean: np.ndarray, logvar: np.ndarray, key: str, what: str, torch: Any) -> np.ndarray:
        # Noise seeded per key (not per batch) so a sample does not depend on batching or device.
        g = torch.Generator().manual_seed(_key_seed(self.config.preprocess.seed, key, what))
        eps = torch.randn(mean.shape, generator=g, dtype=torch.float32).numpy()
        return (mean + np.exp(0.5 * logvar) * eps).astype(np.float32)


@dataclass
class _Launched:
    """A batch whose encoding has been started on the device."""

    batch: list[tuple[Sample, Preprocessed]]
    result: _PendingPosterior


class _PendingPosterior:
    """Posterior tensors of one batch, on their way back to the host.

    `get()` waits for the device (CUDA: for this batch's copies only) and returns numpy arrays
    that the caller owns: (mean, logvar, flip_mean, flip_logvar), the flipped pair None unless
    asked for.
    """

    def __init__(self, host: list[Any], event: Any = None):
        self._host = host
        self._event = event

    def wait(self) -> None:
        """Block until the device has finished this batch (no-op on CPU, where it already has)."""
        if self._event is not None:
            self._event.synchronize()

    def get(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        if self._event is not None:
            self._event.synchronize()
            # The pinned buffers are reused two batches later: hand out copies.
            arrays = [t.numpy().copy() for t in self._host]
        else:
            arrays = [t.numpy() for t in self._host]
        mean, logvar = arrays[0], arrays[1]
        flip_mean, flip_logvar = (arrays[2], arrays[3]) if len(arrays) > 2 else (None, None)
        return mean, logvar, flip_mean, flip_logvar


class _DeviceEncoder:
    """Runs the encoder on uint8 batches; on CUDA the copies and the compute are asynchronous.

    CPU: plain synchronous calls. CUDA: each batch is copied into one of two reused pinned host
    buffers and sent to the device on a separate copy stream (so the upload of batch N+1 overlaps
    the encoder's work on batch N); the compute stream waits for that copy only, runs the
    encoder, and copies the posterior back into reused pinned buffers without blocking; an event
    marks when they are filled. Only uint8 crosses the bus on the way in (4x less than float32);
    the scaling to [-1, 1] happens on the device. At most two batches use the buffers at a time
    (the one being encoded and the one being prepared), which `EncodeWorker` guarantees by
    collecting batch N before launching batch N+2.

    Shards encoded at the same time (from different threads) each use their own `lane`: a pair of
    slots, so the rule above holds per shard. A lock makes launches one at a time; collecting
    (`get`) needs no lock.

    With `cuda_graphs`, the encoder of each (slot, batch shape, flip) is captured once as a CUDA
    graph and then replayed: one call per batch instead of hundreds of kernel launches from
    Python. That matters because the launching thread shares the GIL with the decode threads;
    eager launches starve while they decode. All graphs share one memory pool (they replay one
    after another on one stream), and a shape whose capture fails falls back to eager calls.
    """

    def __init__(self, model: Any, device: Any, *, cuda_graphs: bool = False, lanes: int = 1):
        import torch

        self.model = model
        self.device = device
        self.cuda = device.type == "cuda"
        slots = 2 * max(1, lanes)
        self._next = [0] * max(1, lanes)  # per lane: which of its two slots the next batch uses
        self._lock = threading.Lock()
        # Per slot: pinned host input by (shape, flip), its upload-done event, pinned outputs by shape.
        self._staging: list[dict[tuple, Any]] = [{} for _ in range(slots)]
        self._uploaded: list[Any] = [None] * slots
        self._outputs: list[dict[tuple, Any]] = [{} for _ in range(slots)]
        self.cuda_graphs = bool(cuda_graphs) and self.cuda
        # (slot, shape, flip) -> (graph, static uint8 input, static outputs), or None after a failed capture.
        self._graphs: dict[tuple, Any] = {}
        self._graph_pool: Any = None
        if self.cuda:
            self._copy_stream = torch.cuda.Stream(device=device)

    def launch(self, pixels: np.ndarray, *, flip: bool, lane: int = 0) -> _PendingPosterior:
        """Start encoding uint8 [B, H, W, 3] (and its mirror image when `flip`) in `lane`."""
        import torch

        with torch.inference_mode():
            if not self.cuda:
                return _PendingPosterior(self._encode_all(torch.from_numpy(pixels), flip))
            with self._lock:
                slot = 2 * lane + self._next[lane]
                self._next[lane] ^= 1
                return self._launch_cuda(pixels, flip, slot)

    def _encode(self, x: Any) -> tuple[Any, Any]:
        # x: uint8 NHWC on the device -> float32 mean, logvar (on the device).
        x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        posterior = self.model.encode(x)
        return posterior.mean.float(), posterior.logvar.float()

    def _encode_all(self, x: Any, flip: bool) -> list[Any]:
        outputs = list(self._encode(x))
        if flip:
            outputs += self._encode(x.flip(2))
        return outputs

    def _graph(self, slot: int, shape: tuple, flip: bool) -> Any:
        """The captured graph for this slot, shape and flip (captured on first use); None: run eagerly."""
        import torch

        key = (slot, shape, flip)
        if key in self._graphs:
            return self._graphs[key]
        entry = None
        try:
            torch.cuda.synchronize(self.device)
            static_in = torch.zeros(shape, dtype=torch.uint8, device=self.device)
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up (cuDNN/cuBLAS choose their kernels) before capture
                for _ in range(2):
                    self._encode_all(static_in, flip)
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            # thread_local: another shard's thread may wait on its events while this one captures.
            with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
                outputs = self._encode_all(static_in, flip)
            if self._graph_pool is None:
                self._graph_pool = graph.pool()
            entry = (graph, static_in, outputs)
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run this shape eagerly
            log.warning("CUDA graph capture failed for batch shape %s (flip=%s), encoding it eagerly: %s",
                        shape, flip, exc)
            torch.cuda.synchronize(self.device)
        self._graphs[key] = entry
        return entry

    def _launch_cuda(self, pixels: np.ndarray, flip: bool, slot: int) -> _PendingPosterior:
        import torch

        staging = self._staging[slot].get(pixels.shape)
        if staging is None:
            staging = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
            self._staging[slot][pixels.shape] = staging
        if self._uploaded[slot] is not None:
            self._uploaded[slot].synchronize()  # the upload that last read this buffer is done
        staging.numpy()[...] = pixels
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            x = staging.to(self.device, non_blocking=True)
            uploaded = torch.cuda.Event()
            uploaded.record(self._copy_stream)
        self._uploaded[slot] = uploaded
        compute.wait_event(uploaded)
        # x was allocated on the copy stream; tell the caching allocator the compute stream uses it.
        x.record_stream(compute)
        graph = self._graph(slot, tuple(pixels.shape), flip) if self.cuda_graphs else None
        if graph is None:
            outputs = self._encode_all(x, flip)
        else:
            g, static_in, outputs = graph
            static_in.copy_(x)  # device to device, on the compute stream: ordered before the replay
            g.replay()
        host = []
        for i, t in enumerate(outputs):
            key = (i, tuple(t.shape))
            buf = self._outputs[slot].get(key)
            if buf is None:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                self._outputs[slot][key] = buf
            buf.copy_(t, non_blocking=True)
            host.append(buf)
        done = torch.cuda.Event()
        done.record(compute)
        return _PendingPosterior(host, done)


class _WriterThread:
    """Feeds a ShardWriter from a bounded queue in its own thread (the writer is single-threaded)."""

    def __init__(self, writer: ShardWriter, clock: dict[str, float], depth: int = 4):
        self.writer = writer
        self._clock = clock
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"writer-{writer.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None or self._stop.is_set():
                continue  # drain so the producer never blocks
            kind, payload = item
            try:
                if kind == "rows":
                    self.writer.write(payload)
                else:
                    self.writer.add_error(payload)
            except BaseException as e:
                self.error = e

    def put(self, item: tuple[str, Any]) -> None:
        t0 = time.perf_counter()
        try:
            while True:
                if self.error is not None:
                    raise self.error
                try:
                    self.queue.put(item, timeout=0.5)
                    return
                except queue.Full:
                    continue
        finally:
            self._clock["write_wait"] += time.perf_counter() - t0

    def close(self) -> None:
        """Wait until everything queued is written; re-raise a write error."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        self._stop.set()
        try:
            self.queue.put(None, timeout=5)
        except queue.Full:
            pass
        self.thread.join(timeout=30)
