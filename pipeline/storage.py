"""Storage access for any fsspec URL, with whole-object writes and credential redaction.

Every object this project publishes (shards, ledgers, commit records, manifests) goes through
`put_bytes` or `put_file`. Both make the object appear complete or not at all:

* local disk: write a temporary file next to the target, fsync, then `os.replace` (atomic on POSIX);
* object stores: one whole-object upload (a single PUT, or a multipart upload that only becomes
  visible when completed). We never stream into `fs.open(path, "wb")` for published objects,
  because an exception inside that context manager still finalizes and uploads the partial bytes.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any, BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = [
    "StorageError",
    "filesystem",
    "is_local",
    "put_bytes",
    "put_file",
    "read_bytes",
    "read_many",
    "exists",
    "size",
    "remove",
    "list_files",
    "open_input",
    "redact",
    "redact_options",
    "join",
]

# Remote reads use a large block with background prefetch of the next block: object stores have
# high per-request latency but high throughput, so few large ranged GETs beat many small ones.
REMOTE_BLOCK_SIZE = 16 * 1024 * 1024


class StorageError(OSError):
    """A storage operation failed; the message names the (redacted) URL."""


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return `(fs, path)` for `url`; `storage_options` go to the filesystem constructor."""
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fs, path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local disk filesystem, where atomic renames are available."""
    return isinstance(fs, LocalFileSystem)


def _fsync_dir(path: str) -> None:
    # Make the rename itself durable; not all platforms allow opening a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file: 0o666 less the process umask."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


# Read once at import, before any writer thread runs (changing the umask is process-wide).
_FILE_MODE = _file_mode()


def _local_temp(path: str) -> tuple[int, str]:
    """A temp file beside `path`, with the mode a file created in place would have.

    mkstemp creates 0600 files; published shards and reports must follow the umask like any
    other file the user writes (readable by the group that reads the dataset).
    """
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.fchmod(fd, _FILE_MODE)
    return fd, tmp


def _publish_local(path: str, fill: Callable[[BinaryIO], object]) -> None:
    """Write the local file `path` whole: `fill` writes a temp file beside it, fsynced, then renamed over `path`.

    Readers see the old file or the new one, never a part of it.
    """
    fd, tmp = _local_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    _fsync_dir(os.path.dirname(path))


def put_bytes(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write `data` as the whole object at `url`, atomically (see module docstring)."""
    fs, path = filesystem(url, storage_options)
    try:
        if is_local(fs):
            _publish_local(path, lambda f: f.write(data))
        else:
            fs.pipe_file(path, bytes(data))
            fs.invalidate_cache(path)
    except OSError as e:
        raise StorageError(f"could not write {redact(url)}: {e}") from e


def put_file(
    local_path: str | os.PathLike,
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    move: bool = False,
) -> None:
    """Publish the local file `local_path` as the whole object at `url`, atomically.

    With `move=True` the local file may be consumed (renamed into place when on the same disk).
    """
    local_path = os.fspath(local_path)
    fs, path = filesystem(url, storage_options)
    try:
        if is_local(fs):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            if move:
                try:
                    os.chmod(local_path, _FILE_MODE)
                    os.replace(local_path, path)
                    _fsync_dir(os.path.dirname(path))
                    return
                except OSError:
                    pass  # different device: fall back to copy + rename

            def copy(dst: BinaryIO) -> None:
                with open(local_path, "rb") as src:
                    shutil.copyfileobj(src, dst, 4 * 1024 * 1024)

            _publish_local(path, copy)
            if move:
                _unlink_quiet(local_path)
        else:
            # s3fs/gcsfs put_file is one PUT or one multipart upload: invisible until complete.
            fs.put_file(local_path, path)
            fs.invalidate_cache(path)
            if move:
                _unlink_quiet(local_path)
    except OSError as e:
        raise StorageError(f"could not upload {local_path} to {redact(url)}: {e}") from e


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def read_bytes(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """Read the whole object at `url`. Raises FileNotFoundError when it does not exist."""
    fs, path = filesystem(url, storage_options)
    try:
        if is_local(fs):
            return fs.cat_file(path)
        try:
            # An open range is one GET; without it s3fs first asks for the size (a HEAD).
            return fs.cat_file(path, start=0)
        except FileNotFoundError:
            raise
        except OSError:
            return fs.cat_file(path)  # an empty object has no byte 0 (HTTP 416)
    except FileNotFoundError:
        raise FileNotFoundError(f"not found: {redact(url)}") from None
    except OSError as e:
        raise StorageError(f"could not read {redact(url)}: {e}") from e


def read_many(urls: list[str], storage_options: Mapping[str, Any] | None = None) -> dict[str, bytes | None]:
    """Read many small objects of one filesystem at once (concurrently on object stores).

    Returns `{url: bytes or None when missing}`.
    """
    if not urls:
        return {}
    fs, _ = filesystem(urls[0], storage_options)
    paths = [filesystem(u, storage_options)[1] for u in urls]
    # An open range is one GET per object (see read_bytes).
    got = fs.cat(paths, on_error="return") if is_local(fs) else fs.cat(paths, on_error="return", start=0)
    out: dict[str, bytes | None] = {}
    for url, path in zip(urls, paths):
        value = got.get(path) if isinstance(got, dict) else got
        if isinstance(value, FileNotFoundError):
            out[url] = None
        elif isinstance(value, BaseException):
            out[url] = read_bytes(url, storage_options)  # e.g. an empty object: no byte 0 to range from
        else:
            out[url] = value
    return out


def exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """True when an object or directory exists at `url` (never answered from a stale listing)."""
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path)
    return fs.exists(path)


