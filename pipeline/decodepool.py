"""Decode + preprocess in a pool of threads or of processes, results in submission order.

Threads share the worker's process: cheap to start, no copies, and Pillow releases the GIL while
it decodes and resizes. But every image still runs a few hundred microseconds of Python (opening
the file, EXIF, the crop arithmetic, array wrapping), and each release of the GIL must be won back
from every other thread of the process: the encoder's launching thread, the tar reader, the
Parquet writer. With many decode threads that traffic, not the CPU, limits decoding.

Processes have their own interpreters: no GIL is shared, at the price of starting them (about a
second, once per worker) and of pickling each chunk's bytes in and its pixels out. Samples go in
chunks (`chunk`) so the per-message cost is paid once per several images.

Both give exactly the same results: the same function runs on the same bytes.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from .decode import DecodeError, DecodeOptions, decode_image
from .preprocess import Preprocessed, PreprocessError, Preprocessor

__all__ = ["DecodeFailure", "DecodePool", "prepare", "resolve_mode", "MODES", "FAULT_CRASH_KEY"]

MODES = ("auto", "threads", "processes")

#: Samples per message to a decode process.
PROCESS_CHUNK = 8

#: Test-only fault hook: a decode process that meets the sample with this key dies at once
#: (as if Pillow had crashed on it).
FAULT_CRASH_KEY = "LATENT_FAULT_CRASH_KEY"


@dataclass(frozen=True)
class DecodeFailure:
    """Why one sample could not be made into encoder input (a ledger row to be)."""

    stage: str  # "decode" or "preprocess"
    reason: str
    message: str


def prepare(data: bytes, key: str, options: DecodeOptions, preprocessor: Preprocessor) -> Preprocessed | DecodeFailure:
    """Image bytes -> encoder-ready pixels, or the reason they cannot be made. Never raises."""
    try:
        decoded = decode_image(data, options, needed_size=preprocessor.resized_size)
    except DecodeError as e:
        return DecodeFailure("decode", e.reason, str(e))
    except Exception as e:  # a decoder bug on one odd file must not fail the shard
        return DecodeFailure("decode", type(e).__name__, str(e))
    try:
        return preprocessor(decoded, key)
    except PreprocessError as e:
        return DecodeFailure("preprocess", e.reason, str(e))
    except Exception as e:
        return DecodeFailure("preprocess", type(e).__name__, str(e))


def resolve_mode(mode: str, *, gpu: bool, workers: int) -> str:
    """"auto" -> processes for a GPU worker with 8 or more decoders, else threads."""
    if mode == "auto":
        return "processes" if gpu and workers >= 8 else "threads"
    if mode not in MODES:
        raise ValueError(f"decode mode must be one of {MODES}, got {mode!r}")
    return mode


# -- inside a decode process -------------------------------------------------------------------

_child: tuple[DecodeOptions, Preprocessor] | None = None


def _child_init(options: DecodeOptions, preprocessor: Preprocessor, parent: int) -> None:
    global _child
    _child = (options, preprocessor)
    # A worker killed with SIGKILL cannot stop its pool: leave as soon as the parent is gone.
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _child_run(items: list[tuple[str, bytes]]) -> list[Preprocessed | DecodeFailure]:
    assert _child is not None, "decode process not initialised"
    options, preprocessor = _child
    crash = os.environ.get(FAULT_CRASH_KEY)
    out = []
    for key, data in items:
        if crash is not None and key == crash:
            os._exit(70)
        out.append(prepare(data, key, options, preprocessor))
    return out


# -- in the worker -----------------------------------------------------------------------------


class DecodePool:
    """`workers` threads or processes running `prepare` on chunks of (key, image bytes).

    Submit with `submit`, collect with `result` (not `future.result()`): when a decode process
    dies (a decoder crash on a hostile file), the pool is restarted and the chunks it held are
    redone one sample at a time, so the sample that kills a process again becomes a
    `DecodeFailure` with reason "crashed" and every other sample is prepared as usual.
    """

    def __init__(self, workers: int, mode: str, options: DecodeOptions, preprocessor: Preprocessor):
        if mode not in ("threads", "processes"):
            raise ValueError(f"mode must be 'threads' or 'processes', got {mode!r}")
        self.workers = max(1, int(workers))
        self.mode = mode
        self.options = options
        self.preprocessor = preprocessor
        self._lock = threading.Lock()
        #: Decode processes that died and were replaced.
        self.restarts = 0
        self._executor: ThreadPoolExecutor | ProcessPoolExecutor
        if mode == "threads":
            self.chunk = 1
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="decode")
        else:
            self.chunk = PROCESS_CHUNK
            self._executor = self._new_processes()

    def _new_processes(self) -> ProcessPoolExecutor:
        # spawn, never fork: the worker process has threads, and maybe a CUDA context.
        return ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_child_init,
            initargs=(self.options, self.preprocessor, os.getpid()),
        )

    def submit(self, items: list[tuple[str, bytes]]) -> Future:
        """Start preparing `items`; `result(future, items)` gives one entry per item, in order."""
        if self.mode == "threads":
            return self._executor.submit(self._run_here, items)
        with self._lock:
            executor = self._executor
        try:
            future = executor.submit(_child_run, items)
        except BrokenProcessPool:
            future = Future()
            future.set_exception(BrokenProcessPool("decode pool broken"))
        future.executor = executor  # type: ignore[attr-defined]
        return future

    def result(self, future: Future, items: list[tuple[str, bytes]]) -> list[Preprocessed | DecodeFailure]:
        """The prepared `items` of a `submit` future (waits for it)."""
        try:
            return future.result()
        except BrokenProcessPool:
            if self.mode != "processes":
                raise
        self._replace(getattr(future, "executor", None))
        out: list[Preprocessed | DecodeFailure] = []
        for item in items:
            with self._lock:
                executor = self._executor
            try:
                out.extend(executor.submit(_child_run, [item]).result())
            except BrokenProcessPool:
                out.append(DecodeFailure("decode", "crashed", "the decode process died while decoding this image"))
                self._replace(executor)
        return out

    def _replace(self, broken: ProcessPoolExecutor | None) -> None:
        """Swap in a fresh process pool unless another thread already replaced `broken`."""
        with self._lock:
            if broken is not None and self._executor is not broken:
                return
            old = self._executor
            self._executor = self._new_processes()
            self.restarts += 1
        old.shutdown(wait=False, cancel_futures=True)

    def _run_here(self, items: list[tuple[str, bytes]]) -> list[Preprocessed | DecodeFailure]:
        return [prepare(data, key, self.options, self.preprocessor) for key, data in items]

    def warm_up(self) -> None:
        """Start every process now rather than at the first shard (no-op for threads)."""
        if self.mode == "processes":
            for f in [self._executor.submit(_child_run, []) for _ in range(self.workers)]:
                f.result()

    def close(self) -> None:
        """Stop the decoders: queued chunks are dropped, a running chunk is finished first."""
        # Processes are joined (a chunk takes milliseconds): leaving them to the interpreter's
        # exit makes it write to pipes that are already closed.
        self._executor.shutdown(wait=self.mode == "processes", cancel_futures=True)
