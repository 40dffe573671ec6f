"""Ray for the stages: connect to the cluster, size and start actors, dispatch calls to them.

The encode driver and the QA stage both run their work as method calls on a set of actors:
`start_actors` creates them, an `ActorPool` sends calls to ready actors (a few in flight each),
collects what comes back and keeps track of each actor's health; `run_calls` is the simple
"run all of these and retry on actor death" loop built on it. The retry *policy* of a failed
call stays with the caller: the encode driver counts attempts per shard (`pipeline.scheduler`),
QA gives each call one try per live actor.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import ray
from ray.actor import ActorClass
from ray.exceptions import RayActorError, RayError, RayTaskError

from . import storage
from .config import JobConfig
from .console import init_ray

__all__ = [
    "ActorPool",
    "ActorSlot",
    "ActorsLost",
    "Finished",
    "check_reachable",
    "connect_ray",
    "error_text",
    "run_calls",
    "start_actors",
    "worker_resources",
]

log = logging.getLogger(__name__)

#: Probes of a restarting actor (about one a second) before it is given up.
MAX_PROBES = 300

# Terminal colour codes Ray puts into its error messages.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def connect_ray(config: JobConfig) -> bool:
    """Connect to the configured cluster (ray.address, else RAY_ADDRESS, else a new local instance).

    Returns True when this call started Ray (the caller shuts it down at the end).
    """
    if ray.is_initialized():
        return False
    address = config.ray.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_reachable(address, config.ray.connect_timeout)
    init_ray(address)
    return True


def check_reachable(address: str, timeout: float) -> None:
    """Fail fast when nothing listens at a "host:port" or "ray://host:port" address.

    Ray itself retries an unreachable address for minutes; here a TCP connection is tried until
    `timeout` seconds have passed, then ConnectionError names the address. "auto" and "local"
    are left to Ray.
    """
    target = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    host = host.strip("[]")
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=min(5.0, max(0.5, timeout))).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConnectionError(f"nothing answers at {address} (tried for {timeout:g} s: {e})") from None
            time.sleep(0.5)


def worker_resources(config: JobConfig) -> tuple[int, float, float]:
    """(number of encode actors, GPUs per actor, CPUs per actor) for the connected cluster."""
    resources = ray.cluster_resources()
    gpus = float(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 1))
    r = config.ray
    per_gpu = r.num_gpus_per_worker if r.num_gpus_per_worker is not None else (1.0 if gpus > 0 else 0.0)
    per_cpu = r.num_cpus_per_worker
    if r.workers:
        n = r.workers
    elif per_gpu > 0:
        n = max(1, int(gpus // per_gpu))
    else:
        n = max(1, int(cpus // per_cpu) if per_cpu > 0 else int(cpus))
    if per_gpu > 0 and gpus == 0:
        log.warning("ray.num_gpus_per_worker=%s but the cluster has no GPUs (yet): actors wait for them", per_gpu)
    return n, per_gpu, per_cpu


def start_actors(
    actor_cls: Any,
    count: int,
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
    *,
    num_cpus: float,
    num_gpus: float,
    env: dict[str, str] | None = None,
    **options: Any,
) -> list[Any]:
    """Start `count` actors of `actor_cls` (a plain class or a `ray.remote` one) with `args`/`kwargs`.

    `env` is set in the actors' processes (the driver's environment does not reach actors on
    other machines); further `options` are Ray actor options (max_restarts, max_concurrency, ...).
    """
    remote_cls = actor_cls if isinstance(actor_cls, ActorClass) else ray.remote(actor_cls)
    opts: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, **options}
    if env:
        opts["runtime_env"] = {"env_vars": dict(env)}
    return [remote_cls.options(**opts).remote(*args, **(kwargs or {})) for _ in range(count)]


def error_text(e: BaseException) -> str:
    """One line for a failed call: the task's own exception, or how its actor died (credentials masked)."""
    if isinstance(e, RayTaskError):
        cause = e.cause if e.cause is not None else e
        text = f"{type(cause).__name__}: {cause}" if cause is not e else str(e).strip().splitlines()[-1]
    elif isinstance(e, RayActorError) and e.actor_init_failed:
        # Ray keeps the constructor's exception only as text: the traceback, its last line the
        # exception itself ("latentae.checkpoint.CheckpointError: checkpoint not found: ...").
        lines = [ln.strip() for ln in _ANSI.sub("", str(e)).splitlines() if ln.strip()]
        cause = re.sub(r"^(?:\w+\.)+(?=\w+: )", "", lines[-1]) if lines else "unknown error"
        text = cause
    elif isinstance(e, RayActorError):
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        text = f"worker process died ({type(e).__name__}): {first}"
    else:
        text = f"{type(e).__name__}: {e}"
    return storage.redact(text)[:2000]