def size(url: str, storage_options: Mapping[str, Any] | None = None) -> int | None:
    """Byte size of the object at `url`, or None when it does not exist."""
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path)
    try:
        return int(fs.info(path)["size"])
    except FileNotFoundError:
        return None


def remove(url: str, storage_options: Mapping[str, Any] | None = None, *, missing_ok: bool = True) -> None:
    """Delete the object at `url`."""
    fs, path = filesystem(url, storage_options)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        if not missing_ok:
            raise FileNotFoundError(f"not found: {redact(url)}") from None
    finally:
        fs.invalidate_cache(path)


def list_files(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Objects directly under the directory `url`: `{file name: size}`; empty when it is absent."""
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    out: dict[str, int] = {}
    for entry in entries:
        if entry.get("type") != "file":
            continue
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        out[name] = int(entry.get("size") or 0)
    return out


def open_input(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    block_size: int | None = None,
    cache_type: str | None = None,
):
    """Open `url` for streaming reads.

    On object stores the file fetches large blocks and prefetches the next one in the background,
    so sequential readers (tar streams, Parquet row groups) overlap network and compute.
    """
    fs, path = filesystem(url, storage_options)
    if is_local(fs):
        return fs.open(path, "rb")
    return fs.open(
        path,
        "rb",
        block_size=block_size or REMOTE_BLOCK_SIZE,
        cache_type=cache_type or "background",
    )


# userinfo in any scheme://user:pass@host, and query parameters that carry secrets
# (presigned S3/GCS URLs, Azure SAS tokens, generic tokens).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s?#]+)@")
_SECRET_PARAM = re.compile(
    r"(?P<lead>[?&;])(?P<name>[^=&;#\s]*(?:sig|signature|token|secret|password|passwd|credential|"
    r"key|auth|session)[^=&;#\s]*)=(?P<value>[^&;#\s]*)",
    re.IGNORECASE,
)
_SECRET_OPTION = re.compile(r"(key|secret|token|password|passwd|credential|auth|session)", re.IGNORECASE)


def redact(url: str) -> str:
    """Return `url` with credentials removed (userinfo and secret-bearing query parameters)."""
    if not isinstance(url, str):
        return url
    url = _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", url)
    return _SECRET_PARAM.sub(lambda m: f"{m.group('lead')}{m.group('name')}=***", url)


def redact_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Storage options safe to log: values of secret-looking keys replaced by '***'."""
    out: dict[str, Any] = {}
    for k, v in (options or {}).items():
        if isinstance(v, Mapping):
            out[k] = redact_options(v)
        elif _SECRET_OPTION.search(str(k)) and v is not None:
            out[k] = "***"
        elif isinstance(v, str):
            out[k] = redact(v)
        else:
            out[k] = v
    return out


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or local path with '/'."""
    out = str(url)
    for part in parts:
        part = str(part).strip("/")
        if not part:
            continue
        out = out.rstrip("/") + "/" + part if out else part
    return out


def iter_chunks(f, chunk_size: int = 4 * 1024 * 1024) -> Iterable[bytes]:
    """Yield successive chunks of an open binary file."""
    while True:
        chunk = f.read(chunk_size)
        if not chunk:
            return
        yield chunk
