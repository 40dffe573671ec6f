"""The encode driver: plan, start encode actors, schedule shards, retry, report.

The driver never touches image bytes. It expands the inputs, starts one `EncodeActor` per
worker (each holds an `EncodeWorker`: one encoder on one device), checks or writes the output
manifest, and hands shards to free actors, at most `ray.max_in_flight_per_worker` at a time
per actor (encoded concurrently), so a slow shard holds up only its own actor. When an actor process dies, Ray
restarts it and its shards go back to the queue; a shard that fails `ray.max_attempts` times is
recorded as failed with its last error and the others go on. Progress is shown as a bar on a
terminal or as log lines, Ray metrics count images, bad samples and shards, and the run ends
with a summary printed and written to OUTPUT/summary.json. Exit code 0 means every shard of the
job is committed; a rerun of the same command redoes only what is not.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, TextIO

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from . import storage
from .config import ConfigError, JobConfig
from .decodepool import FAULT_CRASH_KEY, FAULT_HANG_KEY
from .layout import summary_url
from .manifest import Manifest, ManifestMismatch, check_or_write_manifest
from .plan import Plan, ShardTask, expand_urls, make_plan
from .progress import Progress, ProgressState, format_duration
from .worker import FAULT_KILL_AFTER, FAULT_MARKER, STAGES, EncodeWorker, ShardResult, check_sizes

__all__ = ["EncodeSummary", "FailedShard", "EncodeActor", "connect_ray", "run_encode", "worker_resources"]

log = logging.getLogger(__name__)

# Probes of a restarting actor (about one a second) before it is given up.
_MAX_PROBES = 300
# Errors that no retry can fix: fail the shard at once instead of burning attempts.
_PERMANENT = (FileNotFoundError, ConfigError, ManifestMismatch)


@dataclass
class FailedShard:
    """A shard that did not commit, with its last error."""

    name: str
    url: str
    attempts: int
    error: str


_STAGE_NAMES = {"decode_wait": "waiting for decoded images", "encode": "encoding", "write_wait": "waiting for the writer",
                "commit": "committing", "other": "reading and batching"}


@dataclass
class EncodeSummary:
    """The outcome of one `encode` run (also written to OUTPUT/summary.json)."""

    output: str
    status: str = "ok"  # ok | failed | interrupted
    shards_total: int = 0
    shards_skipped: int = 0
    shards_committed: int = 0
    failed: list[FailedShard] = field(default_factory=list)
    images: int = 0
    errors: int = 0
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    workers: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    started: str = ""
    finished: str = ""
    #: Seconds the committed shards took, summed over shards, and how they split (`STAGES`).
    shard_seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    #: Images per encoder call the workers used (`ray.batch_size`, "auto" resolved).
    batch_sizes: list[int] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0 when every shard is committed, 130 when interrupted, 1 otherwise."""
        if self.status == "interrupted":
            return 130
        if self.failed or self.shards_skipped + self.shards_committed < self.shards_total:
            return 1
        return 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shards_failed"] = len(self.failed)
        d["exit_code"] = self.exit_code
        return d

    def stage_breakdown(self) -> dict[str, float]:
        """Shares of the shards' time: each of `STAGES`, then "other" (reading, batching, rows)."""
        if self.shard_seconds <= 0:
            return {}
        shares = {k: self.stage_seconds.get(k, 0.0) / self.shard_seconds for k in STAGES}
        shares["other"] = max(0.0, 1.0 - sum(shares.values()))
        return shares

    def bottleneck(self) -> str:
        """A one-line reading of `stage_breakdown`: which stage held the workers back."""
        shares = self.stage_breakdown()
        if not shares:
            return ""
        if shares["decode_wait"] >= 0.25:
            return ("bottleneck: decoding (the encoder waited for images): give workers more CPUs "
                    "(ray.num_cpus_per_worker) or, on GPUs, decode processes (ray.decode_mode)")
        if shares["write_wait"] + shares["commit"] >= 0.25:
            return "bottleneck: writing and uploading (the encoder waited for the writer): check the output storage"
        if shares["encode"] >= 0.6:
            return "bottleneck: the encoder (the device was busy): this is the pipeline's limit"
        return ""

    def render(self) -> str:
        lines = [f"Encode summary for {self.output}: {self.status.upper()}"]
        lines.append(
            f"  shards: {self.shards_total} total, {self.shards_committed} committed now, "
            f"{self.shards_skipped} already committed, {len(self.failed)} failed"
        )
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.errors_by_reason.items(), key=lambda kv: -kv[1]))
        lines.append(f"  images: {self.images:,} encoded, {self.errors:,} bad samples" + (f" ({reasons})" if reasons else ""))
        lines.append(
            f"  time: {format_duration(self.seconds)}, {self.images_per_second:.1f} images/s on {self.workers} "
            f"worker(s), {self.retries} retr{'y' if self.retries == 1 else 'ies'}"
            + (f", batch {'/'.join(map(str, self.batch_sizes))}" if self.batch_sizes else "")
        )
        stages = self.stage_breakdown()
        if stages:
            lines.append("  shard time: " + ", ".join(f"{_STAGE_NAMES[k]} {v:.0%}" for k, v in stages.items() if v >= 0.005))
            hint = self.bottleneck()
            if hint:
                lines.append(f"  {hint}")
        if self.failed:
            lines.append("  failed shards:")
            for f in self.failed:
                lines.append(f"    {f.name} ({f.url}) after {f.attempts} attempt(s): {f.error}")
            lines.append("  rerun the same command to retry them; committed shards are kept")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Ray