class ActorsLost(RuntimeError):
    """Every actor of a pool is dead; `last_error` is the error that killed the last one."""

    def __init__(self, message: str, last_error: BaseException | None = None):
        super().__init__(message)
        self.last_error = last_error


@dataclass
class ActorSlot:
    """One actor as its pool sees it.

    state: "starting" (its first probe has not answered), "ready", "restarting" (its process
    died and Ray is restarting it: calls sent now would fail at once, so none are sent until a
    probe answers), "dead" (its constructor raised, Ray gave up on it, or it was refused).
    """

    actor: Any
    index: int
    state: str = "ready"
    in_flight: int = 0
    probe_ref: Any = None
    probe_at: float = 0.0
    probe_failures: int = 0


@dataclass
class Finished:
    """A call that came back: the caller's `item`, and its result or the Ray error it raised."""

    item: Any
    slot: ActorSlot
    result: Any = None
    error: RayError | None = None

    @property
    def actor_died(self) -> bool:
        """The call failed because its actor's process died (not because the method raised)."""
        return isinstance(self.error, RayActorError)


class ActorPool:
    """Actors of one kind, the calls in flight on them, and the health of each.

    Calls go to ready actors, at most `per_actor` at a time each, to the least busy first. An
    actor whose process dies is dead for good, unless the pool is `restartable` (its actors
    were started with max_restarts=-1): then it is "restarting" and probed with the method
    `probe` (no arguments) about once a second until it answers, Ray reports that it cannot
    come back, or `MAX_PROBES` probes have failed. With a `probe`, actors start "starting" and
    take calls once their first probe answers and `accept` (when set) raises no objection to
    the answer; `label` names the actors in log lines and errors ("encode worker").
    """

    def __init__(
        self,
        actors: list[Any],
        *,
        label: str,
        per_actor: int,
        probe: str | None = None,
        restartable: bool = False,
    ):
        self.label = label
        self.per_actor = per_actor
        self.restartable = restartable
        self._probe = probe
        #: Checks a probe's answer: None to accept the actor, else why it is refused.
        self.accept: Callable[[Any], str | None] | None = None
        self.slots = [ActorSlot(actor, i, state="starting" if probe else "ready") for i, actor in enumerate(actors)]
        self._calls: dict[Any, tuple[Any, ActorSlot]] = {}
        for slot in self.slots:
            if probe:
                self._send_probe(slot)

    # -- state ------------------------------------------------------------------------------------

    @property
    def busy(self) -> int:
        """Calls in flight."""
        return len(self._calls)

    @property
    def all_dead(self) -> bool:
        return all(slot.state == "dead" for slot in self.slots)

    def running(self) -> list[tuple[Any, ActorSlot]]:
        """(item, slot) of every call in flight."""
        return list(self._calls.values())

    def free_slot(self) -> ActorSlot | None:
        """The ready actor with the fewest calls in flight (below `per_actor`), if any."""
        free = [s for s in self.slots if s.state == "ready" and s.in_flight < self.per_actor]
        return min(free, key=lambda s: (s.in_flight, s.index)) if free else None

    # -- calls ------------------------------------------------------------------------------------

    def submit(self, slot: ActorSlot, method: str, args: tuple, item: Any) -> None:
        """Call `method(*args)` on the slot's actor; `item` comes back with its `Finished`."""
        self._calls[getattr(slot.actor, method).remote(*args)] = (item, slot)
        slot.in_flight += 1

    def wait(self, timeout: float | None) -> list[Finished]:
        """Wait up to `timeout` s for calls (and probes) to come back; return the finished calls.

        Probes are handled here; an actor whose call failed because its process died is marked
        restarting or dead before the call is returned.
        """
        now = time.monotonic()
        for slot in self.slots:
            if slot.state == "restarting" and slot.probe_ref is None and now >= slot.probe_at:
                self._send_probe(slot)
        refs = list(self._calls) + [s.probe_ref for s in self.slots if s.probe_ref is not None]
        if not refs:
            # Only actors waiting for their next probe: nothing to wait on yet.
            time.sleep(min(timeout if timeout is not None else 0.1, 0.1))
            return []
        ray.wait(refs, num_returns=1, timeout=timeout)
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        finished = []
        for ref in done:
            if ref in self._calls:
                item, slot = self._calls.pop(ref)
                slot.in_flight -= 1
                try:
                    finished.append(Finished(item, slot, result=ray.get(ref)))
                except RayError as e:
                    if isinstance(e, RayActorError):
                        self._on_death(slot, e)
                    finished.append(Finished(item, slot, error=e))
            else:
                self._on_probe(ref)
        return finished

    def first_answer(self) -> Any:
        """Start-up: wait for the first actor whose probe answers and return its answer.

        Actors whose constructor fails are marked dead; when none starts, RuntimeError names the
        first failure. The other actors' probes are handled later, by `wait`.
        """
        waiting = {s.probe_ref: s for s in self.slots if s.probe_ref is not None}
        last_log = time.monotonic()
        errors: list[str] = []
        while waiting:
            done, _ = ray.wait(list(waiting), num_returns=1, timeout=1.0)
            if not done:
                if time.monotonic() - last_log > 30:
                    log.info("waiting for %ss to start (%d pending)", self.label, len(waiting))
                    last_log = time.monotonic()
                continue
            slot = waiting.pop(done[0])
            slot.probe_ref = None
            try:
                answer = ray.get(done[0])
            except RayError as e:
                slot.state = "dead"
                errors.append(error_text(e))
                log.error("%s %d failed to start: %s", self.label, slot.index, errors[-1])
                continue
            slot.state = "ready"
            return answer
        raise RuntimeError(f"no {self.label} could start: " + (errors[0] if errors else "unknown error"))

    def kill(self) -> None:
        """End every actor (no restart)."""
        for slot in self.slots:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:  # an actor that is already gone
                pass

    # -- health -----------------------------------------------------------------------------------

    def _send_probe(self, slot: ActorSlot) -> None:
        slot.probe_ref = getattr(slot.actor, self._probe).remote()

    def _on_death(self, slot: ActorSlot, e: RayActorError) -> None:
        if not self.restartable or e.actor_init_failed:
            slot.state = "dead"  # its constructor raised (Ray does not restart it), or no restarts
        elif slot.state != "dead":
            slot.state = "restarting"
            slot.probe_at = time.monotonic()

    def _on_probe(self, ref: Any) -> None:
        slot = next(s for s in self.slots if s.probe_ref == ref)
        slot.probe_ref = None
        try:
            answer = ray.get(ref)
        except RayActorError as e:
            # Still restarting (or the death not yet registered): ask again shortly, but not forever.
            slot.probe_failures += 1
            if e.actor_init_failed or slot.probe_failures > MAX_PROBES:
                slot.state = "dead"
                log.error("%s %d is gone: %s", self.label, slot.index, error_text(e))
            else:
                slot.probe_at = time.monotonic() + 1.0
            return
        except RayError as e:
            slot.state = "dead"
            log.error("%s %d is gone: %s", self.label, slot.index, error_text(e))
            return
        refused = self.accept(answer) if self.accept is not None else None
        if refused:
            slot.state = "dead"
            log.error("%s %d %s", self.label, slot.index, refused)
            ray.kill(slot.actor, no_restart=True)
            return
        if slot.state == "restarting":
            log.info("%s %d is back", self.label, slot.index)
        slot.state = "ready"
        slot.probe_failures = 0


def run_calls(pool: ActorPool, calls: Iterable[tuple[str, tuple]]) -> list[tuple[tuple, Any]]:
    """Run (method, args) calls on the pool's actors; return (args, result or error) as they finish.

    A call whose actor died goes to another actor; a call that raised comes back with its error
    (the other calls still count). Raises `ActorsLost` when every actor has died.
    """
    queue = deque(calls)
    out: list[tuple[tuple, Any]] = []
    while queue or pool.busy:
        while queue and (slot := pool.free_slot()) is not None:
            method, args = queue.popleft()
            pool.submit(slot, method, args, (method, args))
        for call in pool.wait(None):
            method, args = call.item
            if call.actor_died:
                if pool.all_dead:
                    raise ActorsLost(f"every {pool.label} died; last error: {call.error}", call.error)
                queue.append((method, args))
            else:
                out.append((args, call.error if call.error is not None else call.result))
    return out
