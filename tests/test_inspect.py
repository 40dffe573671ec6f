"""inspect.py: summary, counts, statistics, --verify; local and S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from output_builders import make_manifest, make_rows, write_output

from pipeline import storage, writer
from pipeline.inspect import main
from pipeline.summary import EncodeSummary, FailedShard, write_summary
from pipeline.writer import ShardWriter

ROOT = Path(__file__).resolve().parent.parent


def _output(tmp_path):
    root = str(tmp_path / "out")
    write_output(root, {"a": 4, "b": 3}, manifest=make_manifest(dtype="fp16"))
    return root


def test_inspect_summary(tmp_path, capsys, monkeypatch):
    root = _output(tmp_path)

    def crash(*a, **k):
        raise RuntimeError("killed")

    monkeypatch.setattr(writer, "write_commit", crash)
    w = ShardWriter(root, "c", "parquet", "fp16", None, make_manifest(dtype="fp16"))
    w.write(make_rows("c", 2))
    try:
        w.commit()
    except RuntimeError:
        pass
    monkeypatch.undo()
    # The last run failed shard d, which left no file at all: it is "missing".
    write_summary(EncodeSummary(output=root, status="failed", shards_total=4, shards_committed=2,
                                failed=[FailedShard("d", "in/d.tar", 3, "OSError: gone")]), root)
    assert main([root]) == 0
    out = capsys.readouterr().out
    assert "2 committed, 1 uncommitted, 0 broken, 1 missing" in out
    assert "failed d: OSError: gone" in out
    assert "rows         7" in out and "decode/UnidentifiedImageError" in out
    assert "preset tiny" in out and "latent dtype fp16" in out and "suggested scaling_factor" in out
    assert main([root, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 7 and info["errors"] == 2 and info["shards"]["missing"] == ["d"]
    assert info["shapes"] == {"4x4x4": 7} and len(info["stats"]["per_channel"]["mean"]) == 4


def test_inspect_verify_detects_corruption(tmp_path, capsys):
    root = _output(tmp_path)
    assert main([root, "--verify"]) == 0
    assert "verify       ok" in capsys.readouterr().out
    path = os.path.join(root, "shards", "b.parquet")
    data = bytearray(open(path, "rb").read())
    data[100] ^= 0xFF  # same size, different bytes: only the sha256 notices
    open(path, "wb").write(bytes(data))
    assert main([root]) == 0
    capsys.readouterr()
    assert main([root, "--verify"]) == 1
    assert "shards/b.parquet sha256" in capsys.readouterr().out
    open(path, "ab").write(b"x")  # size differs: the commit no longer holds
    assert main([root]) == 1
    assert "broken b" in capsys.readouterr().out


def test_inspect_errors_and_module_entry(tmp_path):
    assert main([str(tmp_path / "nothing")]) == 2
    root = _output(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "pipeline.inspect", root, "--verify"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "2 committed" in proc.stdout


def test_inspect_s3(s3_server, capsys):
    so = s3_server.storage_options
    root = storage.join(s3_server.bucket("inspect-test"), "out")
    write_output(root, {"a": 3}, manifest=make_manifest("wds", "bf16"), storage_options=so)
    assert main([root, "--verify", "--storage-options", json.dumps(so)]) == 0
    out = capsys.readouterr().out
    assert "1 committed" in out and "verify       ok" in out and "testing" not in out
