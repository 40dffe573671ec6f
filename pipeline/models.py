"""Loading the autoencoder a job's `model` section names (shared by the encode workers and QA)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Any

from . import storage
from .config import ModelConfig

__all__ = ["load_model", "local_weights"]


def load_model(model: ModelConfig) -> Any:
    """The `latentae.AutoencoderKL` of `model`: a preset, its weights, or a checkpoint (local or any fsspec URL)."""
    from latentae import AutoencoderKL

    weights = local_weights(model.weights, model.storage_options) if model.weights else None
    if model.preset:
        return AutoencoderKL.from_preset(model.preset, weights=weights)
    return AutoencoderKL.from_pretrained(weights)


def local_weights(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """A local path for `url`: weights on remote storage are copied once per machine and version.

    The copy is kept under the temp dir, keyed by the URL and by what the store says of the
    files (names, sizes, ETags or modification times), so weights replaced at the same URL are
    fetched again. Several processes of one machine may download at once: each into its own
    partial path, and the first rename wins.
    """
    fs, path = storage.filesystem(url, storage_options or {})
    if storage.is_local(fs):
        return path
    version = hashlib.sha1(url.encode())
    is_dir = fs.isdir(path)
    files = fs.find(path, detail=True) if is_dir else {path: fs.info(path)}
    if not files:
        raise FileNotFoundError(f"model.weights: nothing found at {storage.redact(url)}")
    for name in sorted(files):
        info = files[name]
        stamp = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""
        version.update(f"\0{name}\0{info.get('size')}\0{stamp}".encode())
    cache = os.path.join(tempfile.gettempdir(), "latent-weights", version.hexdigest()[:16])
    target = os.path.join(cache, os.path.basename(path.rstrip("/")))
    if not os.path.exists(target):
        os.makedirs(cache, exist_ok=True)
        partial = f"{target}.{os.getpid()}.partial"
        fs.get(path, partial, recursive=is_dir)
        try:
            os.replace(partial, target)
        except OSError:
            if not os.path.exists(target):
                raise
            shutil.rmtree(partial, ignore_errors=True)  # another process finished first
    return target
