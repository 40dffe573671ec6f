"""ShardBatcher: one target size per batch, a deterministic order, bad samples reported in shard order."""

from __future__ import annotations

import io

import pytest
from conftest import sample_photos

from pipeline.batcher import ShardBatcher
from pipeline.decode import DecodeOptions
from pipeline.decodepool import DecodePool
from pipeline.preprocess import Preprocessor
from pipeline.reader import Sample, SampleError

pytestmark = pytest.mark.timeout(120)

BUCKETS = [(64, 64), (48, 96), (96, 48)]


def _jpeg(img, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    img.resize(size).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _samples() -> list[Sample | SampleError]:
    """17 photos of three aspect ratios, with a corrupt image, a read error and a non-image between."""
    photos = [img for _, img in sample_photos(count=3)]
    shapes = [(96, 96), (128, 64), (64, 128)]
    items: list[Sample | SampleError] = []
    for i in range(17):
        data = _jpeg(photos[i % 3], shapes[(i * 7) % 3])
        items.append(Sample(f"k{i:02d}", len(items), data, "jpg", None, "{}"))
        if i == 2:
            items.append(Sample("broken", len(items), data[:200], "jpg", None, "{}"))
        if i == 8:
            items.append(SampleError("nocap", len(items), "no_image", "no image member"))
        if i == 11:
            items.append(Sample("notimg", len(items), b"hello", "jpg", None, "{}"))
    return items


def _run(mode: str, batch_size: int):
    pool = DecodePool(2, mode, DecodeOptions(), Preprocessor(BUCKETS))
    errors = []
    try:
        batcher = ShardBatcher(_samples(), "shard.tar", pool, batch_size, on_error=errors.append)
        batches = [[(s.key, p.target_size) for s, p in batch] for batch in batcher]
    finally:
        pool.close()
    return batches, errors, batcher.decode_wait


def test_batches_hold_one_size_and_every_good_sample_once():
    batches, errors, decode_wait = _run("threads", 3)
    assert all(1 <= len(b) <= 3 and len({size for _, size in b}) == 1 for b in batches)
    keys = [key for b in batches for key, _ in b]
    assert sorted(keys) == [f"k{i:02d}" for i in range(17)]
    assert {size for b in batches for _, size in b} == set(BUCKETS)
    # Bad samples reach the callback in shard order, whichever stage found them.
    assert [(e.key, e.stage, e.error, e.source) for e in errors] == [
        ("broken", "decode", "corrupt", "shard.tar"), ("nocap", "read", "no_image", "shard.tar"),
        ("notimg", "decode", "not_an_image", "shard.tar")]
    assert decode_wait >= 0


def test_the_order_does_not_depend_on_the_decode_mode():
    threads = _run("threads", 2)[:2]
    processes = _run("processes", 2)[:2]
    assert threads == processes
