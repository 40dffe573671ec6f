"""`ray job submit --working-dir . -- python -m pipeline ...` against a `ray start --head` cluster.

The cluster is this test's own: its own temp dir, free ports, the dashboard on 127.0.0.1 (Ray
maps its internal services onto this host's own address), token authentication on with a fresh
token passed through the environment (RAY_AUTH_TOKEN), and it is stopped by signalling the
`ray start --block` process this test started, never with `ray stop` (that would stop every Ray
instance on the machine).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

from pipeline.layout import shard_name

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.timeout(400)


@pytest.fixture
def ray_head():
    """A `ray start --head --block` cluster; yields (dashboard URL, env holding its token)."""
    temp_dir = tempfile.mkdtemp(prefix="rayjt", dir="/tmp")  # short: Ray's socket paths must fit
    env = dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        RAY_USAGE_STATS_ENABLED="0",
    )
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard,
        "--ray-client-server-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--temp-dir={temp_dir}",
           "--num-cpus=2", "--num-gpus=0", "--disable-usage-stats"]
    cmd += [f"{k}={v}" for k, v in ports.items()]
    log = open(os.path.join(temp_dir, "ray-start.log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # answering (401 without a token): it is up
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("ray start failed:\n" + Path(log.name).read_text()[-3000:]) from None
                time.sleep(0.5)
        yield url, env
    finally:
        proc.terminate()  # ray start --block shuts its own processes down on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submit_with_working_dir(ray_head, sample_shards, tiny_weights, tmp_path):
    url, env = ray_head
    out = tmp_path / "out"

    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    denied = subprocess.run([str(BIN / "ray"), "job", "list", f"--address={url}"], env=no_token,
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert denied.returncode != 0  # token authentication is on

    cmd = [str(BIN / "ray"), "job", "submit", f"--address={url}", "--working-dir", ".", "--",
           "python", "-m", "pipeline", "encode", "configs/demo.yaml",
           f"input.urls={sample_shards[0].parent}/*.tar", f"output.path={out}", f"model.weights={tiny_weights}",
           "preprocess.resolution=64", "ray.workers=2", "ray.batch_size=4", "qa.samples=2",
           # decode processes must find the package in the job's working dir too
           "ray.decode_mode=processes", "ray.decode_threads=2",
           "--verbose"]  # the actors' own log lines, checked below, reach the console
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-4000:]
    assert "joined the Ray cluster at" in logs  # the job's driver joined the cluster
    assert "Encode summary" in logs and "3 committed now" in logs
    assert "2 decode processes" in logs  # the actors decoded in processes of their own
    assert sorted(p.stem for p in (out / "_commits").iterdir()) == sorted(shard_name(str(p)) for p in sample_shards)
