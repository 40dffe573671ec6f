"""dataset.py resume: StatefulDataLoader resumes exactly without reading what came before, and a
sample count taken at one world size resumes at another without repeats or skips."""

from __future__ import annotations

from collections import Counter

import pyarrow.parquet as pq
import pytest
import torch
from output_builders import make_manifest, write_output
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from pipeline.dataset import DatasetError, LatentDataset

ROWS = {"a": 23, "b": 9, "c": 14}


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("resume") / "out")
    write_output(root, ROWS, manifest=make_manifest("parquet", "bf16"), row_group_rows=4)
    return root


@pytest.fixture(scope="module")
def buckets(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("resume-buckets") / "out")
    write_output(root, ROWS, manifest=make_manifest("parquet", "fp16", shapes=((4, 4, 6), (4, 6, 4), (4, 4, 4))))
    return root


def _batches(loader) -> list[tuple[list[str], torch.Tensor]]:
    return [(b["key"], b["latent"]) for b in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(ka == kb and torch.equal(la, lb) for (ka, la), (kb, lb) in zip(a, b))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("batched", [False, True])
def test_stateful_dataloader_resumes_exactly(output, buckets, workers, batched):
    root = buckets if batched else output

    def loader():
        ds = LatentDataset(root, rank=1, world_size=2, shuffle_buffer=5)
        ds.set_epoch(3)
        if batched:
            return StatefulDataLoader(ds.batched(3), batch_size=None, num_workers=workers)
        return StatefulDataLoader(ds, batch_size=3, num_workers=workers)

    full = _batches(loader())
    for stop in (1, 4, len(full) - 1):
        first = loader()
        it = iter(first)
        head = [next(it) for _ in range(stop)]
        state = first.state_dict()
        del it
        again = loader()
        again.load_state_dict(state)
        rest = _batches(again)
        assert _same([(b["key"], b["latent"]) for b in head] + rest, full), stop


def test_resume_reads_nothing_before_its_block(output, monkeypatch):
    """A resume at 90% of the epoch reads the last block's row groups, not the epoch's."""
    reads: list[int] = []
    original = pq.ParquetFile.iter_batches

    def spy(self, batch_size=65536, row_groups=None, **kw):
        reads.extend(row_groups)
        return original(self, batch_size, row_groups=row_groups, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    ds = LatentDataset(output, rank=0, world_size=1, shuffle_buffer=4)
    loader = StatefulDataLoader(ds, batch_size=2)
    it = iter(loader)
    full_items = [next(it) for _ in range(21)]  # 42 of 46 samples
    state = loader.state_dict()
    list(it)
    epoch_reads = len(reads)
    reads.clear()
    again = StatefulDataLoader(LatentDataset(output, rank=0, world_size=1, shuffle_buffer=4), batch_size=2)
    again.load_state_dict(state)
    rest = list(again)
    assert len(full_items) + len(rest) == 23
    assert 0 < len(reads) <= 2 and epoch_reads >= 12


def _consume(root, world, workers, batch, batches, epoch, **kw) -> Counter:
    """Keys that `world` ranks consumed in their first `batches` batches of `epoch`."""
    seen: Counter = Counter()
    for rank in range(world):
        ds = LatentDataset(root, rank=rank, world_size=world, **kw)
        ds.set_epoch(epoch)
        it = iter(DataLoader(ds, batch_size=batch, num_workers=workers))
        for _ in range(batches):
            seen.update(next(it)["key"])
        del it
    return seen


def _rest(root, world, workers, state, **kw) -> tuple[Counter, list[int]]:
    seen: Counter = Counter()
    per_rank = []
    for rank in range(world):
        ds = LatentDataset(root, rank=rank, world_size=world, **kw)
        ds.load_state_dict(state)
        ds.set_epoch(state["epoch"])  # the usual loop calls it; the loaded epoch keeps its position
        n = 0
        for b in DataLoader(ds, batch_size=4, num_workers=workers):
            seen.update(b["key"])
            n += len(b["key"])
        assert n == len(ds)
        per_rank.append(n)
    return seen, per_rank


@pytest.mark.parametrize("new_workers", [0, 2])
def test_elastic_resume_two_to_three_ranks(output, new_workers):
    batch, workers, steps = 4, 2, 3
    before = _consume(output, 2, workers, batch, steps, epoch=1)
    samples_seen = 2 * steps * batch
    assert sum(before.values()) == samples_seen == len(before)
    ds = LatentDataset(output, rank=0, world_size=2)
    ds.set_epoch(1)
    state = ds.state_dict(samples_seen, batch_size=batch, num_workers=workers)
    after, per_rank = _rest(output, 3, new_workers, state)
    assert not set(after) & set(before)  # nothing consumed is read again
    assert set(after) | set(before) == {f"{s}-{i:05d}" for s, n in ROWS.items() for i in range(n)}
    left = 46 - samples_seen
    assert per_rank == [-(-left // 3)] * 3 and sum(after.values()) - left < 3  # padding only

    # Twice in one epoch: 3 ranks consume some more, then 4 ranks finish it.
    more = Counter()
    for rank in range(3):
        d = LatentDataset(output, rank=rank, world_size=3)
        d.load_state_dict(state)
        it = iter(DataLoader(d, batch_size=2, num_workers=0))
        more.update(next(it)["key"])
        del it
    d = LatentDataset(output, rank=0, world_size=3)
    d.load_state_dict(state)
    state2 = d.state_dict(samples_seen + 6, batch_size=2, num_workers=0)
    final, _ = _rest(output, 4, 0, state2)
    assert not set(final) & (set(before) | set(more))
    assert set(final) | set(before) | set(more) == set(after) | set(before)


def test_elastic_state_errors(output):
    ds = LatentDataset(output, rank=0, world_size=2)
    with pytest.raises(DatasetError, match="ends inside a batch"):
        LatentDataset(output, rank=0, world_size=3).load_state_dict(ds.state_dict(10, batch_size=4))
    with pytest.raises(DatasetError, match="does not fit the epoch"):
        LatentDataset(output, rank=0, world_size=3).load_state_dict(ds.state_dict(48, batch_size=4))
    with pytest.raises(DatasetError, match="cannot resume rank 0 of 3"):
        LatentDataset(output, rank=0, world_size=3).load_state_dict(ds.state_dict())
    other = LatentDataset(output, rank=0, world_size=2, shards=["a", "b"])
    with pytest.raises(DatasetError, match="another shard list"):
        other.load_state_dict(ds.state_dict())
    # A position holds for its epoch only.
    ds.load_state_dict(LatentDataset(output, rank=0, world_size=2).state_dict(8, batch_size=4))
    assert len(ds) == 19
    ds.set_epoch(1)
    assert len(ds) == 23