def connect_ray(config: JobConfig) -> bool:
    """Connect to the configured cluster (ray.address, else RAY_ADDRESS, else a new local instance).

    Returns True when this call started Ray (the caller shuts it down at the end).
    """
    if ray.is_initialized():
        return False
    address = config.ray.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_reachable(address, config.ray.connect_timeout)
    ray.init(address=address)
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


@ray.remote(concurrency_groups={"status": 1})
class EncodeActor:
    """A Ray actor around `EncodeWorker` (one encoder on this actor's device)."""

    def __init__(self, config: JobConfig, device: str, log_level: int = logging.INFO):
        logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
        self.worker = EncodeWorker(config, device=device, set_threads=True)
        from ray.util.metrics import Counter as MetricCounter

        self._images = MetricCounter("latent_encode_images", "Images encoded and written")
        self._errors = MetricCounter("latent_encode_bad_samples", "Samples written to the error ledger", ("reason",))

    def manifest(self) -> dict[str, Any]:
        """The manifest this worker writes under (model fingerprint, shapes, ...)."""
        return self.worker.manifest.to_dict()

    def process_shard(self, url: str, name: str, num_shards: int) -> ShardResult:
        result = self.worker.process_shard(url, name, num_shards=num_shards)
        if result.rows:
            self._images.inc(result.rows)
        for reason, count in result.errors_by_reason.items():
            self._errors.inc(count, tags={"reason": reason})
        return result

    @ray.method(concurrency_group="status")
    def progress(self) -> dict[str, int]:
        """Shards being encoded -> images of each encoded so far; answers while shards run."""
        return dict(self.worker.running)


def worker_resources(config: JobConfig) -> tuple[int, float, float]:
    """(number of actors, GPUs per actor, CPUs per actor) for the connected cluster."""
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


def _fault_env() -> dict[str, str]:
    # The test-only fault hook must reach the actors also on a cluster (env of the driver only).
    return {k: os.environ[k] for k in (FAULT_KILL_AFTER, FAULT_MARKER, FAULT_CRASH_KEY, FAULT_HANG_KEY) if k in os.environ}


def _error_text(e: BaseException) -> str:
    if isinstance(e, RayTaskError):
        cause = e.cause if e.cause is not None else e
        text = f"{type(cause).__name__}: {cause}" if cause is not e else str(e).strip().splitlines()[-1]
    elif isinstance(e, RayActorError):
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        text = f"worker process died ({type(e).__name__}): {first}"
    else:
        text = f"{type(e).__name__}: {e}"
    return storage.redact(text)[:2000]


