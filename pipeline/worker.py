"""The encode worker: one input shard in, one committed output shard out.

`EncodeWorker` is a plain class (tests drive it directly); `driver.py` wraps it in a Ray actor.
It holds what outlives a shard: the model on its device (`device_encoder.py`), the decode pool
(`decodepool.py`) and the resolved batch size. Inside `process_shard` the stages overlap:

    shard thread   read tar (prefetching cache) -> submit to the decode pool -> collect in order ->
                   batch per bucket (`batcher.py`) -> launch batch N on the device -> encode the
                   non-finite samples of batch N-1 again in fp32 (`finite.py`), build its rows and
                   pick its QA samples (`qa_select.py`)
    decode pool    decode + preprocess, `decode_threads` wide, kept ahead of the encoder: threads
                   of this process, or processes of their own (`ray.decode_mode`, `decodepool.py`)
    device         encodes batch N meanwhile (asynchronous on CUDA, `device_encoder.py`)
    writer thread  storage rounding, Parquet/tar writing to local temp files (`writer.py`)

and the shard is committed (uploaded whole, commit record last) at the end. Output rows come in
a deterministic order that depends only on the shard's content and the config, so a shard gives
the same bytes whichever worker encodes it and however many workers there are. For a config with
several outputs, `fanout.py` runs one `EncodeWorker` per output on samples read and decoded once.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import faults, storage
from .batch_size import auto_batch_size, batch_warning, memory_budget
from .batcher import Batch, ShardBatcher
from .config import JobConfig
from .decode import DecodeOptions
from .decodepool import DecodePool, resolve_mode
from .device_encoder import DeviceEncoder, PendingPosterior
from .finite import NON_FINITE, FiniteLadder, Posterior
from .manifest import build_manifest, check_sizes
from .models import load_model
from .preprocess import Preprocessor
from .qa_select import QASelector, qa_per_shard
from .reader import Sample, SampleError, ShardReader
from .reasons import Reason
from .rows import ErrorRow, LatentRow, QARow
from .writer import ShardWriter, WriterThread

__all__ = ["EncodeWorker", "SharedParts", "ShardResult", "STAGES", "default_decoders", "torch_threads"]

log = logging.getLogger(__name__)


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
    #: Samples whose reduced-precision posterior was not finite and that were encoded again in
    #: fp32 (`pipeline.finite`); `fp32_recovered` of them were finite then and are stored.
    fp32_retries: int = 0
    fp32_recovered: int = 0
    #: The commit record as written (`CommitRecord.to_dict()`): the driver indexes it without reading it back.
    commit: dict[str, Any] = field(default_factory=dict)


#: Keys of `ShardResult.stage_seconds`.
STAGES = ("decode_wait", "encode", "write_wait", "commit")


@dataclass
class SharedParts:
    """What an `EncodeWorker` shares with the workers of a job's other outputs (`pipeline.fanout`).

    Such a worker starts no decoders of its own (each `process_shard` call brings the shard's
    samples and the decoders shared by all outputs), launches on the device under `device_lock`,
    which every output's worker holds, and checks its batch size against `memory_share` of the
    worker's memory (the outputs' encoders run side by side).
    """

    device_lock: threading.Lock
    memory_share: float


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


class EncodeWorker:
    """Encodes whole shards with one autoencoder held on one device.

    Parameters
    ----------
    config: the validated job config.
    device: "cpu", "cuda", "cuda:1", ...; default: CUDA when available, else CPU.
    set_threads: set torch's CPU thread count from `ray.num_cpus_per_worker` (actors do; a
        plain caller keeps its process-wide setting).
    model: an already loaded `AutoencoderKL` (default: loaded from `config.model`).
    shared: the parts it shares with the workers of other outputs of one read (`SharedParts`).

    Its parts are attributes: `model`, `manifest`, `batch_size`, `device_encoder` (a
    `DeviceEncoder`), `text_encoders` (`TextEncoders` of the `text` section, or None), `preprocessor`, `decode_options` and `decode_pool` (a `DecodePool` of
    `decode_threads` threads or processes, per `decode_mode`). `concurrency` shards may be
    processed at once; `running` maps each shard being encoded to its rows written so far.
    """

    def __init__(self, config: JobConfig, *, device: str | None = None, set_threads: bool = False, model: Any = None,
                 shared: SharedParts | None = None):
        import torch

        self.config = config
        self.shared = shared
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cpus = max(1, int(config.ray.num_cpus_per_worker))
        if set_threads:
            torch.set_num_threads(torch_threads(self.device.type, cpus))
        self.model = self._prepare_model(model)
        self.text_encoders = self._load_text_encoders()
        self.manifest = build_manifest(config, self.model,
                                       self.text_encoders.facts() if self.text_encoders is not None else None)
        self.batch_size = self._resolve_batch_size(cpus)
        self._start_device_stage()
        self._start_decode_stage(cpus)
        log.info("encode worker: %s on %s, batch %d, %d decode %s, %d shard(s) at a time", type(self.model).__name__,
                 self.device, self.batch_size, self.decode_threads, self.decode_mode, self.concurrency)
        self._kill_hook = faults.kill_after_rows()
        # Shards being encoded -> images written so far. Read from other threads by the actor's
        # progress(); written under the GIL one key at a time.
        self.running: dict[str, int] = {}

    def _prepare_model(self, model: Any) -> Any:
        """The model (loaded from the config unless given), checked against the target sizes and
        set up for inference on this worker's device."""
        model = model if model is not None else load_model(self.config.model)
        check_sizes(self.config, int(model.downsample_factor))
        m = self.config.model
        model.prepare(device=str(self.device), dtype=m.dtype, channels_last=m.channels_last_on(self.device.type),
                      compile=m.compile)
        return model

    def _load_text_encoders(self) -> Any:
        """The caption encoders of the `text` section on this worker's device; None without one.
        They run here rather than in actors of their own: see `pipeline.text_encoders`."""
        if not self.config.text:
            return None
        # Imported here: it brings transformers, which an image-only job never imports.
        from .text_encoders import TextEncoders

        return TextEncoders(self.config.text, self.device)

    def _resolve_batch_size(self, cpus: int) -> int:
        """`ray.batch_size` with "auto" resolved; logs a warning when it looks too large to fit."""
        config = self.config
        sizes = config.preprocess.target_sizes()
        batch = config.ray.batch_size
        size = auto_batch_size(self.device.type, sizes) if batch == "auto" else int(batch)
        budget = memory_budget(self.device, gpu_share=config.ray.num_gpus_per_worker, cpus=cpus)
        if budget is not None and self.shared is not None:
            budget = int(budget * self.shared.memory_share)
        warning = batch_warning(size, sizes, int(self.model.config.ch), self.device.type, config.model.dtype, budget)
        if warning:
            log.warning(warning)
        return size

    def _start_device_stage(self) -> None:
        """`device_encoder`, with one lane of device buffers per shard encoded at the same time."""
        gpu = self.device.type == "cuda"
        m = self.config.model
        self.concurrency = self.config.ray.shards_in_flight(gpu=gpu)
        self.device_encoder = DeviceEncoder(self.model, self.device, cuda_graphs=m.cuda_graphs and not m.compile,
                                            lanes=self.concurrency,
                                            lock=self.shared.device_lock if self.shared is not None else None)
        self.finite = FiniteLadder(self.device_encoder, m.dtype)
        self._lanes: queue.SimpleQueue[int] = queue.SimpleQueue()
        for lane in range(self.concurrency):
            self._lanes.put(lane)

    def _start_decode_stage(self, cpus: int) -> None:
        """`decode_pool` (started and warmed up; None with `shared` parts) and what its decoders use."""
        config = self.config
        gpu = self.device.type == "cuda"
        self.decode_threads = config.ray.decode_threads or default_decoders(self.device.type, cpus)
        self.decode_mode = resolve_mode(config.ray.decode_mode, gpu=gpu, workers=self.decode_threads)
        self.preprocessor = Preprocessor.from_config(config.preprocess)
        self.decode_options = _decode_options(config)
        self.decode_pool: DecodePool | None = None
        if self.shared is None:
            self.decode_pool = DecodePool(self.decode_threads, self.decode_mode, self.decode_options,
                                          self.preprocessor, timeout=config.ray.decode_timeout)
            self.decode_pool.warm_up()

    def close(self) -> None:
        """Stop the decode threads or processes."""
        if self.decode_pool is not None:
            self.decode_pool.close()

    def process_shard(
        self, url: str, name: str, *, num_shards: int = 1, qa_rows: int | None = None, fresh: bool = False,
        samples: Iterable[Sample | SampleError] | None = None, decode_pool: Any = None,
    ) -> ShardResult:
        """Read, encode, write and commit input shard `url` as output shard `name`.

        `qa_rows` is the QA samples this shard keeps (the plan's quota, `plan.qa_quotas`); without
        it, `num_shards` (the job's shard count) sets an even share of `qa.samples`. `fresh`: the
        plan handed the shard out as having no valid commit (see `ShardWriter`).
        Bad samples become ledger rows; a shard-level problem (unreadable tar, storage or device
        failure) raises, and nothing of the shard is committed.

        Up to `concurrency` shards may be processed at once, from different threads (a Ray actor
        with several shards in flight): they share the decode pool and the device, so one shard's
        start overlaps another's end. Each shard's output is what it would be alone.

        `samples` and `decode_pool` (a worker with `shared` parts gets both): the shard's samples as
        read once for every output, and the decoders that prepare them for every output
        (`pipeline.fanout`), instead of reading `url` and decoding here.
        """
        lane = self._lanes.get()
        self.running[name] = 0
        try:
            quota = qa_rows if qa_rows is not None else qa_per_shard(self.config.qa.samples, num_shards)
            return _ShardJob(self, url, name, quota, lane, fresh, samples, decode_pool).run()
        finally:
            self.running.pop(name, None)
            self._lanes.put(lane)


