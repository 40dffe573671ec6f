"""A worker node lost mid-job: its shard is retried elsewhere, the job exits 0, every key once.

A three-node cluster on this machine (`ray.cluster_utils.Cluster`: a head without CPUs and two
worker nodes of one CPU each, token authentication on), started by a helper process of this test
so that this test process never connects to it; its address is this host's own IP, as on a real
cluster. The job runs as `python -m pipeline encode` with RAY_ADDRESS set, two encode workers
(one per node). When two of its eight shards are committed, the raylet of one worker node is
killed (SIGKILL): the actor on it dies with the shard it was encoding, which goes back to the queue
and is encoded by the worker left.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import free_port, write_photo_shards

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(400)

SHARDS, PER_SHARD = 8, 12

# The helper: start the cluster, print its address, kill a worker node's raylet on "kill", stop on
# end of input (or when this test's process dies, which closes its stdin).
_CLUSTER = """
import sys
import ray._common.utils
from ray.cluster_utils import Cluster

temp_dir, port = sys.argv[1], int(sys.argv[2])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "gcs_server_port": port, "temp_dir": temp_dir,
                                                        "include_dashboard": False})
try:
    workers = [cluster.add_node(num_cpus=1, temp_dir=temp_dir) for _ in range(2)]
    cluster.wait_for_nodes()
    # Cluster records itself as this machine's current cluster, which a plain ray.init() anywhere on
    # it would join; the job here gets RAY_ADDRESS instead.
    ray._common.utils.reset_ray_address()
    print(cluster.address, flush=True)
    for line in sys.stdin:
        if line.strip() == "kill":
            workers[0].kill_raylet()
            print("killed", flush=True)
finally:
    cluster.shutdown()
"""


@pytest.fixture
def cluster_env():
    """(cluster address, environment with its token, helper process)."""
    temp_dir = tempfile.mkdtemp(prefix="raynl", dir="/tmp")  # short: Ray's socket paths must fit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=str(ROOT))
    helper = subprocess.Popen([sys.executable, "-c", _CLUSTER, temp_dir, str(free_port(""))], env=env, cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        address = helper.stdout.readline().strip()
        assert address, "the cluster did not start"
        yield address, env, helper
    finally:
        helper.stdin.close()
        try:
            helper.wait(timeout=60)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _write_shards(folder: Path) -> list[str]:
    return write_photo_shards(folder, SHARDS, PER_SHARD, photos=4, size=(128, 128))


def _commits(out: Path) -> int:
    return len(list((out / "_commits").glob("*.json")))


def test_losing_a_worker_node_mid_job(cluster_env, tmp_path):
    address, env, helper = cluster_env
    assert not address.startswith("127.")  # the host's own address, as a real cluster's
    shards = tmp_path / "shards"
    shards.mkdir()
    keys = _write_shards(shards)
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({
        "input": {"urls": str(shards / "*.tar")},
        "output": {"path": str(out)},
        "model": {"preset": "tiny"},
        "preprocess": {"resolution": 128},
        "ray": {"workers": 2, "num_gpus_per_worker": 0, "num_cpus_per_worker": 1, "batch_size": 4},
        "qa": {"samples": 0},
    }))
    driver = subprocess.Popen([sys.executable, "-m", "pipeline", "encode", str(job)], cwd=ROOT,
                              env=dict(env, RAY_ADDRESS=address), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        deadline = time.monotonic() + 240
        while _commits(out) < 2:
            assert driver.poll() is None, driver.communicate()
            assert time.monotonic() < deadline, "no shard was committed in time"
            time.sleep(0.05)
        helper.stdin.write("kill\n")
        helper.stdin.flush()
        assert helper.stdout.readline().strip() == "killed"
        committed_at_kill = _commits(out)
        stdout, stderr = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert committed_at_kill < SHARDS  # the node was lost with work left to do
    assert driver.returncode == 0, stdout[-3000:] + stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards_committed"] == SHARDS and summary["shards_failed"] == 0
    assert summary["retries"] >= 1, stderr[-3000:]  # the shard on the lost node, encoded again
    written = [k for path in sorted((out / "shards").glob("*.parquet")) for k in pq.read_table(path).column("key")
               .to_pylist()]
    assert sorted(written) == sorted(keys)  # every key, once