def _is_permanent(e: BaseException) -> bool:
    cause = e.cause if isinstance(e, RayTaskError) else e
    return isinstance(cause, _PERMANENT)


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class _Slot:
    """One encode actor as the driver sees it.

    state: "starting" (constructor running), "ready", "restarting" (its process died; Ray is
    restarting it: tasks sent now would fail at once, so none are sent until a probe answers),
    "dead" (its constructor raised, or Ray gave up on it).
    """

    actor: Any
    index: int
    state: str = "starting"
    probe_ref: Any = None
    probe_at: float = 0.0
    probe_failures: int = 0
    in_flight: int = 0

    def probe(self) -> None:
        self.probe_ref = self.actor.manifest.remote()


class _Driver:
    def __init__(self, config: JobConfig, stream: TextIO | None = None):
        self.config = config
        self.root = config.output.path
        self.so = config.output.storage_options
        self.summary = EncodeSummary(output=storage.redact(self.root), started=_now(), config=config.to_dict())
        self.progress = Progress(stream)
        self.state = ProgressState(shards_total=0)
        self.slots: list[_Slot] = []
        self.shards_per_actor = 1
        self.in_flight: dict[Any, tuple[ShardTask, _Slot]] = {}
        self.partial: dict[int, int] = {}
        self._progress_refs: dict[Any, _Slot] = {}
        self._last_poll = 0.0
        self._shard_metric: Any = None

    # -- setup ----------------------------------------------------------------------------

    def _precheck(self) -> list[str]:
        urls = expand_urls(self.config.input.urls, self.config.input.storage_options)
        m = self.config.model
        if m.preset and not m.weights:
            try:
                from latentae import get_preset
            except ImportError:
                get_preset = None
            if get_preset is not None:
                check_sizes(self.config, int(get_preset(m.preset).downsample_factor))
        return urls

    def _start_actors(self, count: int, gpus: float, cpus: float) -> None:
        device = "cuda" if gpus > 0 else "cpu"
        # An actor runs its in-flight shards concurrently (threads sharing its decode pool and device).
        self.shards_per_actor = self.config.ray.shards_in_flight(gpu=gpus > 0)
        options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus, "max_restarts": -1, "max_task_retries": 0,
                                   "max_concurrency": self.shards_per_actor}
        env = _fault_env()
        if env:
            options["runtime_env"] = {"env_vars": env}
        for i in range(count):
            # Actors log at the driver's level (`-q` quiets them too).
            level = logging.getLogger("pipeline").getEffectiveLevel()
            actor = EncodeActor.options(**options).remote(self.config, device, level)
            slot = _Slot(actor=actor, index=i)
            slot.probe()
            self.slots.append(slot)
        log.info("starting %d encode worker(s) (%s GPU, %s CPU each, device %s)", count, gpus, cpus, device)

    def _manifest_from_first_actor(self) -> Manifest:
        """Wait for the first actor that loads its model; its manifest is the run's."""
        waiting = {s.probe_ref: s for s in self.slots}
        last_log = time.monotonic()
        errors: list[str] = []
        while waiting:
            done, _ = ray.wait(list(waiting), num_returns=1, timeout=1.0)
            if not done:
                if time.monotonic() - last_log > 30:
                    log.info("waiting for encode workers to start (%d pending)", len(waiting))
                    last_log = time.monotonic()
                continue
            slot = waiting.pop(done[0])
            slot.probe_ref = None
            try:
                manifest = Manifest.from_dict(ray.get(done[0]))
            except RayError as e:
                slot.state = "dead"
                errors.append(_error_text(e))
                log.error("encode worker %d failed to start: %s", slot.index, errors[-1])
                continue
            slot.state = "ready"
            return manifest
        raise RuntimeError("no encode worker could start: " + (errors[0] if errors else "unknown error"))

    # -- scheduling -----------------------------------------------------------------------

    def run(self) -> EncodeSummary:
        start = time.monotonic()
        urls = self._precheck()
        out = self.config.output
        pre_plan = make_plan(urls, self.root, self.config.input.storage_options, self.so)
        todo_estimate = len(pre_plan.shards) if out.overwrite else len(pre_plan.todo)
        # Ray starts only once the inputs and OUTPUT are known to be usable.
        connect_ray(self.config)
        from ray.util.metrics import Counter as MetricCounter

        self._shard_metric = MetricCounter("latent_encode_shards", "Shards finished by the encode driver", ("status",))
        count, gpus, cpus = worker_resources(self.config)
        count = max(1, min(count, todo_estimate))
        self.summary.workers = count
        try:
            self._start_actors(count, gpus, cpus)
            manifest = self._manifest_from_first_actor()
            check_or_write_manifest(self.root, manifest, self.so, overwrite=out.overwrite)
            # overwrite=true may just have dropped old commits: plan again against the output.
            plan = make_plan(urls, self.root, self.config.input.storage_options, self.so) if out.overwrite else pre_plan
            self._fingerprint = manifest.fingerprint()
            self._schedule(plan)
        except KeyboardInterrupt:
            self.summary.status = "interrupted"
            self.progress.message("interrupted: stopping workers; committed shards are kept, rerun to resume")
        finally:
            for slot in self.slots:
                try:
                    ray.kill(slot.actor, no_restart=True)
                except Exception:  # an actor that is already gone
                    pass
        self.summary.seconds = time.monotonic() - start
        self.summary.images_per_second = self.summary.images / self.summary.seconds if self.summary.seconds else 0.0
        self.summary.finished = _now()
        if self.summary.status != "interrupted" and self.summary.exit_code != 0:
            self.summary.status = "failed"
        return self.summary

    def _schedule(self, plan: Plan) -> None:
        s = self.summary
        s.shards_total = len(plan.shards)
        s.shards_skipped = len(plan.done)
        self.state = ProgressState(shards_total=s.shards_total, shards_skipped=s.shards_skipped)
        if plan.done:
            log.info("%d of %d shards already committed; %d to do", len(plan.done), len(plan.shards), len(plan.todo))
        pending: deque[ShardTask] = deque(plan.todo)
        attempts: Counter[str] = Counter()
        num_shards = len(plan.shards)
        reasons: Counter[str] = Counter()

        while pending or self.in_flight:
            if all(sl.state == "dead" for sl in self.slots):
                raise RuntimeError("every encode worker failed to start or died for good; see the log above")
            now = time.monotonic()
            for sl in self.slots:
                if sl.state == "restarting" and sl.probe_ref is None and now >= sl.probe_at:
                    sl.probe()
            self._fill(pending, num_shards)
            refs = list(self.in_flight) + [sl.probe_ref for sl in self.slots if sl.probe_ref is not None]
            if refs:
                ray.wait(refs, num_returns=1, timeout=0.5)
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            else:
                done = []
            for ref in done:
                if ref in self.in_flight:
                    task, slot = self.in_flight.pop(ref)
                    slot.in_flight -= 1
                    self._finish(ref, task, slot, pending, attempts, reasons)
                else:
                    self._on_probe(ref)
            self._poll_progress()
            self.state.shards_running = len(self.in_flight)
            self.state.images = s.images + sum(self.partial.values())
            self.progress.update(self.state)
        s.errors_by_reason = dict(reasons)
        self.state.shards_running = 0
        self.state.images = s.images
        self.progress.close(self.state)

    def _fill(self, pending: deque[ShardTask], num_shards: int) -> None:
        limit = self.shards_per_actor
        # One shard per free slot per round, so work spreads over actors before any gets a second.
        while pending:
            free = [sl for sl in self.slots if sl.state == "ready" and sl.in_flight < limit]
            if not free:
                return
            slot = min(free, key=lambda sl: (sl.in_flight, sl.index))
            task = pending.popleft()
            ref = slot.actor.process_shard.remote(task.url, task.name, num_shards)
            self.in_flight[ref] = (task, slot)
            slot.in_flight += 1

    def _on_probe(self, ref: Any) -> None:
        slot = next(sl for sl in self.slots if sl.probe_ref == ref)
        slot.probe_ref = None
        try:
            manifest = Manifest.from_dict(ray.get(ref))
        except RayActorError as e:
            # Still restarting (or the death not yet registered): ask again shortly, but not forever.
            slot.probe_failures += 1
            if e.actor_init_failed or slot.probe_failures > _MAX_PROBES:
                slot.state = "dead"
                log.error("encode worker %d is gone: %s", slot.index, _error_text(e))
            else:
                slot.probe_at = time.monotonic() + 1.0
            return
        except RayError as e:
            slot.state = "dead"
            log.error("encode worker %d is gone: %s", slot.index, _error_text(e))
            return
        if manifest.fingerprint() != self._fingerprint:
            # e.g. different weights files on different nodes: its latents would not match.
            slot.state = "dead"
            log.error("encode worker %d loaded a different model or config; not used", slot.index)
            ray.kill(slot.actor, no_restart=True)
            return
        if slot.state == "restarting":
            log.info("encode worker %d is back", slot.index)
        slot.state = "ready"
        slot.probe_failures = 0

    def _finish(
        self,
        ref: Any,
        task: ShardTask,
        slot: _Slot,
        pending: deque[ShardTask],
        attempts: Counter[str],
        reasons: Counter[str],
    ) -> None:
        s = self.summary
        self.partial[slot.index] = 0
        attempts[task.name] += 1
        try:
            result: ShardResult = ray.get(ref)
        except RayError as e:
            error = _error_text(e)
            permanent = _is_permanent(e)
            if isinstance(e, RayActorError):
                if e.actor_init_failed:
                    slot.state = "dead"  # its constructor raised: Ray does not restart it
                elif slot.state != "dead":
                    slot.state = "restarting"
                    slot.probe_at = time.monotonic()
            if permanent or attempts[task.name] >= self.config.ray.max_attempts:
                s.failed.append(FailedShard(task.name, storage.redact(task.url), attempts[task.name], error))
                self.state.shards_failed += 1
                self._shard_metric.inc(tags={"status": "failed"})
                self.progress.message(f"shard {task.name} FAILED after {attempts[task.name]} attempt(s): {error}")
            else:
                s.retries += 1
                self.state.retries += 1
                self._shard_metric.inc(tags={"status": "retried"})
                pending.append(task)
                self.progress.message(f"shard {task.name} attempt {attempts[task.name]} failed, will retry: {error}")
            return
        s.shards_committed += 1
        s.images += result.rows
        s.errors += result.errors
        s.shard_seconds += result.seconds
        if result.batch_size and result.batch_size not in s.batch_sizes:
            s.batch_sizes = sorted([*s.batch_sizes, result.batch_size])
        for stage, secs in result.stage_seconds.items():
            s.stage_seconds[stage] = s.stage_seconds.get(stage, 0.0) + secs
        reasons.update(result.errors_by_reason)
        self.state.shards_committed += 1
        self.state.errors += result.errors
        self._shard_metric.inc(tags={"status": "committed"})
        self.progress.message(
            f"shard {task.name} committed: {result.rows} rows, {result.errors} bad samples ({result.seconds:.1f}s)"
        )

    def _poll_progress(self) -> None:
        if self._progress_refs:
            done, _ = ray.wait(list(self._progress_refs), num_returns=len(self._progress_refs), timeout=0)
            for ref in done:
                slot = self._progress_refs.pop(ref)
                try:
                    answer: dict[str, int] = ray.get(ref)
                except RayError:
                    answer = {}
                # A late answer about a shard that has finished meanwhile is already in s.images.
                running = {task.name for task, sl in self.in_flight.values() if sl is slot}
                self.partial[slot.index] = sum(n for shard, n in answer.items() if shard in running)
        now = time.monotonic()
        if now - self._last_poll < 1.0:
            return
        self._last_poll = now
        busy = {sl.index for _, sl in self.in_flight.values()}
        for sl in self.slots:
            if sl.index not in busy:
                self.partial[sl.index] = 0
            elif sl not in self._progress_refs.values():
                self._progress_refs[sl.actor.progress.remote()] = sl


def run_encode(config: JobConfig, stream: TextIO | None = None) -> EncodeSummary:
    """Run the encode stage of `config` on the connected Ray cluster (see `connect_ray`).

    Writes OUTPUT/summary.json and returns the summary; `summary.exit_code` is the process
    exit code. Raises `ConfigError`, `PlanError` or `ManifestMismatch` before any work when the
    job cannot start.
    """
    driver = _Driver(config, stream)
    summary = driver.run()
    try:
        storage.put_bytes(
            summary_url(config.output.path),
            (json.dumps(summary.to_dict(), indent=2, sort_keys=True) + "\n").encode(),
            config.output.storage_options,
        )
    except OSError as e:
        log.error("could not write the run summary: %s", e)
    return summary
