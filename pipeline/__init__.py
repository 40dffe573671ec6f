"""Distributed latent precomputation: WebDataset shards in, latent shards + commits out.

The public API is loaded lazily, so `import pipeline` stays light (no Ray, no torch) until a
name is used.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__all__ = [
    "LatentDataset",
    "bucket_batches",
    "Manifest",
    "ManifestMismatch",
    "CommitRecord",
    "ChannelStats",
    "ShardWriter",
    "LatentRow",
    "ErrorRow",
    "QARow",
    "read_manifest",
    "committed_names",
    "is_committed",
    "ShardIndex",
    "load_index",
]

_EXPORTS = {
    "LatentDataset": "dataset",
    "bucket_batches": "dataset",
    "Manifest": "manifest",
    "ManifestMismatch": "manifest",
    "read_manifest": "manifest",
    "CommitRecord": "commit",
    "ChannelStats": "commit",
    "committed_names": "commit",
    "is_committed": "commit",
    "ShardIndex": "index",
    "load_index": "index",
    "ShardWriter": "writer",
    "LatentRow": "rows",
    "ErrorRow": "rows",
    "QARow": "rows",
}

if TYPE_CHECKING:
    from .commit import ChannelStats, CommitRecord, committed_names, is_committed
    from .dataset import LatentDataset, bucket_batches
    from .index import ShardIndex, load_index
    from .manifest import Manifest, ManifestMismatch, read_manifest
    from .rows import ErrorRow, LatentRow, QARow
    from .writer import ShardWriter


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
