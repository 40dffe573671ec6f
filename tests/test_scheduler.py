"""scheduler.py: the shard queue and the attempts each shard has had (no Ray needed)."""

from __future__ import annotations

from pipeline.plan import ShardTask
from pipeline.scheduler import Attempt, Scheduler


def test_retries_go_to_the_back_until_attempts_run_out():
    a, b = ShardTask("in/a.tar", "a"), ShardTask("in/b.tar", "b")
    s = Scheduler([a, b], max_attempts=2)
    assert s.pending == 2 and s.next() == a
    assert s.failed(a, permanent=False) == Attempt(1, retry=True)
    assert [s.next(), s.next()] == [b, a]  # the failed shard waits behind the others
    assert s.failed(a, permanent=False) == Attempt(2, retry=False)  # used up: given up
    assert s.pending == 0


def test_permanent_errors_are_not_retried():
    a = ShardTask("in/missing.tar", "missing")
    s = Scheduler([a], max_attempts=5)
    s.next()
    assert s.failed(a, permanent=True) == Attempt(1, retry=False) and s.pending == 0
