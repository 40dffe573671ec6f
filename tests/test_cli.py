"""The command dispatcher: exit codes, config errors, delegated commands, run = encode + qa."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.layout import shard_name
from pipeline.summary import EncodeSummary, FailedShard

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def job(tmp_path, sample_shards):
    path = tmp_path / "job.yaml"
    path.write_text(
        f"input:\n  urls: {sample_shards[0].parent}/{{00000..00002}}.tar\n"
        f"output:\n  path: {tmp_path / 'out'}\n"
        "preprocess:\n  resolution: 64\n"
    )
    return path


def test_config_errors_exit_2_naming_the_key(job, capsys):
    assert cli.main(["encode", str(job), "output.dtype=fp64"]) == cli.EXIT_USAGE
    assert "output.dtype: expected one of fp32|fp16|bf16|fp8_e4m3, got 'fp64'" in capsys.readouterr().err
    assert cli.main(["run", str(job), "ray.wrkers=2"]) == cli.EXIT_USAGE
    assert "ray.wrkers: unknown key (did you mean 'workers'?)" in capsys.readouterr().err
    assert cli.main(["encode", str(job.parent / "nope.yaml")]) == cli.EXIT_USAGE
    assert "not found" in capsys.readouterr().err
    assert cli.main([]) == cli.EXIT_USAGE
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])


def test_dry_run_shows_the_plan(job, capsys, sample_shards):
    assert cli.main(["encode", str(job), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 shard(s)" in out and "0 committed, 3 to do" in out
    assert f"  {shard_name(str(sample_shards[1]))} <- {sample_shards[1]}" in out
    assert cli.main(["encode", str(job), "input.urls=/nonexistent/*.tar", "--dry-run"]) == cli.EXIT_USAGE
    assert "matches no files" in capsys.readouterr().err


def test_delegated_commands(monkeypatch):
    seen = {}
    fake = types.ModuleType("pipeline.inspect")
    fake.main = lambda argv: seen.setdefault("inspect", argv) and 3
    monkeypatch.setitem(sys.modules, "pipeline.inspect", fake)
    assert cli.main(["inspect", "out", "--verify"]) == 3 and seen["inspect"] == ["out", "--verify"]

    monkeypatch.setitem(sys.modules, "pipeline.make_shards", None)  # a broken import is a bug: it surfaces
    with pytest.raises(ImportError, match="pipeline.make_shards"):
        cli.main(["make-shards", "--sample"])


@pytest.mark.parametrize(
    "status, qa_code, expect, qa_ran",
    [("ok", 0, 0, True), ("ok", 1, 1, True), ("failed", 0, 1, True), ("interrupted", 0, 130, False)],
)
def test_run_is_encode_then_qa(job, monkeypatch, status, qa_code, expect, qa_ran, capsys):
    import ray

    import pipeline.driver as driver

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    calls = []

    def fake_encode(config, force=False):
        calls.append("encode")
        s = EncodeSummary(output=config.output.path, status=status, shards_total=3, shards_committed=3)
        if status == "failed":
            s.shards_committed = 2
            s.failed = [FailedShard("00001", "u", 3, "boom")]
        return s

    def fake_qa(config):
        calls.append("qa")
        return qa_code

    monkeypatch.setattr(driver, "run_encode", fake_encode)
    monkeypatch.setitem(sys.modules, "pipeline.qa", types.SimpleNamespace(run_qa=fake_qa))
    assert cli.main(["run", str(job)]) == expect
    assert calls == (["encode", "qa"] if qa_ran else ["encode"])
    assert "Encode summary" in capsys.readouterr().out
    calls.clear()
    assert cli.main(["qa", str(job)]) == qa_code and calls == ["qa"]


def test_module_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    for command in ("run", "encode", "qa", "make-shards", "inspect"):
        assert command in proc.stdout


def test_unreachable_cluster_fails_fast_naming_the_address(job):
    import os
    import socket
    import time

    with socket.socket() as s:  # a loopback port with nothing listening on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RAY_ADDRESS=f"127.0.0.1:{port}")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "encode", str(job), "ray.connect_timeout=2"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == cli.EXIT_USAGE, proc.stderr
    assert f"nothing answers at 127.0.0.1:{port} (tried for 2 s" in proc.stderr
    assert "ray.address / RAY_ADDRESS" in proc.stderr
    assert time.monotonic() - t0 < 60  # not Ray's own minutes of retries
