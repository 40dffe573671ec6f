"""The embedded default end to end: sample shards -> `python -m pipeline run configs/demo.yaml` -> QA report.

The same commands as `make demo` and `make demo-s3`, on a reduced sample set.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="the sample photos ship with scikit-image"),
]


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def check_output(out: Path, shards: int, samples: int) -> dict:
    assert (out / "manifest.json").is_file()
    # NAME = the input file name, a dash and a hash of its URL (layout.shard_name)
    assert sorted(p.name.rsplit("-", 1)[0] for p in (out / "_commits").iterdir()) == [f"{i:05d}" for i in range(shards)]
    rows = sum(json.loads(p.read_text())["rows"] for p in (out / "_commits").iterdir())
    assert rows == samples
    assert (out / "qa" / "report.html").is_file()
    return json.loads((out / "qa" / "metrics.json").read_text())


def test_demo(tmp_path):
    shards, out = tmp_path / "demo-shards", tmp_path / "demo-output"
    made = run(["-m", "pipeline", "make-shards", "--sample", "--out", str(shards), "--shards", "2",
                "--per-shard", "6"])
    assert made.returncode == 0, made.stderr
    job = run(["-m", "pipeline", "run", "configs/demo.yaml", f"input.urls={shards}/*.tar", f"output.path={out}",
               "qa.samples=8", "ray.workers=1"])
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    metrics = check_output(out, 2, 12)
    assert metrics["verdict"] == "pass"
    # The shipped tiny weights, not a random init: reconstructions resemble the photos.
    assert metrics["provenance"]["model"]["weights_sha256"]
    assert metrics["metrics"]["overall"]["psnr"]["mean"] >= 20.0


def test_demo_s3(tmp_path):
    report_dir = tmp_path / "report"
    job = run(["-m", "pipeline.demo_s3", "--shards", "2", "--per-shard", "4", "--report-dir", str(report_dir),
               "qa.samples=4", "ray.workers=1"])
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "s3://demo/output/shards: 2 objects" in job.stdout
    metrics = json.loads((report_dir / "qa" / "metrics.json").read_text())
    assert metrics["verdict"] == "pass"
    assert metrics["output"] == "s3://demo/output"
    assert (report_dir / "qa" / "report.html").is_file()
    # Credentials came from the environment and appear in nothing the job wrote.
    for path in report_dir.rglob("*"):
        if path.is_file():
            assert "demo-secret" not in path.read_text(errors="replace")
