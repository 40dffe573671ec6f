"""dataset.py: LatentDataset's epoch plan (equal ranks, balanced reads), shuffling, sampling,
flipping, buckets, keys; local and S3."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from output_builders import make_manifest, make_rows, write_output
from torch.utils.data import DataLoader

from pipeline import LatentDataset, bucket_batches, storage, writer
from pipeline.commit import scan_output
from pipeline.dataset import DatasetError, resolve_rank
from pipeline.writer import ShardWriter


def _crash(*a, **k):
    raise RuntimeError("killed before commit")


SHARDS = {"00000": 7, "00001": 5, "00002": 1, "00003": 9}


def _keys_over_world(root, so=None, world=2, workers=2, epoch=0, **kw) -> tuple[Counter, list[int]]:
    """Keys seen over all ranks, and how many samples each rank yielded."""
    seen: Counter = Counter()
    per_rank = []
    for rank in range(world):
        ds = LatentDataset(root, storage_options=so, rank=rank, world_size=world, **kw)
        ds.set_epoch(epoch)
        n = 0
        for item in DataLoader(ds, batch_size=None, num_workers=workers):
            seen[item["key"]] += 1
            n += 1
        per_rank.append(n)
    return seen, per_rank


def _reads(ds: LatentDataset, worker: int, workers: int) -> list[tuple[str, int | None, int, int]]:
    """(shard, row group, first row, end row) that one consumer reads, in order."""
    from pipeline.dataset import _Order, _Stream

    plan = ds._current_plan()
    order = _Order(ds.records, ds.seed, plan.epoch, ds.shuffle)
    stream = _Stream(ds, plan, order, ds._consumer(plan, worker, workers), 0)
    out = []
    for _, u, lo, hi in stream.jobs(0, stream.consumer.length):
        unit = order.units[u]
        out.append((unit.shard, unit.row_group, lo, hi))
    return out


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("latents")
    out = {}
    for fmt in ("parquet", "wds"):
        root = str(base / fmt)
        manifest, written = write_output(root, SHARDS, manifest=make_manifest(fmt, "bf16"), row_group_rows=3)
        out[fmt] = (root, manifest, written)
    return out


@pytest.mark.parametrize("fmt", ["parquet", "wds"])
def test_two_workers_two_ranks_cover_every_row_once(tmp_path, fmt, monkeypatch):
    root = str(tmp_path / fmt)
    _, written = write_output(root, SHARDS, manifest=make_manifest(fmt, "bf16"), row_group_rows=3)
    # A shard whose data landed but whose commit did not must not be read, and is reported.
    monkeypatch.setattr(writer, "write_commit", _crash)
    w = ShardWriter(root, "zz-uncommitted", fmt, "bf16", None, make_manifest(fmt, "bf16"))
    w.write(make_rows("zz", 2))
    with pytest.raises(RuntimeError):
        w.commit()
    monkeypatch.undo()
    assert "zz-uncommitted" in scan_output(root).uncommitted  # reported by inspect, never read
    expected = {r.key for rows in written.values() for r in rows}
    seen, per_rank = _keys_over_world(root, epoch=1)
    assert set(seen) == expected  # 22 rows: 11 per rank, nothing padded
    assert set(seen.values()) == {1}
    assert per_rank == [11, 11]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 8, 13, 30])
@pytest.mark.parametrize("workers", [1, 2, 3, 7])
@pytest.mark.parametrize("drop_last", [False, True])
def test_plan_gives_every_rank_one_length(outputs, world, workers, drop_last):
    """Any world size and worker count, consumers outnumbering row groups included: every rank
    gets one length; padding repeats fewer than world_size samples, drop_last drops fewer."""
    root, _, written = outputs["parquet"]
    total = sum(len(r) for r in written.values())
    reads: Counter = Counter()
    lengths = []
    parts = []
    for rank in range(world):
        ds = LatentDataset(root, rank=rank, world_size=world, drop_last=drop_last, shards=list(SHARDS))
        rank_rows = 0
        for w in range(workers):
            jobs = _reads(ds, w, workers)
            parts.append(sum(hi - lo for _, _, lo, hi in jobs))
            rank_rows += parts[-1]
            for shard, rg, lo, hi in jobs:
                reads[(shard, rg)] += 1
                for row in range(lo, hi):
                    reads[(shard, rg, row)] += 1
        lengths.append((rank_rows, len(ds)))
    want = total // world if drop_last else math.ceil(total / world)
    assert lengths == [(want, want)] * world
    rows = Counter({k: v for k, v in reads.items() if len(k) == 3})
    if drop_last:
        assert sum(rows.values()) == world * want > total - world and max(rows.values(), default=1) == 1
    else:
        assert len(rows) == total and sum(rows.values()) - total < world
    # Balanced work: parts differ by at most one sample, and no row group is read twice except
    # where two parts meet inside it (and where the padding wraps around).
    assert max(parts) - min(parts) <= 1
    groups = Counter({k: v for k, v in reads.items() if len(k) == 2})
    assert sum(groups.values()) <= len(groups) + world * workers


def test_issue_example_counts(tmp_path):
    """Shards of 23, 9 and 14 rows: before, per-rank counts were [32, 14] and [32, 14, 0]."""
    root = str(tmp_path / "out")
    write_output(root, {"a": 23, "b": 9, "c": 14}, manifest=make_manifest("parquet", "bf16"), row_group_rows=4)
    for world, workers in ((2, 2), (3, 0), (4, 0)):
        seen, per_rank = _keys_over_world(root, world=world, workers=workers)
        assert per_rank == [math.ceil(46 / world)] * world
        assert len(seen) == 46


def test_epoch_seeded_order(outputs):
    root, _, _ = outputs["parquet"]
    ds = LatentDataset(root, rank=0, world_size=1, shuffle_buffer=4, seed=3, shards=list(SHARDS))

    def order(epoch):
        ds.set_epoch(epoch)
        return [(x["key"], float(x["latent"].sum())) for x in ds]

    a, b, c = order(0), order(0), order(1)
    assert a == b  # same seed and epoch: same order and same posterior noise
    assert [k for k, _ in a] != [k for k, _ in c] and sorted(a) != sorted(c)
    assert sorted(k for k, _ in a) == sorted(k for k, _ in c)
    plain = [x["key"] for x in LatentDataset(root, rank=0, world_size=1, shuffle=False, shards=list(SHARDS))]
    assert plain == sorted(plain)


def test_noise_and_flip_do_not_depend_on_world_size(outputs):
    root, _, _ = outputs["parquet"]

    def items(world, workers):
        out = {}
        for rank in range(world):
            ds = LatentDataset(root, rank=rank, world_size=world, shards=list(SHARDS), drop_last=True)
            for x in DataLoader(ds, batch_size=None, num_workers=workers):
                out[x["key"]] = (x["flipped"], x["latent"])
        return out

    one, three = items(1, 0), items(3, 2)
    assert set(three) <= set(one) and len(three) == 21
    for key, (flipped, latent) in three.items():
        assert flipped == one[key][0]
        torch.testing.assert_close(latent, one[key][1])


def test_scaling_sampling_and_flip(outputs):
    root, manifest, written = outputs["parquet"]
    rows = {r.key: r for rs in written.values() for r in rs}
    kw = dict(rank=0, world_size=1, shards=list(SHARDS))
    raw = {x["key"]: x for x in LatentDataset(root, scale=False, sample=False, flip=False, **kw)}
    for key, x in raw.items():
        assert not x["flipped"]
        np.testing.assert_allclose(x["latent"].numpy(), rows[key].latent, atol=0.05)
        assert x["original_size"].tolist() == list(rows[key].original_size)
        assert x["caption"] == (rows[key].caption or "")
    scaled = {x["key"]: x for x in LatentDataset(root, sample=False, flip=False, **kw)}
    for key, x in scaled.items():
        want = (raw[key]["latent"] - manifest.shift_factor) * manifest.scaling_factor
        torch.testing.assert_close(x["latent"], want)
    sampled = list(LatentDataset(root, scale=False, flip=False, **kw))
    # mean + exp(logvar / 2) * eps: the standardized residuals are standard normal.
    eps = np.concatenate([((x["latent"] - raw[x["key"]]["latent"]).numpy() / np.exp(rows[x["key"]].logvar / 2)).ravel()
                          for x in sampled])
    assert abs(eps.mean()) < 0.1 and 0.9 < eps.std() < 1.1
    flips = [x["flipped"] for x in LatentDataset(root, scale=False, sample=False, **kw)]
    assert 0.2 < np.mean(flips) < 0.8
    for x in LatentDataset(root, scale=False, sample=False, **kw):
        want = rows[x["key"]].latent_flip if x["flipped"] else rows[x["key"]].latent
        np.testing.assert_allclose(x["latent"].numpy(), want, atol=0.05)


def test_rank_resolution(monkeypatch, outputs):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert resolve_rank() == (1, 3)
    assert resolve_rank(0, 2) == (0, 2)
    root, _, _ = outputs["parquet"]
    ds = LatentDataset(root)
    assert (ds.rank, ds.world_size) == (1, 3)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert resolve_rank() == (0, 1)
    with pytest.raises(DatasetError, match="rank 2"):
        resolve_rank(2, 2)
    with pytest.raises(DatasetError, match="not committed: nope"):
        LatentDataset(root, shards=["nope"], rank=0, world_size=1)
    with pytest.raises(DatasetError, match="on_error"):
        LatentDataset(root, on_error="ignore")


def _bucket_output(tmp_path, shards):
    root = str(tmp_path / "buckets")
    shapes = ((4, 4, 6), (4, 6, 4), (4, 4, 4))
    write_output(root, shards, manifest=make_manifest(dtype="fp16", shapes=shapes))
    return root


def test_bucket_batches(tmp_path):
    root = _bucket_output(tmp_path, {"a": 10, "b": 7})
    ds = LatentDataset(root, rank=0, world_size=1)
    batches = list(bucket_batches(ds, 3))
    assert sum(len(b["key"]) for b in batches) == 17
    for b in batches:
        assert b["latent"].ndim == 4 and b["latent"].shape[0] == len(b["key"]) <= 3
        assert b["original_size"].shape == (len(b["key"]), 2)
    full = list(bucket_batches(ds, 3, drop_last=True))
    assert all(len(b["key"]) == 3 for b in full)
    # One rank: nothing to equalize, every sample once.
    loader = DataLoader(ds.batched(4), batch_size=None, num_workers=2)
    keys = [k for b in loader for k in b["key"]]
    assert len(keys) == len(set(keys)) == 17
    # The generic form groups any iterable of samples.
    assert sum(len(b) for b in bucket_batches(iter(list(ds)), 5, collate_fn=None)) == 17


@pytest.mark.parametrize("drop_last", [False, True])
def test_bucket_batches_equal_per_rank(tmp_path, drop_last):
    """Aspect buckets make data-dependent batch counts; every rank still gets the same number."""
    root = _bucket_output(tmp_path, {"a": 23, "b": 9, "c": 14})
    for world, workers in ((2, 0), (3, 2), (4, 0)):
        counts, keys = [], Counter()
        for rank in range(world):
            ds = LatentDataset(root, rank=rank, world_size=world)
            batches = list(DataLoader(ds.batched(3, drop_last=drop_last), batch_size=None, num_workers=workers))
            counts.append(len(batches))
            for b in batches:
                assert len(set(tuple(x.shape) for x in b["latent"])) == 1
                assert len(b["key"]) == 3 or not drop_last
                keys.update(b["key"])
        assert len(set(counts)) == 1, (world, workers, counts)
        if not drop_last:
            assert len(keys) == 46  # padding repeats, nothing skipped


def test_s3_dataset_with_workers(s3_server):
    so = s3_server.storage_options
    for fmt in ("parquet", "wds"):
        root = storage.join(s3_server.bucket("dataset-test"), fmt)
        _, written = write_output(root, {"a": 4, "b": 3, "c": 2}, manifest=make_manifest(fmt, "fp16"),
                                  storage_options=so, row_group_rows=2)
        seen, per_rank = _keys_over_world(root, so, world=2, workers=2)
        assert set(seen) == {r.key for rs in written.values() for r in rs}
        assert per_rank == [5, 5] and sum(seen.values()) == 10  # 9 rows, one repeat


@pytest.mark.parametrize("fmt", ["parquet", "wds"])
def test_keys_keep_only_those_samples(outputs, fmt, monkeypatch):
    import pyarrow.parquet as pq

    root, _, written = outputs[fmt]
    # Shard 00003 has 9 rows in row groups of 3: keys in its first and last group only.
    wanted = {written["00003"][0].key, written["00003"][8].key, written["00001"][4].key}
    reads: list[tuple[int, tuple[str, ...]]] = []
    original = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kw):
        reads.append((i, tuple(columns or ())))
        return original(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    seen, _ = _keys_over_world(root, world=2, workers=0, keys=wanted, shards=["00001", "00003"])
    assert seen == Counter({k: 1 for k in wanted})  # keys are never padded

    # The latents are the ones stored for those keys.
    reads.clear()
    ds = LatentDataset(root, rank=0, world_size=1, keys=wanted, scale=False, sample=False, flip=False,
                       shards=list(SHARDS))
    got = {item["key"]: item["latent"].numpy() for item in ds}
    rows = {r.key: r for name in written for r in written[name]}
    assert set(got) == wanted
    for key, latent in got.items():
        np.testing.assert_allclose(latent, rows[key].latent, atol=0.02, rtol=0.02)  # bf16 storage
    if fmt == "parquet":
        full = [r for r in reads if len(r[1]) > 1]
        key_only = [r for r in reads if r[1] == ("key",)]
        # Every row group (3 + 2 + 1 + 3) is looked at by its key column; only the 3 holding a
        # wanted key are read whole.
        assert len(key_only) == 9 and len(full) == 3
    with pytest.raises(DatasetError, match="keys= has no resumable state"):
        ds.state_dict()