def _decode_options(config: JobConfig) -> DecodeOptions:
    p = config.preprocess
    return DecodeOptions(
        background=(int(p.background[0]), int(p.background[1]), int(p.background[2])),
        max_pixels=p.max_pixels,
        min_size=p.min_size,
    )


@dataclass
class _Launched:
    """A batch whose encoding has been started on the device."""

    batch: Batch
    result: PendingPosterior
    #: The captions' embeddings (a `text_encoders.PendingText`) when the output stores them.
    text: Any = None


class _ShardJob:
    """One shard through an `EncodeWorker`: its device lane, its writer thread, its QA pick and
    its counters. Used once, by `run`."""

    def __init__(self, worker: EncodeWorker, url: str, name: str, qa_rows: int, lane: int, fresh: bool,
                 samples: Iterable[Sample | SampleError] | None, decode_pool: Any):
        self.worker = worker
        self.samples = samples
        self.decode_pool = decode_pool if decode_pool is not None else worker.decode_pool
        self.config = worker.config
        self.url = url
        self.name = name
        self.lane = lane
        self.qa = QASelector(qa_rows)
        self.fresh = fresh
        self.reasons: Counter[str] = Counter()
        self.clock = dict.fromkeys(STAGES, 0.0)
        self.rows = 0
        self.fp32_retries = 0
        self.fp32_recovered = 0

    def run(self) -> ShardResult:
        start = time.monotonic()
        inp, out = self.config.input, self.config.output
        reader = self.samples if self.samples is not None else ShardReader(
            self.url, inp.storage_options, image_exts=inp.image_exts, caption_key=inp.caption_key)
        with ShardWriter(
            out.path, self.name, fmt=out.format, dtype=out.dtype, storage_options=out.storage_options,
            manifest_info=self.worker.manifest, fresh=self.fresh,
        ) as writer:
            self.sink = WriterThread(writer, self.clock)
            try:
                self._encode(reader)
                t0 = time.perf_counter()
                self.sink.close()
                self.clock["write_wait"] += time.perf_counter() - t0
            except BaseException:
                self.sink.abort()
                raise
            t0 = time.perf_counter()
            writer.add_qa_rows(self.qa.rows())
            record = writer.commit()
            self.clock["commit"] = time.perf_counter() - t0
        seconds = time.monotonic() - start
        log.info("shard %s: %d rows, %d errors in %.1fs", self.name, record.rows, record.errors, seconds)
        return ShardResult(
            name=self.name, url=storage.redact(self.url), rows=record.rows, errors=record.errors,
            errors_by_reason=dict(self.reasons), qa_rows=record.qa_rows, seconds=seconds,
            stage_seconds={k: round(v, 3) for k, v in self.clock.items()}, batch_size=self.worker.batch_size,
            fp32_retries=self.fp32_retries, fp32_recovered=self.fp32_recovered,
            commit=record.to_dict(),
        )

    def _encode(self, reader: Iterable[Sample | SampleError]) -> None:
        """Batch, encode and hand the rows to the writer thread (errors go to the ledger)."""
        worker = self.worker
        batcher = ShardBatcher(reader, self.url, self.decode_pool, worker.batch_size, on_error=self._error)
        # One batch stays in flight on the device while the next one is assembled: on CUDA the
        # encoder computes batch N while this thread collects decoded samples and builds the rows
        # of batch N-1.
        in_flight: _Launched | None = None
        for batch in batcher:
            t0 = time.perf_counter()
            launched = self._launch(batch)
            self.clock["encode"] += time.perf_counter() - t0
            if in_flight is not None:
                self._finish(in_flight)
            in_flight = launched
        if in_flight is not None:
            self._finish(in_flight)
        self.clock["decode_wait"] += batcher.decode_wait

    def _launch(self, batch: Batch) -> _Launched:
        """Start encoding `batch` in this shard's lane (asynchronously on CUDA)."""
        pixels = np.stack([p.pixels for _, p in batch])
        result = self.worker.device_encoder.launch(pixels, flip=self.config.output.flip, lane=self.lane)
        # Queued on the device behind the images, so both come back at about the same time.
        text = self.worker.text_encoders
        return _Launched(batch, result, text.launch([s.caption for s, _ in batch]) if text is not None else None)

    def _error(self, row: ErrorRow) -> None:
        self.reasons[str(Reason(row.stage, row.error))] += 1
        self.sink.put(("error", row))

    def _finish(self, launched: _Launched) -> None:
        """Wait for a launched batch and send its rows to the writer."""
        t0 = time.perf_counter()
        launched.result.wait()
        posterior = self._finite(launched)
        texts = launched.text.get() if launched.text is not None else None
        self.clock["encode"] += time.perf_counter() - t0
        rows = self._rows(launched, posterior, texts)
        self.sink.put(("rows", rows))
        self.rows += len(rows)
        self.worker.running[self.name] = self.rows
        self.worker._kill_hook.check(self.rows)

    def _finite(self, launched: _Launched) -> tuple[Posterior, np.ndarray]:
        """The batch's posterior with non-finite samples encoded again in fp32 (`pipeline.finite`),
        and which samples stay non-finite (bool [B]): those go to the ledger, not into rows."""
        batch = launched.batch
        result = self.worker.finite.apply(launched.result.get(), [p.pixels for _, p in batch],
                                          flip=self.config.output.flip)
        self.fp32_retries += result.retried
        self.fp32_recovered += result.recovered
        for i in np.flatnonzero(result.rejected):
            sample = batch[i][0]
            self._error(ErrorRow(sample.key, self.url, NON_FINITE.stage, NON_FINITE.error,
                                 f"NaN or Inf in the posterior computed in {self.config.model.dtype}"
                                 + (" and again in fp32" if self.config.model.dtype != "fp32" else "")))
        return result.posterior, result.rejected

    def _rows(self, launched: _Launched, posterior: tuple[Posterior, np.ndarray],
              texts: list[dict[str, Any]] | None) -> list[LatentRow]:
        out = self.config.output
        keep_logvar = out.store == "mean+logvar"
        seed = self.config.preprocess.seed
        (mean, logvar, flip_mean, flip_logvar), rejected = posterior
        rows = []
        for i, (sample, pre) in enumerate(launched.batch):
            if rejected[i]:
                continue
            latent = mean[i]
            row = LatentRow(
                key=sample.key,
                source=self.url,
                index=sample.index,
                latent=latent,
                logvar=logvar[i] if keep_logvar else None,
                caption=sample.caption,
                meta=sample.meta,
                original_size=pre.original_size,
                crop_top_left=pre.crop_top_left,
                target_size=pre.target_size,
                text=texts[i] if texts is not None else None,
            )
            if out.store == "sample":
                row.latent = _sample(mean[i], logvar[i], seed, sample.key, "sample")
            if out.flip:
                assert flip_mean is not None and flip_logvar is not None
                row.latent_flip = (
                    _sample(flip_mean[i], flip_logvar[i], seed, sample.key, "sample-flip")
                    if out.store == "sample"
                    else flip_mean[i]
                )
                row.logvar_flip = flip_logvar[i] if keep_logvar else None
            rows.append(row)
            # QA compares what was stored (a draw for `store: sample`) with its unrounded value.
            self.qa.offer(sample.key, lambda s=sample, p=pre, m=row.latent: QARow(
                key=s.key, source=self.url, pixels=p.pixels, latent=m.copy(), bucket=p.bucket))
        return rows


def _key_seed(seed: int, key: str, what: str) -> int:
    digest = hashlib.sha256(f"{seed}\0{what}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def _sample(mean: np.ndarray, logvar: np.ndarray, seed: int, key: str, what: str) -> np.ndarray:
    """One draw of N(mean, exp(logvar)) for `store: sample`."""
    import torch

    # Noise seeded per key (not per batch) so a sample does not depend on batching or device.
    g = torch.Generator().manual_seed(_key_seed(seed, key, what))
    eps = torch.randn(mean.shape, generator=g, dtype=torch.float32).numpy()
    # numpy's exp, not torch's (`latentae.sample_gaussian`): they differ in the last bit for about
    # one float32 in eleven, and stored samples stay bit-identical to those earlier versions wrote
    # (a resumed OUTPUT holds shards of both).
    return (mean + np.exp(0.5 * logvar) * eps).astype(np.float32)
