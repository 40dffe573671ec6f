"""QA selection: the k keys with the smallest sha1, whatever the order they come in."""

from __future__ import annotations

import hashlib
import random

import numpy as np

from pipeline.qa_select import QASelector, qa_per_shard
from pipeline.rows import QARow


def _row(key: str) -> QARow:
    return QARow(key=key, source="s.tar", pixels=np.zeros((8, 8, 3), np.uint8), latent=np.zeros((4, 1, 1), np.float32),
                 bucket="8x8")


def test_keeps_the_smallest_hashes_in_any_order():
    keys = [f"key{i:03d}" for i in range(50)]
    expected = sorted(keys, key=lambda k: hashlib.sha1(k.encode()).digest())[:5]
    for seed in range(3):
        order = keys[:]
        random.Random(seed).shuffle(order)
        selector = QASelector(5)
        built = []
        for key in order:
            selector.offer(key, lambda k=key, seen=built: seen.append(k) or _row(k))
        assert [r.key for r in selector.rows()] == expected
        assert len(built) < len(keys)  # a row is built only for a sample kept when it is offered


def test_none_kept_and_quota():
    selector = QASelector(0)
    selector.offer("a", lambda: _row("a"))
    assert selector.rows() == []
    assert [qa_per_shard(64, 3), qa_per_shard(8, 16), qa_per_shard(0, 3), qa_per_shard(5, 0)] == [22, 1, 0, 5]
