"""The encode run of a config with `outputs:`: one pass over the inputs writes every output.

Each output is run as `pipeline.driver` runs a single-output config: its own lease, its plan
against its own commits, its manifest (checked, or written first), its progress lines, index and
OUTPUT/summary.json (one `driver.EncodeRun` per output keeps all of that). What is shared is the
pass: one set of Ray actors (`MultiEncodeActor`, around `fanout.MultiEncodeWorker`) that read and
decode each input shard once for all outputs.

Resume is per output. A shard is handed out with the outputs that have not committed it: one
committed in every output is skipped, one committed in some is completed in the others only.
A shard that fails in some outputs is retried for those outputs alone; attempts are counted per
shard (`ray.max_attempts`), and a shard given up is recorded as failed in the summaries of the
outputs it failed in. Outputs with nothing to do are not loaded on the actors at all.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import ray

from . import storage
from .cluster import ActorPool, Finished, connect_ray, error_text, start_actors, worker_resources
from .commit import CommitRecord
from .config import JobConfig
from .driver import EncodeMetrics, EncodeRun, RunningImages, fault_env, is_permanent
from .fanout import FanoutResult, MultiEncodeWorker, OutputTask
from .lease import LeaseHeld
from .manifest import Manifest, check_or_write_manifest
from .plan import Plan, ShardTask, committed_index, make_plan
from .progress import Progress, ProgressState
from .scheduler import Scheduler
from .summary import EncodeSummary, write_summary
from .worker import ShardResult

__all__ = ["MultiEncodeActor", "run_outputs"]

log = logging.getLogger(__name__)


@ray.remote(concurrency_groups={"status": 1})
class MultiEncodeActor:
    """A Ray actor around `MultiEncodeWorker` (every output's encoder on this actor's device)."""

    def __init__(self, config: JobConfig, device: str, log_level: int = logging.INFO):
        logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
        self.worker = MultiEncodeWorker(config, device=device, set_threads=True)
        self.metrics = EncodeMetrics()

    def manifests(self) -> list[dict[str, Any]]:
        """The manifest of each output this worker writes (model fingerprint, shapes, ...)."""
        return [m.to_dict() for m in self.worker.manifests]

    def process_shard(self, url: str, tasks: list[OutputTask], num_shards: int) -> _Outcome:
        # The plan handed the shard out as uncommitted in these outputs: no old commit to delete first.
        result = self.worker.process_shard(url, tasks, num_shards=num_shards, fresh=True)
        for shard in result.results.values():
            self.metrics.record(shard)
        return _Outcome.of(result)

    @ray.method(concurrency_group="status")
    def progress(self) -> dict[str, int]:
        """Shards being encoded -> images of each encoded so far (the most of any output)."""
        return self.worker.running


@dataclass
class _Outcome:
    """A `FanoutResult` as the actor sends it back: each failed output's error as its line and
    whether a retry could help (an exception object may not survive the trip)."""

    results: dict[int, ShardResult]
    errors: dict[int, str]
    permanent: dict[int, bool]

    @classmethod
    def of(cls, result: FanoutResult) -> _Outcome:
        return cls(result.results, {i: error_text(e) for i, e in result.errors.items()},
                   {i: is_permanent(e) for i, e in result.errors.items()})


class _OutputProgress:
    """One output's view of the run's one progress display: its lines name the output; the bar
    follows the first output with work only (every output sees the same shards go by)."""

    def __init__(self, progress: Progress, label: str, bar: bool):
        self._progress = progress
        self._label = label
        self._bar = bar

    def message(self, text: str) -> None:
        self._progress.message(f"{self._label}: {text}")

    def update(self, state: ProgressState, force: bool = False) -> None:
        if self._bar:
            self._progress.update(state, force)

    def close(self, state: ProgressState) -> None:
        if self._bar:
            self._progress.close(state)


@dataclass
class _Shard:
    """An input shard to encode, with the outputs (indices among the actors' outputs) still missing it."""

    url: str
    name: str
    tasks: list[OutputTask] = field(default_factory=list)


class _MultiRun:
    """One run of the encode stage over every output of `config`."""

    def __init__(self, config: JobConfig, stream: TextIO | None, force: bool):
        self.config = config
        self.runs = [EncodeRun(job, stream, force) for job in config.output_jobs()]
        self.progress = Progress(stream)
        self.pool: ActorPool | None = None
        self.force = force
        # Outputs with work this run (indices into `runs`), in the actors' order.
        self.active: list[int] = []

    def run(self) -> list[EncodeSummary]:
        start = time.monotonic()
        urls = [run._precheck() for run in self.runs][0]  # `input` is shared: the same shards for all
        leased: list[EncodeRun] = []
        try:
            for run in self.runs:
                run.lease.acquire(force=self.force)
                run.lease.start_heartbeat()
                leased.append(run)
            self._run(urls)
        finally:
            for run in leased:
                run._publish_index()
        seconds = time.monotonic() - start
        return [run.account.finish(seconds) for run in self.runs]

    def _plan(self, run: EncodeRun, urls: list[str]) -> Plan:
        # As the single-output driver: list _commits/ rather than trust a current index.
        run.index = committed_index(run.root, run.so, lease=None)
        return make_plan(urls, run.root, self.config.input.storage_options, run.so, index=run.index,
                         qa_samples=self.config.qa.samples)

    def _run(self, urls: list[str]) -> None:
        plans = [self._plan(run, urls) for run in self.runs]
        self.active = [i for i, (run, plan) in enumerate(zip(self.runs, plans))
                       if plan.todo or run.config.output.overwrite]
        for i, run in enumerate(self.runs):
            if i not in self.active:
                run._nothing_to_do(plans[i])
            run.account.progress = _OutputProgress(self.progress, f"output {i} ({storage.redact(run.root)})",
                                                   bar=bool(self.active) and i == self.active[0])
        if not self.active:
            return
        todo = {t.url for i in self.active for t in (plans[i].shards if self.runs[i].config.output.overwrite
                                                      else plans[i].todo)}
        connect_ray(self.config)
        count, gpus, cpus = worker_resources(self.config)
        count = max(1, min(count, len(todo)))
        for i in self.active:
            self.runs[i].account.summary.workers = count
        try:
            self.pool = self._start_actors(count, gpus, cpus)
            manifests = [Manifest.from_dict(m) for m in self.pool.first_answer()]
            for k, i in enumerate(self.active):
                run = self.runs[i]
                overwrite = run.config.output.overwrite
                check_or_write_manifest(run.root, manifests[k], run.so, overwrite=overwrite)
                if overwrite:  # its old commits may just have been dropped: plan it again
                    plans[i] = self._plan(run, urls)
            fingerprints = [m.fingerprint() for m in manifests]
            self.pool.accept = lambda answer: (
                None if [Manifest.from_dict(m).fingerprint() for m in answer] == fingerprints
                else "loaded a different model or config; not used")
            self._schedule(plans, urls)
        except KeyboardInterrupt:
            for i in self.active:
                self.runs[i].account.summary.status = "interrupted"
            self.progress.message("interrupted: stopping workers; committed shards are kept, rerun to resume")
        finally:
            if self.pool is not None:
                self.pool.kill()

    def _start_actors(self, count: int, gpus: float, cpus: float) -> ActorPool:
        device = "cuda" if gpus > 0 else "cpu"
        per_actor = self.config.ray.shards_in_flight(gpu=gpus > 0)
        # The actors load the outputs with work only.
        config = dataclasses.replace(self.config, outputs=[self.runs[i].config for i in self.active])
        level = logging.getLogger("pipeline").getEffectiveLevel()
        actors = start_actors(MultiEncodeActor, count, (config, device, level), num_cpus=cpus, num_gpus=gpus,
                              env=fault_env(), max_restarts=-1, max_task_retries=0, max_concurrency=per_actor)
        log.info("starting %d encode worker(s) for %d outputs (%s GPU, %s CPU each, device %s)", count,
                 len(self.active), gpus, cpus, device)
        return ActorPool(actors, label="encode worker", per_actor=per_actor, probe="manifests", restartable=True)

    def _shards(self, plans: list[Plan], urls: list[str]) -> list[_Shard]:
        """The input shards some active output still needs, in input order, with those outputs."""
        by_url: dict[str, _Shard] = {}
        for k, i in enumerate(self.active):
            for t in plans[i].todo:
                shard = by_url.setdefault(t.url, _Shard(t.url, t.name))
                shard.tasks.append(OutputTask(k, t.name, t.qa_rows))
        return [by_url[u] for u in dict.fromkeys(urls) if u in by_url]

    def _schedule(self, plans: list[Plan], urls: list[str]) -> None:
        pool = self.pool
        assert pool is not None
        for i in self.active:
            self.runs[i].account.begin(plans[i])
        scheduler = Scheduler(self._shards(plans, urls), self.config.ray.max_attempts)
        images = RunningImages()
        num_shards = len(plans[self.active[0]].shards)
        first = self.runs[self.active[0]].account
        while scheduler.pending or pool.busy:
            for i in self.active:
                if self.runs[i].lease.lost:
                    raise LeaseHeld(f"{storage.redact(self.runs[i].root)}: another job took over the lease; "
                                    "stopped scheduling")
            if pool.all_dead:
                raise RuntimeError("every encode worker failed to start or died for good; see the log above")
            while scheduler.pending and (slot := pool.free_slot()) is not None:
                shard = scheduler.next()
                pool.submit(slot, "process_shard", (shard.url, list(shard.tasks), num_shards), shard)
            for call in pool.wait(0.5):
                images.shard_done(call.slot.index)
                self._finished(call, scheduler)
            images.poll(pool)
            first.show(pool.busy, images.total)
        for i in self.active:
            self.runs[i].account.close()

    def _finished(self, call: Finished, scheduler: Scheduler) -> None:
        shard: _Shard = call.item
        if call.error is not None:  # the whole call failed (its actor died): every output of it did
            errors = {t.output: error_text(call.error) for t in shard.tasks}
            permanent = is_permanent(call.error)
        else:
            result: _Outcome = call.result
            errors, permanent = result.errors, all(result.permanent.values())
            for task in shard.tasks:
                if task.output in result.results:
                    run = self.runs[self.active[task.output]]
                    done = result.results[task.output]
                    run.account.committed(ShardTask(shard.url, task.name, task.qa_rows), done)
                    run.written.add(CommitRecord.from_dict(done.commit))
        if not errors:
            return
        shard.tasks = [t for t in shard.tasks if t.output in errors]
        attempt = scheduler.failed(shard, permanent=permanent)
        for task in shard.tasks:
            account = self.runs[self.active[task.output]].account
            what = ShardTask(shard.url, task.name, task.qa_rows)
            if attempt.retry:
                account.retried(what, attempt.number, errors[task.output])
            else:
                account.failed(what, attempt.number, errors[task.output])


def run_outputs(config: JobConfig, stream: TextIO | None = None, *, force: bool = False) -> list[EncodeSummary]:
    """Run the encode stage of a config with `outputs:` on the connected Ray cluster: one pass
    over the inputs writes every output (see the module docstring).

    Writes each output's summary.json and index and returns the summaries in config order; each
    one's `exit_code` is as for `pipeline.driver.run_encode`. Raises what `run_encode` raises
    before any work, naming the output's path.
    """
    summaries = _MultiRun(config, stream, force).run()
    for job, summary in zip(config.output_jobs(), summaries):
        try:
            write_summary(summary, job.output.path, job.output.storage_options)
        except OSError as e:
            log.error("could not write the run summary of %s: %s", storage.redact(job.output.path), e)
    return summaries
