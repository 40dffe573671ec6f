"""SIGKILL of the whole job (driver and its local Ray instance) at four moments, each followed by a
rerun: nothing is lost, nothing duplicated, and shards committed before a kill are kept as they
were, byte for byte. While one of the runs holds OUTPUT, an identical second job is refused.

Each run is `python -m pipeline encode` in a process group of its own, killed with SIGKILL as a
node failure or the OOM killer would end it: no handler runs, the lease stays behind (so the
reruns pass `--force`, as the README tells a user to after a crash) and the index and summary may
be missing or stale.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import write_photo_shards

from pipeline import cli

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(600)

SHARDS, PER_SHARD = 6, 6


def _write_shards(folder: Path) -> list[str]:
    return write_photo_shards(folder, SHARDS, PER_SHARD, photos=3, size=(64, 72))


def _commits(out: Path) -> list[Path]:
    return sorted((out / "_commits").glob("*.json")) if (out / "_commits").is_dir() else []


def _committed_shards(out: Path) -> dict[str, str]:
    """sha256 of each committed shard file."""
    files = {}
    for path in _commits(out):
        for rel in json.loads(path.read_text())["files"]:
            if rel.startswith("shards/"):
                files[rel] = hashlib.sha256((out / rel).read_bytes()).hexdigest()
    return files


def _lease(out: Path) -> bytes | None:
    return (out / "lease").read_bytes() if (out / "lease").exists() else None


def _start(job: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    return subprocess.Popen([sys.executable, "-m", "pipeline", "encode", str(job), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _kill_when(proc: subprocess.Popen, ready, what: str) -> str:
    """Kill the job's process group once `ready()`; returns what the job printed."""
    deadline = time.monotonic() + 240
    while not ready():
        assert proc.poll() is None, f"the job ended before {what}: " + proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"never reached {what}"
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):  # a job that has just finished by itself
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and every Ray process it started
    return proc.communicate()[1]


def test_sigkill_at_four_moments_then_rerun(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    keys = _write_shards(shards)
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({
        "input": {"urls": str(shards / "*.tar")},
        "output": {"path": str(out)},
        "model": {"preset": "tiny"},
        "preprocess": {"resolution": 64},
        "ray": {"workers": 1, "num_gpus_per_worker": 0, "num_cpus_per_worker": 1, "batch_size": 2},
        "qa": {"samples": 4},
    }))
    kept: dict[str, str] = {}
    printed = []  # what each run printed, for the assertion messages
    moments = [
        ("the lease is taken, before any commit", lambda: (out / "lease").exists()),
        ("one shard committed", lambda: len(_commits(out)) >= 1),
        ("another two shards committed", lambda: len(_commits(out)) >= 3),
        ("every shard committed, before the index and summary", lambda: len(_commits(out)) == SHARDS),
    ]
    for i, (what, ready) in enumerate(moments):
        lease_before = _lease(out)
        proc = _start(job, *(["--force"] if i else []))
        if i == 2:
            # An identical second job while this one holds OUTPUT: refused, naming the holder.
            while _lease(out) in (None, lease_before):
                assert proc.poll() is None
                time.sleep(0.02)
            assert cli.main(["encode", str(job)]) == cli.EXIT_FAILED
            err = capsys.readouterr().err
            assert "is being written by another job" in err and f"pid {proc.pid}" in err, err
        printed.append(_kill_when(proc, ready, what)[-2000:])
        now = _committed_shards(out)
        assert all(now.get(rel) == digest for rel, digest in kept.items()), (what, printed)  # never rewritten
        kept = now

    final = _start(job, "--force")
    stdout, stderr = final.communicate(timeout=300)
    assert final.returncode == 0, (stdout[-3000:], stderr[-3000:], printed)
    assert _committed_shards(out) == kept  # the last kill came after every commit: nothing redone
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["shards_total"], summary["shards_skipped"]) == (SHARDS, SHARDS)
    written = [k for rel in kept for k in pq.read_table(out / rel).column("key").to_pylist()]
    assert sorted(written) == sorted(keys)  # 0 lost, 0 duplicated
