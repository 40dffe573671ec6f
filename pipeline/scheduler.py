"""Which shard an encode actor gets next, and what a failed attempt becomes.

Plain bookkeeping, no Ray: the driver asks for the next shard whenever an actor has room
(`pipeline.cluster.ActorPool.free_slot`) and reports each failed attempt. A failed shard goes to
the back of the queue, so the other shards go on meanwhile, until it has failed `max_attempts`
times or with an error that no retry can fix; then it is given up and recorded as failed.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass

from .plan import ShardTask

__all__ = ["Attempt", "Scheduler"]


@dataclass(frozen=True)
class Attempt:
    """The verdict on a failed attempt: how many attempts the shard has had, and whether it runs again."""

    number: int
    retry: bool


class Scheduler:
    """The queue of shards still to encode and the attempts each has had."""

    def __init__(self, todo: Iterable[ShardTask], max_attempts: int):
        self.max_attempts = max_attempts
        self._pending: deque[ShardTask] = deque(todo)
        self._attempts: Counter[str] = Counter()

    @property
    def pending(self) -> int:
        """Shards waiting for an actor (retries included)."""
        return len(self._pending)

    def next(self) -> ShardTask:
        """The shard to hand out now (the caller checks `pending` first)."""
        return self._pending.popleft()

    def failed(self, task: ShardTask, *, permanent: bool) -> Attempt:
        """Count a failed attempt of `task`; queue it again unless it is used up or `permanent`."""
        self._attempts[task.name] += 1
        number = self._attempts[task.name]
        retry = not permanent and number < self.max_attempts
        if retry:
            self._pending.append(task)
        return Attempt(number, retry)
