"""Feed a ShardWriter from its own thread, so encoding goes on while a row group is written."""

from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .writer import ShardWriter

__all__ = ["WriterThread"]


class WriterThread:
    """Feeds a ShardWriter from a bounded queue in its own thread (the writer is single-threaded).

    Items are `("rows", [LatentRow, ...])` or `("error", ErrorRow)`. Time the producer spends
    blocked on a full queue is added to `clock["write_wait"]`. The first write error stops the
    writing; `put` and `close` re-raise it.
    """

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
        """Queue one item, waiting while the queue is full; re-raise an earlier write error."""
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
        """Stop writing: what is still queued is dropped, and the thread is joined."""
        self._stop.set()
        try:
            self.queue.put(None, timeout=5)
        except queue.Full:
            pass
        self.thread.join(timeout=30)
