"""lease.py: one job at a time per OUTPUT; refusal names the holder; --force and expiry take over."""

from __future__ import annotations

import time

import pytest

from pipeline import storage
from pipeline.layout import lease_url
from pipeline.lease import Lease, LeaseHeld, read_lease


def test_second_job_is_refused_naming_the_holder(tmp_path):
    root = str(tmp_path / "out")
    first = Lease(root, holder="alice@node1 pid 7", ttl=60, settle=0).acquire()
    assert first.previous is None and read_lease(root).live()
    with pytest.raises(LeaseHeld, match="alice@node1 pid 7") as err:
        Lease(root, holder="bob@node2 pid 9", ttl=60, settle=0).acquire()
    assert "--force" in str(err.value)

    first.release("gen1")
    record = read_lease(root)
    assert record.released and record.generation == "gen1" and not record.live()
    second = Lease(root, holder="bob@node2 pid 9", ttl=60, settle=0).acquire()
    assert second.previous.generation == "gen1" and second.previous.released
    second.release(None)


def test_force_takes_over_and_the_old_holder_notices(tmp_path):
    root = str(tmp_path / "out")
    old = Lease(root, holder="old", ttl=60, settle=0).acquire()
    new = Lease(root, holder="new", ttl=60, settle=0).acquire(force=True)
    assert new.previous.holder == "old" and new.previous.live()
    assert not old.renew() and old.lost
    old.release("stale")  # a lost lease is not released over the new holder's
    assert read_lease(root).holder == "new" and read_lease(root).live()
    new.release("g")


def test_crashed_job_lease_expires_and_heartbeat_keeps_a_live_one(tmp_path):
    root = str(tmp_path / "out")
    crashed = Lease(root, holder="crashed", ttl=0.5, settle=0).acquire()  # never renewed, never released
    assert crashed.held
    time.sleep(0.7)
    assert not read_lease(root).live()
    alive = Lease(root, holder="alive", ttl=0.6, settle=0).acquire()  # expiry: taken without --force
    assert alive.previous.holder == "crashed"
    alive.start_heartbeat(interval=0.1)
    time.sleep(1.0)  # longer than its ttl: only the heartbeat keeps it
    with pytest.raises(LeaseHeld, match="alive"):
        Lease(root, holder="late", ttl=1, settle=0).acquire()
    alive.release("g2")
    assert read_lease(root).generation == "g2"


def test_racing_writer_loses(tmp_path, monkeypatch):
    root = str(tmp_path / "out")
    racer = Lease(root, holder="racer", ttl=60, settle=0)
    real_put = storage.put_bytes

    def put_then_overwritten(url, data, so=None):
        # Another job's lease lands between this job's write and its read-back.
        real_put(url, data, so)
        if url == lease_url(root):
            real_put(url, Lease(root, holder="winner", ttl=60)._record().to_json(), so)

    monkeypatch.setattr(storage, "put_bytes", put_then_overwritten)
    with pytest.raises(LeaseHeld, match="winner"):
        racer.acquire()
    assert not racer.held


def test_lease_on_s3(s3_server):
    so = s3_server.storage_options
    root = storage.join(s3_server.bucket("lease-test"), "out")
    lease = Lease(root, so, holder="s3 job", ttl=60).acquire()
    with pytest.raises(LeaseHeld, match="s3 job"):
        Lease(root, so, ttl=60, settle=0).acquire()
    assert lease.renew()
    lease.release("abc")
    assert read_lease(root, so).generation == "abc"


def test_second_encode_job_is_refused_before_any_work(sample_shards, tmp_path, tiny_weights):
    from pipeline.config import config_from_dict
    from pipeline.driver import run_encode

    out = tmp_path / "out"
    running = Lease(str(out), holder="carol@gpu-node-3 pid 4242", ttl=60, settle=0).acquire()
    config = config_from_dict({"input": {"urls": [str(p) for p in sample_shards]}, "output": {"path": str(out)},
                               "model": {"preset": "tiny", "weights": tiny_weights}, "preprocess": {"resolution": 64}})
    with pytest.raises(LeaseHeld, match="carol@gpu-node-3 pid 4242"):
        run_encode(config)
    assert sorted(p.name for p in out.iterdir()) == ["lease"]  # nothing else written
    running.release(None)
