"""dataset.py: LatentDataset splitting, shuffling, sampling, flipping, buckets; local and S3."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from test_format_common import make_manifest, make_rows, write_output
from torch.utils.data import DataLoader

from pipeline import LatentDataset, bucket_batches, storage, writer
from pipeline.commit import scan_output
from pipeline.dataset import DatasetError, resolve_rank
from pipeline.writer import ShardWriter


def _crash(*a, **k):
    raise RuntimeError("killed before commit")


SHARDS = {"00000": 7, "00001": 5, "00002": 1, "00003": 9}


def _keys_over_world(root, so=None, world=2, workers=2, epoch=0, **kw) -> Counter:
    seen: Counter = Counter()
    for rank in range(world):
        ds = LatentDataset(root, storage_options=so, rank=rank, world_size=world, **kw)
        ds.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=None, num_workers=workers)
        for item in loader:
            seen[item["key"]] += 1
    return seen


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
def test_two_workers_two_ranks_cover_every_row_once(outputs, fmt, monkeypatch):
    root, _, written = outputs[fmt]
    # A shard whose data landed but whose commit did not must not be read.
    monkeypatch.setattr(writer, "write_commit", _crash)
    w = ShardWriter(root, "zz-uncommitted", fmt, "bf16", None, make_manifest(fmt, "bf16"))
    w.write(make_rows("zz", 2))
    with pytest.raises(RuntimeError):
        w.commit()
    monkeypatch.undo()
    assert "zz-uncommitted" in scan_output(root).uncommitted
    expected = {r.key for rows in written.values() for r in rows}
    seen = _keys_over_world(root, epoch=1)
    assert set(seen) == expected
    assert set(seen.values()) == {1}


def test_split_is_exact_for_any_consumer_count(outputs):
    root, _, written = outputs["parquet"]
    ds = LatentDataset(root, rank=0, world_size=1)
    total = sum(len(r) for r in written.values())
    for consumers in (1, 2, 3, 5, 8, 20):
        rows = [u[2] for c in range(consumers) for u in ds.units_for(c, consumers)]
        assert sum(rows) == total
    assert ds.num_rows == total


def test_epoch_seeded_order(outputs):
    root, _, _ = outputs["parquet"]
    ds = LatentDataset(root, rank=0, world_size=1, shuffle_buffer=4, seed=3)

    def order(epoch):
        ds.set_epoch(epoch)
        return [(x["key"], float(x["latent"].sum())) for x in ds]

    a, b, c = order(0), order(0), order(1)
    assert a == b  # same seed and epoch: same order and same posterior noise
    assert [k for k, _ in a] != [k for k, _ in c] and sorted(a) != sorted(c)
    assert sorted(k for k, _ in a) == sorted(k for k, _ in c)
    plain = [x["key"] for x in LatentDataset(root, rank=0, world_size=1, shuffle=False)]
    assert plain == sorted(plain)


def test_scaling_sampling_and_flip(outputs):
    root, manifest, written = outputs["parquet"]
    rows = {r.key: r for rs in written.values() for r in rs}
    raw = {x["key"]: x for x in LatentDataset(root, rank=0, world_size=1, scale=False, sample=False, flip=False)}
    for key, x in raw.items():
        assert not x["flipped"]
        np.testing.assert_allclose(x["latent"].numpy(), rows[key].latent, atol=0.05)
        assert x["original_size"].tolist() == list(rows[key].original_size)
        assert x["caption"] == (rows[key].caption or "")
    scaled = {x["key"]: x for x in LatentDataset(root, rank=0, world_size=1, sample=False, flip=False)}
    for key, x in scaled.items():
        want = (raw[key]["latent"] - manifest.shift_factor) * manifest.scaling_factor
        torch.testing.assert_close(x["latent"], want)
    sampled = list(LatentDataset(root, rank=0, world_size=1, scale=False, flip=False))
    diffs = [float((x["latent"] - raw[x["key"]]["latent"]).abs().max()) for x in sampled]
    assert 0 < max(diffs) < 1.0  # std = exp(-2) noise around the mean
    flips = [x["flipped"] for x in LatentDataset(root, rank=0, world_size=1, scale=False, sample=False)]
    assert 0.2 < np.mean(flips) < 0.8
    for x in LatentDataset(root, rank=0, world_size=1, scale=False, sample=False):
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


def test_bucket_batches(tmp_path):
    root = str(tmp_path / "buckets")
    shapes = ((4, 4, 6), (4, 6, 4), (4, 4, 4))
    write_output(root, {"a": 10, "b": 7}, manifest=make_manifest(dtype="fp16", shapes=shapes))
    ds = LatentDataset(root, rank=0, world_size=1)
    batches = list(bucket_batches(ds, 3))
    assert sum(len(b["key"]) for b in batches) == 17
    for b in batches:
        assert b["latent"].ndim == 4 and b["latent"].shape[0] == len(b["key"]) <= 3
        assert b["original_size"].shape == (len(b["key"]), 2)
    full = list(bucket_batches(ds, 3, drop_last=True))
    assert all(len(b["key"]) == 3 for b in full)
    loader = DataLoader(ds.batched(4), batch_size=None, num_workers=2)
    keys = [k for b in loader for k in b["key"]]
    assert len(keys) == len(set(keys)) == 17


def test_s3_dataset_with_workers(s3_server):
    so = s3_server.storage_options
    for fmt in ("parquet", "wds"):
        root = storage.join(s3_server.bucket("dataset-test"), fmt)
        _, written = write_output(root, {"a": 4, "b": 3, "c": 2}, manifest=make_manifest(fmt, "fp16"),
                                  storage_options=so, row_group_rows=2)
        seen = _keys_over_world(root, so, world=2, workers=2)
        assert set(seen) == {r.key for rs in written.values() for r in rs}
        assert set(seen.values()) == {1}


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
    seen = _keys_over_world(root, world=2, workers=0, keys=wanted, shards=["00001", "00003"])
    assert seen == Counter({k: 1 for k in wanted})

    # The latents are the ones stored for those keys.
    ds = LatentDataset(root, rank=0, world_size=1, keys=wanted, scale=False, sample=False, flip=False)
    got = {item["key"]: item["latent"].numpy() for item in ds}
    rows = {r.key: r for name in written for r in written[name]}
    assert set(got) == wanted
    for key, latent in got.items():
        np.testing.assert_allclose(latent, rows[key].latent, atol=0.02, rtol=0.02)  # bf16 storage
    if fmt == "parquet":
        full = [r for r in reads if len(r[1]) > 1]
        key_only = [r for r in reads if r[1] == ("key",)]
        # Every row group is looked at by its key column (2 + 3 in the first pass over two shards,
        # 3 + 2 + 1 + 3 in the second over all four); only the 3 holding a wanted key are read
        # whole, in each pass.
        assert len(key_only) == 5 + 9 and len(full) == 3 + 3
