"""Decode + preprocess in a pool of threads or of processes, results in submission order.

Threads share the worker's process: cheap to start, no copies, and Pillow releases the GIL while
it decodes and resizes. But every image still runs a few hundred microseconds of Python (opening
the file, EXIF, the crop arithmetic, array wrapping), and each release of the GIL must be won back
from every other thread of the process: the encoder's launching thread, the tar reader, the
Parquet writer. With many decode threads that traffic, not the CPU, limits decoding.

Processes have their own interpreters: no GIL is shared, at the price of starting them (once per
worker) and of sending each chunk's bytes in and its pixels out through pipes (as out-of-band
buffers of the pickle, so they are not copied into and out of it). Samples go in chunks
(`chunk`) so the per-message cost is paid once per several images. They are started as
`python -m pipeline.decodechild`, not through multiprocessing, which would fork the worker
(threads, maybe a CUDA context) or make every child import the worker's main module (in a Ray
actor: all of Ray).

Both give exactly the same results: the same function runs on the same bytes.

A pool may apply several preparations (decode options and preprocessing) to every image, for a
job that writes several outputs from one read (`more`): each sample then gives one result per
preparation, and preparations that ask the JPEG decoder for the same draft reduction share one
decode (`prepare_all`).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from .decode import DecodedImage, DecodeError, DecodeOptions, decode_image, draft_size
from .faults import decode_fault
from .preprocess import Preprocessed, PreprocessError, Preprocessor

__all__ = ["DecodeFailure", "DecodePool", "Preparation", "prepare", "prepare_all", "resolve_mode", "MODES"]

MODES = ("auto", "threads", "processes")

log = logging.getLogger(__name__)

#: Samples per message to a decode process.
PROCESS_CHUNK = 8


@dataclass(frozen=True)
class DecodeFailure:
    """Why one sample could not be made into encoder input (a ledger row to be)."""

    stage: str  # "decode" or "preprocess"
    reason: str
    message: str


#: One way of making encoder input from image bytes: the decode limits and the preprocessing.
Preparation = tuple[DecodeOptions, Preprocessor]


def prepare(data: bytes, key: str, options: DecodeOptions, preprocessor: Preprocessor) -> Preprocessed | DecodeFailure:
    """Image bytes -> encoder-ready pixels, or the reason they cannot be made. Never raises."""
    decoded = _decode(data, options, preprocessor)
    return decoded if isinstance(decoded, DecodeFailure) else _preprocess(decoded, key, preprocessor)


def prepare_all(data: bytes, key: str, preparations: Sequence[Preparation]) -> list[Preprocessed | DecodeFailure]:
    """`prepare` with each of `preparations`, one result each, decoding the image once per distinct
    (decode options, JPEG draft reduction): the reduction depends on the target size, so
    preparations whose targets ask the decoder for the same one share its pixels, and each result
    equals what `prepare` gives with that preparation alone. Never raises."""
    decoded: dict[tuple[DecodeOptions, tuple[int, int] | None], DecodedImage | DecodeFailure] = {}
    out: list[Preprocessed | DecodeFailure] = []
    for options, preprocessor in preparations:
        group = (options, draft_size(data, preprocessor.resized_size))
        if group not in decoded:
            decoded[group] = _decode(data, options, preprocessor)
        image = decoded[group]
        out.append(image if isinstance(image, DecodeFailure) else _preprocess(image, key, preprocessor))
    return out


def _decode(data: bytes, options: DecodeOptions, preprocessor: Preprocessor) -> DecodedImage | DecodeFailure:
    try:
        return decode_image(data, options, needed_size=preprocessor.resized_size)
    except DecodeError as e:
        return DecodeFailure("decode", e.reason, str(e))
    except Exception as e:  # a decoder bug on one odd file must not fail the shard
        return DecodeFailure("decode", type(e).__name__, str(e))


def _preprocess(image: DecodedImage, key: str, preprocessor: Preprocessor) -> Preprocessed | DecodeFailure:
    try:
        return preprocessor(image, key)
    except PreprocessError as e:
        return DecodeFailure("preprocess", e.reason, str(e))
    except Exception as e:
        return DecodeFailure("preprocess", type(e).__name__, str(e))


@dataclass(frozen=True)
class _Task:
    """What a decoder does to each image: `prepare` with one preparation, or `prepare_all` with
    several (then a sample's result is a list, one entry per preparation)."""

    preparations: tuple[Preparation, ...]

    def __call__(self, data: bytes, key: str) -> Any:
        if len(self.preparations) == 1:
            return prepare(data, key, *self.preparations[0])
        return prepare_all(data, key, self.preparations)

    def failed(self, reason: str, message: str) -> Any:
        """A sample's result when no decoder could give one."""
        failure = DecodeFailure("decode", reason, message)
        return failure if len(self.preparations) == 1 else [failure] * len(self.preparations)


def resolve_mode(mode: str, *, gpu: bool, workers: int) -> str:
    """"auto" -> processes for a GPU worker with 8 or more decoders, else threads."""
    if mode == "auto":
        return "processes" if gpu and workers >= 8 else "threads"
    if mode not in MODES:
        raise ValueError(f"decode mode must be one of {MODES}, got {mode!r}")
    return mode


# -- inside a decode process -------------------------------------------------------------------
#
# A decode process is `python -m pipeline.decodechild FD`: it imports only this module (Pillow and
# numpy, no torch, no Ray), reads requests from its stdin and writes answers to pipe FD (not its
# stdout, which startup code or a library may print to). A message is a pickle and the large
# buffers it refers to, sent after it rather than copied into it (pickle protocol 5 out-of-band
# buffers: the JPEG bytes going in, the pixel arrays coming back), behind a 4-byte magic, the
# pickle's length, the buffer count and each buffer's length. First comes (task, timeout) (a
# `_Task`), then one chunk of (key, bytes) after another; for each chunk the process answers with
# the list of results. It exits at the end of its stdin, which is also what it sees when its
# worker dies, however it dies.

_MAGIC = b"LDP2"
_HEADER = struct.Struct("<4sQI")
_MAX_MESSAGE = 1 << 32
_MAX_BUFFERS = 1 << 16


class ProtocolError(RuntimeError):
    """A decode process sent something that is not a message."""


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return data


def _read_message(stream: BinaryIO, *, writable: bool = False) -> Any:
    """One message; `writable`: its buffers are fresh writable arrays (pixels for the worker),
    else bytes (JPEGs for a decode process, which only reads them)."""
    head = _read_exact(stream, _HEADER.size)
    magic, size, count = _HEADER.unpack(head)
    if magic != _MAGIC or size > _MAX_MESSAGE or count > _MAX_BUFFERS:
        raise ProtocolError(f"bad message header {head!r}")
    lengths = struct.unpack(f"<{count}Q", _read_exact(stream, 8 * count))
    if any(n > _MAX_MESSAGE for n in lengths):
        raise ProtocolError(f"bad buffer lengths {lengths!r}")
    body = _read_exact(stream, size)
    buffers: list[Any] = []
    for n in lengths:
        if writable:
            buf = np.empty(n, dtype=np.uint8)
            if stream.readinto(memoryview(buf)) < n:  # type: ignore[attr-defined]
                raise EOFError
            buffers.append(buf)
        else:
            buffers.append(_read_exact(stream, n))
    return pickle.loads(body, buffers=buffers)


def _write_message(stream: BinaryIO, obj: Any) -> None:
    buffers: list[pickle.PickleBuffer] = []
    body = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    stream.write(_HEADER.pack(_MAGIC, len(body), len(raws)) + struct.pack(f"<{len(raws)}Q", *(r.nbytes for r in raws)))
    stream.write(body)
    for raw in raws:
        stream.write(raw)
    stream.flush()


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    """The loop of a decode process.

    Each sample runs under an alarm of `timeout` seconds with SIGALRM's default action: a decoder
    stuck in C code cannot catch it, so the kernel ends the process and the pool sees why.
    """
    try:
        task, timeout = _read_message(inp)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        alarm = max(1, math.ceil(timeout)) if timeout else 0  # whole seconds; 0: none
        fault = decode_fault()  # test-only; a no-op unless its variables are set (see faults.py)
        while True:
            items = _read_message(inp)
            results = []
            for key, data in items:
                signal.alarm(alarm)
                fault.check(key)
                results.append(task(data, key))
            signal.alarm(0)
            _write_message(out, results)  # the pixel arrays go out of band
    except (EOFError, BrokenPipeError):
        return


# -- in the worker -----------------------------------------------------------------------------


class DecodeProcessDied(RuntimeError):
    """The decode process holding a chunk died before answering; `code` is its exit status
    (negative: the signal that ended it)."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class _Child:
    """One decode process: a writer thread feeds its stdin, a reader thread resolves the futures
    of its chunks in order."""

    def __init__(self, task: _Task, timeout: float, on_exit: Any):
        env = dict(os.environ)
        # The worker's import path (a Ray runtime_env may have extended it), so the child finds
        # this package wherever the worker found it.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        read_end, write_end = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.decodechild", str(write_end)], stdin=subprocess.PIPE,
                env=env, close_fds=True, pass_fds=(write_end,),
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        self._results = os.fdopen(read_end, "rb")
        self._on_exit = on_exit
        self._lock = threading.Lock()
        self._pending: deque[Future] = deque()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.alive = True
        self._outbox.put((task, timeout))
        self._writer = threading.Thread(target=self._write_loop, name="decode-feed", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="decode-results", daemon=True)
        self._writer.start()
        self._reader.start()

    @property
    def load(self) -> int:
        return len(self._pending)

    def submit(self, items: list[tuple[str, bytes]]) -> Future | None:
        """Queue a chunk; None when the process has already ended (choose another)."""
        future: Future = Future()
        with self._lock:
            if not self.alive:
                return None
            self._pending.append(future)
            self._outbox.put(items)
        return future

    def _write_loop(self) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            while True:
                item = self._outbox.get()
                if item is None:
                    break
                if isinstance(item, list):  # a chunk: its JPEG bytes go out of band, uncopied
                    item = [(key, pickle.PickleBuffer(data)) for key, data in item]
                _write_message(stdin, item)
        except (OSError, ValueError):
            pass  # the reader sees the process end and fails what is pending
        finally:
            try:
                stdin.close()
            except OSError:
                pass

    def _read_loop(self) -> None:
        reason = "exited"
        try:
            while True:
                results = _read_message(self._results, writable=True)
                with self._lock:
                    future = self._pending.popleft()
                future.set_result(results)
        except EOFError:
            pass
        except BaseException as e:  # noqa: BLE001 - garbage on the pipe: this process cannot be trusted
            reason = f"was stopped after a broken answer ({type(e).__name__}: {e})"
            log.error("decode process %d %s", self.proc.pid, reason)
            self.proc.kill()
        with self._lock:
            self.alive = False
            pending, self._pending = list(self._pending), deque()
        code = self.proc.wait()
        self._results.close()
        for future in pending:
            future.set_exception(DecodeProcessDied(f"decode process {self.proc.pid} {reason} (exit code {code})", code))
        self._on_exit(self)

    def close(self, timeout: float = 10.0) -> None:
        self._outbox.put(None)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class DecodePool:
    """`workers` threads or processes running `prepare` on chunks of (key, image bytes).

    Submit with `submit`, collect with `result` (not `future.result()`): when a decode process
    dies (a decoder crash on a hostile file), it is replaced and the chunks it held are redone
    one sample at a time, so a sample that kills a process on its own twice becomes a
    `DecodeFailure` with reason "crashed" and every other sample is prepared as usual. With
    processes, one sample taking more than `timeout` seconds ends its process the same way and
    becomes reason "timeout" (a thread cannot be stopped: threads ignore `timeout`).

    `more` adds preparations applied to every image as well: each sample's result is then a list,
    one entry per preparation (`options` and `preprocessor` first), see `prepare_all`.
    """

    def __init__(self, workers: int, mode: str, options: DecodeOptions, preprocessor: Preprocessor,
                 timeout: float | None = None, *, more: Sequence[Preparation] = ()):
        if mode not in ("threads", "processes"):
            raise ValueError(f"mode must be 'threads' or 'processes', got {mode!r}")
        self.workers = max(1, int(workers))
        self.mode = mode
        self.options = options
        self.preprocessor = preprocessor
        self._task = _Task(((options, preprocessor), *more))
        self.timeout = timeout
        self._lock = threading.Lock()
        self._closed = False
        #: Decode processes that died and were replaced.
        self.restarts = 0
        self._children: list[_Child] = []
        self._threads: ThreadPoolExecutor | None = None
        if mode == "threads":
            self.chunk = 1
            self._threads = ThreadPoolExecutor(self.workers, thread_name_prefix="decode")
        else:
            self.chunk = PROCESS_CHUNK
            self._children = [self._spawn() for _ in range(self.workers)]

    @property
    def pids(self) -> list[int]:
        """Process ids of the decode processes (empty for threads)."""
        with self._lock:
            return [c.proc.pid for c in self._children]

    def _spawn(self) -> _Child:
        return _Child(self._task, self.timeout or 0.0, self._child_exited)

    def _child_exited(self, child: _Child) -> None:
        """A decode process ended: replace it (unless the pool is closing)."""
        with self._lock:
            if self._closed or child not in self._children:
                return
            self._children[self._children.index(child)] = self._spawn()
            self.restarts += 1

    def submit(self, items: list[tuple[str, bytes]]) -> Future:
        """Start preparing `items`; `result(future, items)` gives one entry per item, in order."""
        if self._threads is not None:
            return self._threads.submit(self._run_here, items)
        while True:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the decode pool is closed")
                alive = [c for c in self._children if c.alive]
            # The least loaded live process; when a process has just died its replacement is
            # being started: wait for it.
            future = min(alive, key=lambda c: c.load).submit(items) if alive else None
            if future is not None:
                return future
            time.sleep(0.01)

    def result(self, future: Future, items: list[tuple[str, bytes]]) -> list[Preprocessed | DecodeFailure]:
        """The prepared `items` of a `submit` future (waits for it): one result per item (a list of
        them, one per preparation, with `more`)."""
        try:
            return future.result()
        except DecodeProcessDied:
            pass
        out: list[Preprocessed | DecodeFailure] = []
        for item in items:
            try:
                out.extend(self._alone(item))
            except DecodeProcessDied:
                try:
                    out.extend(self._alone(item))
                except DecodeProcessDied as e:
                    # Alone in its chunk, twice, the process died: this sample did it, not chance.
                    if e.code == -signal.SIGALRM:
                        out.append(self._task.failed("timeout", f"decoding took more than {self.timeout:g} s"))
                    else:
                        out.append(self._task.failed("crashed", "the decode process died while decoding this image"))
        return out

    def _alone(self, item: tuple[str, bytes]) -> list[Preprocessed | DecodeFailure]:
        return self.submit([item]).result()

    def _run_here(self, items: list[tuple[str, bytes]]) -> list[Preprocessed | DecodeFailure]:
        return [self._task(data, key) for key, data in items]

    def warm_up(self) -> None:
        """Wait until every decode process is up (no-op for threads)."""
        for future in [child.submit([]) for child in list(self._children)]:
            try:
                if future is not None:
                    future.result()
            except DecodeProcessDied:
                pass  # replaced already; its successor starts on its own

    def close(self) -> None:
        """Stop the decoders: queued work is dropped, a running chunk is finished first."""
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
            return
        with self._lock:
            self._closed = True
            children = list(self._children)
        for child in children:
            child.close()
