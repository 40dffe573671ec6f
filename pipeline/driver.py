"""The encode driver: plan, start encode actors, schedule shards, retry, report.

The driver never touches image bytes. It expands the inputs, starts one `EncodeActor` per
worker (each holds an `EncodeWorker`: one encoder on one device), checks or writes the output
manifest, and hands shards to free actors, at most `ray.max_in_flight_per_worker` at a time
per actor (encoded concurrently), so a slow shard holds up only its own actor. When an actor
process dies, Ray restarts it and its shards go back to the queue; a shard that fails
`ray.max_attempts` times is recorded as failed with its last error and the others go on.
Progress is shown as a bar on a terminal or as log lines, Ray metrics count images, bad samples
and shards, and the run ends with a summary printed and written to OUTPUT/summary.json. Exit
code 0 means every shard of the job is committed; a rerun of the same command redoes only what
is not.

The parts: `pipeline.cluster` (Ray connection, actor pool), `pipeline.scheduler` (the shard
queue and attempts), `RunAccount` here (summary, progress display and metrics of finished
shards), `pipeline.summary` (the summary document).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from typing import Any, TextIO

import ray
from ray.exceptions import RayError, RayTaskError
from ray.util.metrics import Counter as MetricCounter

from latentae import get_preset

from . import faults, storage
from .cluster import ActorPool, Finished, connect_ray, error_text, start_actors, worker_resources
from .commit import CommitRecord
from .config import ConfigError, JobConfig
from .index import ShardIndex, WrittenCommits, refresh_index
from .jsonutil import utc_now
from .layout import index_url
from .lease import Lease, LeaseHeld
from .manifest import (
    Manifest,
    ManifestError,
    ManifestMismatch,
    build_manifest,
    check_or_write_manifest,
    check_sizes,
    read_manifest,
)
from .plan import Plan, ShardTask, committed_index, expand_urls, make_plan
from .preflight import InputError, check_files, check_job
from .progress import Progress, ProgressState
from .scheduler import Scheduler
from .summary import EncodeSummary, FailedShard, write_summary
from .worker import EncodeWorker, ShardResult

__all__ = ["EncodeActor", "EncodeMetrics", "EncodeRun", "RunAccount", "RunningImages", "fault_env", "is_permanent", "run_encode"]

log = logging.getLogger(__name__)

# Errors that no retry can fix: fail the shard at once instead of burning attempts.
_PERMANENT = (FileNotFoundError, ConfigError, ManifestMismatch)


class EncodeMetrics:
    """The Ray metrics an encode actor exports (images written, bad samples by reason)."""

    def __init__(self) -> None:
        self._images = MetricCounter("latent_encode_images", "Images encoded and written")
        self._errors = MetricCounter("latent_encode_bad_samples", "Samples written to the error ledger", ("reason",))

    def record(self, result: ShardResult) -> None:
        if result.rows:
            self._images.inc(result.rows)
        for reason, count in result.errors_by_reason.items():
            self._errors.inc(count, tags={"reason": reason})


@ray.remote(concurrency_groups={"status": 1})
class EncodeActor:
    """A Ray actor around `EncodeWorker` (one encoder on this actor's device)."""

    def __init__(self, config: JobConfig, device: str, log_level: int = logging.INFO):
        logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
        self.worker = EncodeWorker(config, device=device, set_threads=True)
        self.metrics = EncodeMetrics()

    def manifest(self) -> dict[str, Any]:
        """The manifest this worker writes under (model fingerprint, shapes, ...)."""
        return self.worker.manifest.to_dict()

    def process_shard(self, url: str, name: str, num_shards: int, qa_rows: int) -> ShardResult:
        # The plan handed the shard out as uncommitted: no old commit to delete first.
        result = self.worker.process_shard(url, name, num_shards=num_shards, qa_rows=qa_rows, fresh=True)
        self.metrics.record(result)
        return result

    @ray.method(concurrency_group="status")
    def progress(self) -> dict[str, int]:
        """Shards being encoded -> images of each encoded so far; answers while shards run."""
        return dict(self.worker.running)


def fault_env() -> dict[str, str]:
    """The environment every encode actor gets from the driver (shared with `multi_driver`)."""
    # The test-only fault hooks must reach the actors also on a cluster (env of the driver only).
    return {k: os.environ[k] for k in faults.ENV_VARS if k in os.environ}


def is_permanent(e: BaseException) -> bool:
    """Whether a shard's error is one that no retry can fix (the shard fails at once)."""
    cause = e.cause if isinstance(e, RayTaskError) else e
    return isinstance(cause, _PERMANENT)


class RunAccount:
    """What a run has done so far, kept in step: the summary, the progress display, the shard metric.

    Each finished attempt is reported once (`committed`, `retried`, `failed`) and lands in all
    three, with its line on the progress display.
    """

    def __init__(self, summary: EncodeSummary, progress: Progress):
        self.summary = summary
        self.progress = progress
        self.state = ProgressState(shards_total=0)
        self._reasons: Counter[str] = Counter()
        self._metric: Any = None

    def begin(self, plan: Plan) -> None:
        """The plan is known (Ray is up): count what is already committed."""
        s = self.summary
        s.shards_total = len(plan.shards)
        s.shards_skipped = len(plan.done)
        self.state = ProgressState(shards_total=s.shards_total, shards_skipped=s.shards_skipped)
        self._metric = MetricCounter("latent_encode_shards", "Shards finished by the encode driver", ("status",))
        if plan.done:
            log.info("%d of %d shards already committed; %d to do", len(plan.done), len(plan.shards), len(plan.todo))

    def committed(self, task: ShardTask, result: ShardResult) -> None:
        s = self.summary
        s.shards_committed += 1
        s.images += result.rows
        s.errors += result.errors
        s.shard_seconds += result.seconds
        if result.batch_size and result.batch_size not in s.batch_sizes:
            s.batch_sizes = sorted([*s.batch_sizes, result.batch_size])
        s.fp32_retries += result.fp32_retries
        s.fp32_recovered += result.fp32_recovered
        for stage, secs in result.stage_seconds.items():
            s.stage_seconds[stage] = s.stage_seconds.get(stage, 0.0) + secs
        self._reasons.update(result.errors_by_reason)
        s.errors_by_reason = dict(self._reasons)
        self.state.shards_committed += 1
        self.state.errors += result.errors
        self._metric.inc(tags={"status": "committed"})
        self.progress.message(
            f"shard {task.name} committed: {result.rows} rows, {result.errors} bad samples ({result.seconds:.1f}s)"
        )

    def retried(self, task: ShardTask, attempt: int, error: str) -> None:
        self.summary.retries += 1
        self.state.retries += 1
        self._metric.inc(tags={"status": "retried"})
        self.progress.message(f"shard {task.name} attempt {attempt} failed, will retry: {error}")

    def failed(self, task: ShardTask, attempts: int, error: str) -> None:
        self.summary.failed.append(FailedShard(task.name, storage.redact(task.url), attempts, error))
        self.state.shards_failed += 1
        self._metric.inc(tags={"status": "failed"})
        self.progress.message(f"shard {task.name} FAILED after {attempts} attempt(s): {error}")

    def show(self, running: int, partial_images: int) -> None:
        """Redraw the progress display (throttled by `Progress`)."""
        self.state.shards_running = running
        self.state.images = self.summary.images + partial_images
        self.progress.update(self.state)

    def close(self) -> None:
        """Every shard is done: the last progress line."""
        self.state.shards_running = 0
        self.state.images = self.summary.images
        self.progress.close(self.state)

    def finish(self, seconds: float) -> EncodeSummary:
        """The run is over (done, failed or interrupted): timing and final status."""
        s = self.summary
        s.seconds = seconds
        s.images_per_second = s.images / s.seconds if s.seconds else 0.0
        s.finished = utc_now()
        if s.status != "interrupted" and s.exit_code != 0:
            s.status = "failed"
        return s


class RunningImages:
    """Images encoded so far by the shards still running, asked of their actors about once a second."""

    def __init__(self) -> None:
        self.by_slot: dict[int, int] = {}
        self._refs: dict[Any, Any] = {}
        self._last_poll = 0.0

    @property
    def total(self) -> int:
        return sum(self.by_slot.values())

    def shard_done(self, slot_index: int) -> None:
        # The finished shard's images now count in the summary instead.
        self.by_slot[slot_index] = 0

    def poll(self, pool: ActorPool) -> None:
        running = pool.running()
        if self._refs:
            done, _ = ray.wait(list(self._refs), num_returns=len(self._refs), timeout=0)
            for ref in done:
                slot = self._refs.pop(ref)
                try:
                    answer: dict[str, int] = ray.get(ref)
                except RayError:
                    answer = {}
                # A late answer about a shard that has finished meanwhile is already in the summary.
                names = {task.name for task, sl in running if sl is slot}
                self.by_slot[slot.index] = sum(n for shard, n in answer.items() if shard in names)
        now = time.monotonic()
        if now - self._last_poll < 1.0:
            return
        self._last_poll = now
        busy = {sl.index for _, sl in running}
        for sl in pool.slots:
            if sl.index not in busy:
                self.by_slot[sl.index] = 0
            elif sl not in self._refs.values():
                self._refs[sl.actor.progress.remote()] = sl


class _RecordedModel:
    """The model facts an existing manifest records, standing in for a loaded model in
    `build_manifest` (a run with nothing to do never loads one)."""

    def __init__(self, manifest: Manifest):
        self.downsample_factor = manifest.downsample_factor
        self.latent_channels = manifest.latent_channels
        self.scaling_factor = manifest.scaling_factor
        self.shift_factor = manifest.shift_factor
        self._fingerprint = {k: v for k, v in manifest.model.items() if k != "compute_dtype"}

    def fingerprint(self) -> dict[str, Any]:
        return dict(self._fingerprint)


class EncodeRun:
    """One run of the encode stage: set up, schedule every shard, account for each."""

    def __init__(self, config: JobConfig, stream: TextIO | None = None, force: bool = False):
        self.config = config
        self.root = config.output.path
        self.so = config.output.storage_options
        summary = EncodeSummary(output=storage.redact(self.root), started=utc_now(), config=config.to_dict())
        self.account = RunAccount(summary, Progress(stream))
        self.pool: ActorPool | None = None
        self.force = force
        self.lease = Lease(self.root, self.so)
        # The committed shards as planned against (every column): rewritten as OUTPUT/index at the end.
        self.index: ShardIndex | None = None
        self.written = WrittenCommits()
        self.wrote_nothing = False
        self.inputs_checked = False

    def run(self) -> EncodeSummary:
        start = time.monotonic()
        urls = self._precheck()
        # One job at a time writes an OUTPUT: the lease is taken before planning, so the plan holds.
        self.lease.acquire(force=self.force)
        self.lease.start_heartbeat()
        try:
            return self._run(urls, start)
        finally:
            self._publish_index()

    def _run(self, urls: list[str], start: float) -> EncodeSummary:
        out = self.config.output
        in_so = self.config.input.storage_options
        # Resume lists _commits/ (N/1000 requests) rather than trusting a current index, so a shard
        # whose commit was deleted by hand is redone.
        self.index = committed_index(self.root, self.so, lease=None)
        pre_plan = make_plan(urls, self.root, in_so, self.so, index=self.index, qa_samples=self.config.qa.samples)
        self._check_todo_inputs(pre_plan)
        if not pre_plan.todo and not out.overwrite:
            # Decided before Ray starts or a model loads: a rerun with nothing to do takes seconds.
            self._nothing_to_do(pre_plan)
            return self.account.finish(time.monotonic() - start)
        todo_estimate = len(pre_plan.shards) if out.overwrite else len(pre_plan.todo)
        # Ray starts only once the inputs and OUTPUT are known to be usable.
        connect_ray(self.config)
        count, gpus, cpus = worker_resources(self.config)
        count = max(1, min(count, todo_estimate))
        self.account.summary.workers = count
        try:
            self.pool = self._start_actors(count, gpus, cpus)
            manifest = Manifest.from_dict(self.pool.first_answer())
            check_or_write_manifest(self.root, manifest, self.so, overwrite=out.overwrite)
            # overwrite=true may just have dropped old commits: plan again against the output.
            plan = pre_plan
            if out.overwrite:
                self.index = committed_index(self.root, self.so, lease=None)
                plan = make_plan(urls, self.root, in_so, self.so, index=self.index, qa_samples=self.config.qa.samples)
            fingerprint = manifest.fingerprint()
            # e.g. different weights files on different nodes: its latents would not match.
            self.pool.accept = lambda answer: (None if Manifest.from_dict(answer).fingerprint() == fingerprint
                                               else "loaded a different model or config; not used")
            self._schedule(plan, self.pool)
        except KeyboardInterrupt:
            self.account.summary.status = "interrupted"
            self.account.progress.message("interrupted: stopping workers; committed shards are kept, rerun to resume")
        finally:
            if self.pool is not None:
                self.pool.kill()
        return self.account.finish(time.monotonic() - start)

    def _check_todo_inputs(self, plan: Plan) -> None:
        if self.inputs_checked:
            return
        try:
            check_files([t.url for t in plan.todo], self.config.input.storage_options)
        except InputError:
            # A refused input leaves OUTPUT as it was: the index is not rewritten on the way out.
            self.wrote_nothing = True
            raise

    def _nothing_to_do(self, plan: Plan) -> None:
        self._check_config_against_manifest()
        s = self.account.summary
        s.shards_total = s.shards_skipped = len(plan.done)
        self.wrote_nothing = True
        log.info("all %d shards of the job are committed in %s: nothing to do", len(plan.done), storage.redact(self.root))

    def _check_config_against_manifest(self) -> None:
        """What the config decides (format, dtype, preprocessing, compute dtype) must match OUTPUT's
        manifest, as a run that writes would check it. The model's identity is taken from the
        manifest: checking the weights means loading them, which a run with nothing to do skips."""
        try:
            existing = read_manifest(self.root, self.so)
        except ManifestError:
            return  # commits without a manifest: nothing to compare with
        facts = _RecordedModel(existing)
        differences = existing.differences(build_manifest(self.config, facts))
        if differences:
            raise ManifestMismatch(storage.redact(self.root), differences)

    def _publish_index(self) -> None:
        """Rewrite OUTPUT/index (unless the run wrote nothing into a current index), then release the
        lease naming it, so readers know the index is current without listing the commits."""
        generation = None
        if self.lease.lost:
            self.lease.release(None)  # only stops the heartbeat: the lease is another job's now
            return
        try:
            if self.wrote_nothing and self.index is not None and self.index.current:
                generation = self.index.generation
            else:
                generation = refresh_index(self.root, self.so, self.index, self.written).generation
        except Exception as e:  # readers then list the commits: slower, never wrong
            log.error("could not write the index of %s: %s", storage.redact(self.root), error_text(e))
        finally:
            self.lease.release(generation)

    def _precheck(self) -> list[str]:
        urls = expand_urls(self.config.input.urls, self.config.input.storage_options)
        # Missing inputs, an OUTPUT that cannot be written, unusable weights: one line, nothing written.
        # A fresh OUTPUT has its inputs checked here, before the lease is written; one with an index
        # only those still to do, once planned (`_check_todo_inputs`).
        self.inputs_checked = not storage.exists(index_url(self.root), self.so)
        check_job(self.config, inputs=self.inputs_checked)
        m = self.config.model
        if m.preset and not m.weights:
            check_sizes(self.config, int(get_preset(m.preset).downsample_factor))
        return urls

    def _start_actors(self, count: int, gpus: float, cpus: float) -> ActorPool:
        device = "cuda" if gpus > 0 else "cpu"
        # An actor runs its in-flight shards concurrently (threads sharing its decode pool and device).
        per_actor = self.config.ray.shards_in_flight(gpu=gpus > 0)
        # Actors log at the driver's level (`-q` quiets them too).
        level = logging.getLogger("pipeline").getEffectiveLevel()
        actors = start_actors(EncodeActor, count, (self.config, device, level), num_cpus=cpus, num_gpus=gpus,
                              env=fault_env(), max_restarts=-1, max_task_retries=0, max_concurrency=per_actor)
        log.info("starting %d encode worker(s) (%s GPU, %s CPU each, device %s)", count, gpus, cpus, device)
        return ActorPool(actors, label="encode worker", per_actor=per_actor, probe="manifest", restartable=True)

    def _schedule(self, plan: Plan, pool: ActorPool) -> None:
        self.account.begin(plan)
        scheduler = Scheduler(plan.todo, self.config.ray.max_attempts)
        images = RunningImages()
        num_shards = len(plan.shards)
        while scheduler.pending or pool.busy:
            if self.lease.lost:
                raise LeaseHeld(f"{storage.redact(self.root)}: another job took over the lease; stopped scheduling")
            if pool.all_dead:
                raise RuntimeError("every encode worker failed to start or died for good; see the log above")
            # One shard per free actor per round, so work spreads over actors before any gets a second.
            while scheduler.pending and (slot := pool.free_slot()) is not None:
                task = scheduler.next()
                pool.submit(slot, "process_shard", (task.url, task.name, num_shards, task.qa_rows), task)
            for call in pool.wait(0.5):
                images.shard_done(call.slot.index)
                self._finished(call, scheduler)
            images.poll(pool)
            self.account.show(pool.busy, images.total)
        self.account.close()

    def _finished(self, call: Finished, scheduler: Scheduler) -> None:
        task: ShardTask = call.item
        if call.error is None:
            self.account.committed(task, call.result)
            self.written.add(CommitRecord.from_dict(call.result.commit))
            return
        error = error_text(call.error)
        attempt = scheduler.failed(task, permanent=is_permanent(call.error))
        if attempt.retry:
            self.account.retried(task, attempt.number, error)
        else:
            self.account.failed(task, attempt.number, error)


def run_encode(config: JobConfig, stream: TextIO | None = None, *, force: bool = False) -> EncodeSummary:
    """Run the encode stage of `config` on the connected Ray cluster (see `pipeline.cluster.connect_ray`).

    Writes OUTPUT/summary.json and OUTPUT/index and returns the summary; `summary.exit_code` is
    the process exit code. When every shard of the job is committed it returns before starting
    Ray or loading a model. Raises `ConfigError`, `PlanError`, `ManifestMismatch` or `LeaseHeld`
    (another job writes OUTPUT; `force` takes its lease over) before any work when the job cannot
    start.
    """
    if config.outputs:
        raise ConfigError("outputs", "a config with several outputs runs through pipeline.multi_driver.run_outputs")
    summary = EncodeRun(config, stream, force).run()
    try:
        write_summary(summary, config.output.path, config.output.storage_options)
    except OSError as e:
        log.error("could not write the run summary: %s", e)
    return summary
