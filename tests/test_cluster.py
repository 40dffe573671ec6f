"""cluster.py: fail-fast connection check, actor start-up and the call/retry loop on a real local Ray."""

from __future__ import annotations

import os
import socket
import time

import pytest

from pipeline.cluster import ActorPool, ActorsLost, check_reachable, run_calls, start_actors

pytestmark = pytest.mark.timeout(300)


def test_unreachable_address_fails_fast_naming_it():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=f"nothing answers at ray://127.0.0.1:{port}"):
        check_reachable(f"ray://127.0.0.1:{port}", 1.0)
    assert time.monotonic() - t0 < 10
    check_reachable("auto", 0)  # left to Ray


def test_run_calls_retries_on_actor_death_and_returns_errors(ray_local):
    # Defined here so that Ray ships the class by value (the tests folder is not on the actors' path).
    class _Echo:
        """An actor whose calls echo, raise, or kill its process."""

        def __init__(self, tag: str):
            self.tag = tag

        def call(self, what: str) -> str:
            if what == "raise":
                raise ValueError(f"bad call on {self.tag}")
            if what == "die":
                os._exit(1)
            return f"{self.tag}:{what}"

    actors = start_actors(_Echo, 2, ("x",), num_cpus=0, num_gpus=0)
    pool = ActorPool(actors, label="echo actor", per_actor=2)
    try:
        results = dict(run_calls(pool, [("call", ("a",)), ("call", ("raise",)), ("call", ("b",))]))
        assert results[("a",)] == "x:a" and results[("b",)] == "x:b"
        assert isinstance(results[("raise",)], ValueError) and "bad call on x" in str(results[("raise",)])
        # Each death takes one actor; once none is left the loop says so.
        with pytest.raises(ActorsLost, match="every echo actor died"):
            run_calls(pool, [("call", ("die",))])
        assert pool.all_dead
    finally:
        pool.kill()
