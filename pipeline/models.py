"""Loading the autoencoder a job's `model` section names (shared by the encode workers and QA),
and checking its weights before a job starts (`check_weights`)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import struct
import tempfile
import warnings
import zipfile
from typing import Any

from . import storage
from .config import ConfigError, ModelConfig

__all__ = ["check_weights", "load_model", "local_weights"]

#: Largest safetensors header taken as real (the format's own readers refuse 100 MB and more).
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def load_model(model: ModelConfig) -> Any:
    """The `latentae.AutoencoderKL` of `model`: a preset, its weights, or a checkpoint (local or any fsspec URL)."""
    from latentae import AutoencoderKL

    weights = local_weights(model.weights, model.storage_options) if model.weights else None
    if model.preset:
        return AutoencoderKL.from_preset(model.preset, weights=weights)
    return AutoencoderKL.from_pretrained(weights)


def local_weights(url: str, storage_options: dict[str, Any] | None = None, key: str = "model.weights") -> str:
    """A local path for `url`: weights on remote storage are copied once per machine and version.

    The copy is kept under the temp dir, keyed by the URL and by what the store says of the
    files (names, sizes, ETags or modification times), so weights replaced at the same URL are
    fetched again. Several processes of one machine may download at once: each into its own
    partial path, and the first rename wins. `key` is the config key named when nothing is there.
    """
    fs, path = storage.filesystem(url, storage_options or {})
    if storage.is_local(fs):
        return path
    version = hashlib.sha1(url.encode())
    is_dir = fs.isdir(path)
    files = fs.find(path, detail=True) if is_dir else {path: fs.info(path)}
    if not files:
        raise FileNotFoundError(f"{key}: nothing found at {storage.redact(url)}")
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


def check_weights(model: ModelConfig) -> None:
    """Raise ConfigError naming `model.weights` when the encode workers could not load it.

    Run by the driver before Ray starts, so a mistake costs one line instead of a worker start-up
    failure on every node. Local weights must exist, be readable and be a known safe format: a
    diffusers folder (``config.json`` + ``diffusion_pytorch_model.*``, or a ``vae/`` subfolder of
    them), a ``.safetensors`` file whose header parses, or a ``.ckpt``/``.pt``/``.pth``/``.bin``
    pickle that the weights-only loader accepts (tensors and plain containers; any other object
    could run code). Remote weights must exist and have a known suffix; their bytes are checked
    where they are loaded. Tensor names and shapes are the workers' to check.
    """
    if not model.weights:
        return
    fs, path = storage.filesystem(model.weights, model.storage_options)
    shown = storage.redact(model.weights)
    if not storage.is_local(fs):
        try:
            info = fs.info(path)
        except FileNotFoundError:
            raise ConfigError("model.weights", f"{shown} does not exist") from None
        except Exception as e:  # storage clients raise their own types (e.g. botocore errors)
            raise ConfigError("model.weights", storage.redact(f"cannot read {shown}: {type(e).__name__}: {e}")) from None
        if info.get("type") != "directory":
            _known_suffix(path, shown)
        return
    if not os.path.exists(path):
        where = "" if path == model.weights else f" (looked for {storage.redact(path)})"
        raise ConfigError("model.weights", f"{shown} does not exist{where}")
    if os.path.isdir(path):
        path = _diffusers_weights(path, shown)
    _check_local_file(path, storage.redact(path))


def _diffusers_weights(folder: str, shown: str) -> str:
    """The weights file of a diffusers folder, as `latentae` picks it."""
    from latentae.checkpoint import DIFFUSERS_WEIGHT_NAMES

    for sub in (folder, os.path.join(folder, "vae")):
        if os.path.isfile(os.path.join(sub, "config.json")):
            for name in DIFFUSERS_WEIGHT_NAMES:
                if os.path.isfile(os.path.join(sub, name)):
                    return os.path.join(sub, name)
            raise ConfigError("model.weights", f"{shown}: no weights file in the diffusers folder "
                                               f"(looked for {', '.join(DIFFUSERS_WEIGHT_NAMES)})")
    raise ConfigError("model.weights", f"{shown} is a folder but not a diffusers autoencoder folder "
                                       "(no config.json, nor vae/config.json)")


def _known_suffix(path: str, shown: str) -> str:
    from latentae.checkpoint import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES

    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise ConfigError("model.weights", f"{shown} is not a known weights format: expected a diffusers folder or "
                                           f"a {', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)} file")
    return suffix


def _check_local_file(path: str, shown: str) -> None:
    from latentae.checkpoint import SAFETENSORS_SUFFIXES

    suffix = _known_suffix(path, shown)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = os.fstat(f.fileno()).st_size
            if suffix in SAFETENSORS_SUFFIXES:
                _check_safetensors(f, head, size, shown)
                return
    except OSError as e:
        raise ConfigError("model.weights", f"cannot read {shown}: {e.strerror or e}") from None
    _check_pickle(path, shown)


def _check_safetensors(f: Any, head: bytes, size: int, shown: str) -> None:
    """The header: 8 bytes of little-endian length, then that many bytes of a JSON object."""
    length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    if not 2 <= length <= min(size - 8, _MAX_SAFETENSORS_HEADER):
        raise ConfigError("model.weights", f"{shown} is not a safetensors file (its header is damaged or missing)")
    try:
        header = json.loads(f.read(length))
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise ConfigError("model.weights", f"{shown} is not a safetensors file (its header is not a JSON object)")


def _check_pickle(path: str, shown: str) -> None:
    """A torch checkpoint whose pickle the weights-only loader accepts.

    Zip checkpoints (every `torch.save` since 1.6) are checked from their small pickle alone,
    without reading a tensor; an old single-pickle file is loaded weights-only, as a worker would.
    """
    import torch

    refuse = ("is refused: its pickle needs objects other than tensors and plain containers ({}), which "
              "could run code when loaded; convert it to .safetensors in a trusted environment")
    if zipfile.is_zipfile(path):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as e:  # a damaged archive: torch raises many types for that
            raise ConfigError("model.weights", f"{shown} is not a readable torch checkpoint: "
                                               f"{type(e).__name__}: {e}") from None
        if unsafe:
            raise ConfigError("model.weights", f"{shown} " + refuse.format(", ".join(unsafe[:3])))
        return
    with open(path, "rb") as f:
        if f.read(1) != b"\x80":  # every pickle protocol torch writes starts with PROTO
            raise ConfigError("model.weights", f"{shown} is neither a torch checkpoint nor a pickle")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols it reads anyway
            torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph; what was refused is a GLOBAL or an unsupported opcode.
        found = (re.search(r"GLOBAL ([\w.]+)", str(e))
                 or re.search(r"WeightsUnpickler error:\s*([^\n]+?)(?:\. |$)", str(e), re.MULTILINE))
        what = found.group(1) if found else type(e).__name__
        raise ConfigError("model.weights", f"{shown} " + refuse.format(what)) from None
    except Exception as e:  # a damaged file: torch raises many types for that
        raise ConfigError("model.weights", f"{shown} is not a readable torch checkpoint: "
                                           f"{type(e).__name__}: {e}") from None
