"""The Ray encode job end to end, on one shared local Ray instance (few runs: each starts actors).

Covers: local files, worker-count invariance (bit-identical latents), resume redoing only the
uncommitted shard, an actor killed mid-shard (retry, every key exactly once; its decode processes
exit with it), an always-failing
shard (recorded as failed while the others commit), and S3 in and out.
"""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from pipeline import faults
from pipeline.commit import committed_names
from pipeline.config import config_from_dict
from pipeline.driver import run_encode
from pipeline.layout import shard_name
from pipeline.summary import read_summary

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def make_config(tiny_weights):
    """Job configs for these tests: tiny model with fixed weights, 64 px, 2 CPU workers."""

    def make(urls, out, **sections):
        raw = {
            "input": {"urls": urls},
            "output": {"path": str(out)},
            "model": {"preset": "tiny", "weights": tiny_weights},
            "preprocess": {"resolution": 64},
            "ray": {"workers": 2, "num_gpus_per_worker": 0, "num_cpus_per_worker": 1, "batch_size": 2},
            "qa": {"samples": 4},
        }
        for name, values in sections.items():
            raw.setdefault(name, {}).update(values)
        return config_from_dict(raw)

    return make


def _names(*inputs) -> list[str]:
    """Output shard NAMEs of input shard paths or URLs, sorted (as `committed_names` lists them)."""
    return sorted(shard_name(str(u)) for u in inputs)


def _shard_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.parquet"))}


def test_local_run_resume_and_worker_count_invariance(ray_local, sample_shards, tmp_path, make_config):
    urls = str(sample_shards[0].parent / "*.tar")
    two = tmp_path / "two"
    summary = run_encode(make_config(urls, two, ray={"workers": 2}))
    assert summary.exit_code == 0 and summary.status == "ok"
    assert (summary.shards_total, summary.shards_committed, summary.images, summary.errors) == (3, 3, 12, 0)
    on_disk = json.loads((two / "summary.json").read_text())
    assert on_disk["exit_code"] == 0 and on_disk["shards_committed"] == 3 and on_disk["workers"] == 2
    assert read_summary(str(two)) == summary  # what readers (QA, inspect) get back is what was written
    assert on_disk["stage_seconds"]["encode"] > 0 and on_disk["shard_seconds"] + 0.01 >= sum(on_disk["stage_seconds"].values())
    assert "shard time: " in summary.render()
    assert on_disk["batch_sizes"] == [2] and ", batch 2" in summary.render()
    assert (two / "manifest.json").exists() and committed_names(str(two)) == _names(*sample_shards)
    assert len(list((two / "qa" / "samples").glob("*.parquet"))) == 2  # qa.samples 4: 2 carriers of 2 (qa_quotas)
    first, middle, last = _names(*sample_shards)
    rows = pq.read_table(two / "shards" / f"{middle}.parquet").to_pylist()
    assert sorted(r["key"] for r in rows) == [f"001{i:04d}" for i in range(4)]

    one = tmp_path / "one"
    # One actor encoding two shards at a time (threads sharing its decode pool and encoder).
    assert run_encode(make_config(urls, one, ray={"workers": 1, "max_in_flight_per_worker": 2})).exit_code == 0
    assert _shard_bytes(one) == _shard_bytes(two)  # same latents, whatever the number of workers and shards in flight

    # an interrupted run: one shard lost its commit; the rerun redoes only that one
    (one / "_commits" / f"{middle}.json").unlink()
    kept = {n: (one / "shards" / f"{n}.parquet").stat().st_mtime_ns for n in (first, last)}
    summary = run_encode(make_config(urls, one, ray={"workers": 2}))
    assert summary.exit_code == 0
    assert (summary.shards_skipped, summary.shards_committed, summary.images) == (2, 1, 4)
    assert {n: (one / "shards" / f"{n}.parquet").stat().st_mtime_ns for n in kept} == kept
    assert _shard_bytes(one) == _shard_bytes(two)

    # a different preprocessing fingerprint is refused before any work
    from pipeline.manifest import ManifestMismatch

    with pytest.raises(ManifestMismatch, match="preprocess"):
        run_encode(make_config(urls, one, preprocess={"resolution": 32}))


def test_killed_actor_is_retried_and_bad_shard_fails(ray_local, sample_shards, tmp_path, monkeypatch, make_config):
    shard_dir = sample_shards[0].parent
    (shard_dir / "00099.tar").write_bytes(b"not a tar archive at all " * 50)
    marker = tmp_path / "killed.marker"
    monkeypatch.setenv(faults.KILL_AFTER, "2")
    monkeypatch.setenv(faults.MARKER, str(marker))
    out = tmp_path / "out"
    urls = [str(shard_dir / "*.tar")]  # (a missing input is refused before the job starts: test_hard_edges)
    # Decoding in processes of their own: the killed actor's decode processes go with it.
    config = make_config(urls, out, ray={"workers": 2, "batch_size": 1, "max_attempts": 2, "decode_mode": "processes"})
    summary = run_encode(config)

    assert marker.exists()  # one actor process was killed mid-shard
    assert summary.exit_code == 1 and summary.status == "failed"
    failed = {f.name: f for f in summary.failed}
    bad = shard_name(str(shard_dir / "00099.tar"))
    assert sorted(failed) == [bad], summary.render()
    assert failed[bad].attempts == 2 and "ShardReadError" in failed[bad].error
    assert "00099.tar" in failed[bad].error
    assert summary.retries >= 2  # the killed shard and the bad shard's first attempt
    assert committed_names(str(out)) == _names(*sample_shards)
    keys = [r["key"] for p in sorted((out / "shards").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert sorted(keys) == sorted(f"{s:03d}{i:04d}" for s in range(3) for i in range(4))  # each exactly once
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["shards_failed"] == 1 and on_disk["exit_code"] == 1


def test_s3_input_and_output(ray_local, s3_server, sample_shards, make_config):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    src = s3_server.bucket("encode-in")
    dst = s3_server.bucket("encode-out")
    for p in sample_shards:
        fs.put_file(str(p), f"{src[5:]}/shards/{p.name}")
    so = s3_server.storage_options
    config = make_config(f"{src}/shards/{{00000..00002}}.tar", f"{dst}/latents",
                     input={"storage_options": so}, output={"storage_options": so}, ray={"workers": 2})
    summary = run_encode(config)
    assert summary.exit_code == 0 and summary.images == 12
    inputs = [f"{src}/shards/{p.name}" for p in sample_shards]
    assert committed_names(f"{dst}/latents", so) == _names(*inputs)
    with fs.open(f"{dst[5:]}/latents/shards/{shard_name(inputs[2])}.parquet", "rb") as f:
        rows = pq.read_table(f).to_pylist()
    assert sorted(r["key"] for r in rows) == [f"002{i:04d}" for i in range(4)]
    assert rows[0]["source"].startswith("s3://encode-in/shards/")
    summary_text = fs.cat_file(f"{dst[5:]}/latents/summary.json").decode()
    assert "testing" not in summary_text  # credentials never reach the output
    assert os.environ.get("AWS_ACCESS_KEY_ID") == "testing"


def test_progress_bar_on_tty_and_log_lines_otherwise(caplog, monkeypatch):
    import io
    import logging

    from pipeline.progress import Progress, ProgressState, format_duration

    state = ProgressState(shards_total=10, shards_skipped=2, shards_committed=3, shards_running=2, images=1234,
                          errors=5, shards_failed=1)
    monkeypatch.setenv("COLUMNS", "200")
    tty = io.StringIO()
    bar = Progress(tty, tty=True)
    bar.update(state, force=True)
    bar.message("shard 00003 committed")
    bar.close(state)
    text = tty.getvalue()
    assert "\r[" in text and "6/10 shards" in text and "1,234 images" in text and "1 failed" in text
    assert "shard 00003 committed\n" in text and "ETA " in text

    plain = io.StringIO()
    with caplog.at_level(logging.INFO, logger="pipeline.progress"):
        lines = Progress(plain, tty=False, interval=3600)
        lines.update(state)  # throttled: nothing yet
        lines.update(state, force=True)
    assert plain.getvalue() == ""  # no carriage-return noise in log files
    assert sum("progress: 6/10 shards" in r.getMessage() for r in caplog.records) == 1
    assert [format_duration(s) for s in (12, 750, 7300, None)] == ["12s", "12m30s", "2h01m", "?"]
