"""What a job needs, checked before any work starts and before anything is written.

The encode driver runs `check_job` first: before it takes OUTPUT's lease, starts Ray or loads a
model. Into an OUTPUT that already has an index it checks only the inputs still to do, after
planning (a refused input then leaves OUTPUT as it was), so a rerun over 10^5 committed shards
does not list their folders again. A mistake there then costs one line and exit code 2, instead of a Ray start, workers
failing one by one and a summary.json in an OUTPUT that holds nothing else.

* Inputs (`check_inputs`): every input shard named by a plain URL or a brace pattern must exist
  and be a file. Globs are not rechecked: they were listed to expand them. The check lists each
  distinct parent folder once (one LIST request on object stores, paginated at 1000 keys; one
  directory read on disk) and looks the names up, never one HEAD request per URL, so 10^5 shards
  in one folder cost 100 requests. HTTP(S) folders cannot be listed: those inputs are left to
  fail as their own shard when read.
* Output (`check_output`): a local OUTPUT must be a folder, or creatable under the nearest
  existing folder, which must be writable. Object stores are checked by the first write (the
  lease), which fails the same way before any work.
* Weights (`pipeline.models.check_weights`): exist, readable, a known safe format.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from . import storage
from .config import JobConfig
from .models import check_weights
from .plan import PlanError, expand_braces

__all__ = ["InputError", "OutputError", "check_files", "check_inputs", "check_job", "check_output"]

#: Missing inputs named in the error message; the rest are counted.
SHOWN = 5

# Characters that make a URL a glob for `plan.expand_urls` (outside its scheme).
_GLOB_CHARS = frozenset("*?[")
# Filesystems without a folder listing.
_UNLISTABLE = ("http://", "https://")


class InputError(PlanError):
    """Input shards that do not exist (or are folders); the message names the first few."""


class OutputError(PlanError):
    """OUTPUT cannot be written; the message names the path and why."""


def check_job(config: JobConfig, *, inputs: bool = True) -> None:
    """Run every check of this module on `config` (raises `InputError`, `OutputError` or
    `ConfigError` naming `model.weights`); `inputs=False` leaves the inputs to the caller (the
    driver checks only those it still has to read, once it has planned)."""
    if inputs:
        check_inputs(config.input.urls, config.input.storage_options)
    check_output(config.output.path, config.output.storage_options)
    check_weights(config.model)


def _plain_urls(urls: str | list[str]) -> list[str]:
    """The inputs that are not globs, braces expanded, in order, without duplicates."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    out = (u for p in patterns for u in expand_braces(p))
    return list(dict.fromkeys(u for u in out if not _GLOB_CHARS.intersection(u.split("://", 1)[-1])))


def check_inputs(urls: str | list[str], storage_options: Mapping[str, Any] | None = None) -> None:
    """Raise `InputError` unless every plain input URL of `urls` (patterns as `input.urls` takes
    them) is an existing file; a folder that cannot be listed raises it too, naming the error."""
    check_files(_plain_urls(urls), storage_options)


def check_files(urls: list[str], storage_options: Mapping[str, Any] | None = None) -> None:
    """`check_inputs` for URLs taken as they are (the planned shards: a name holding `{` or `*`
    is a file name here, not a pattern)."""
    by_parent: dict[str, list[tuple[str, str]]] = {}
    for url in urls:
        if url.lower().startswith(_UNLISTABLE):
            continue
        parent, _, name = url.rpartition("/")
        by_parent.setdefault(parent if parent or not url.startswith("/") else "/", []).append((url, name))
    missing: list[str] = []
    folders: list[str] = []
    for parent, entries in by_parent.items():
        listing = _listing(parent, storage_options)
        for url, name in entries:
            kind = listing.get(name)
            if kind is None:
                missing.append(url)
            elif kind == "directory":
                folders.append(url)
    problems = []
    if missing:
        problems.append(f"{len(missing):,} input shard(s) do not exist: {_names(missing)}")
    if folders:
        problems.append(f"{len(folders):,} input(s) are folders, not tar files: {_names(folders)}")
    if problems:
        raise InputError("input.urls: " + "; ".join(problems))


def _listing(parent: str, storage_options: Mapping[str, Any] | None) -> dict[str, str]:
    """{name: "file" or "directory"} of what is directly in folder `parent` (empty when it is absent)."""
    fs, path = storage.filesystem(parent or ".", storage_options)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except Exception as e:  # storage clients raise their own types (e.g. botocore errors)
        raise InputError(storage.redact(f"input.urls: cannot list {parent}: {type(e).__name__}: {e}")) from None
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e.get("type", "file") for e in entries}


def _names(urls: list[str]) -> str:
    shown = ", ".join(storage.redact(u) for u in urls[:SHOWN])
    return shown + (f" and {len(urls) - SHOWN:,} more" if len(urls) > SHOWN else "")


def check_output(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Raise `OutputError` when a local OUTPUT is a file, or cannot be created or written."""
    fs, path = storage.filesystem(url, storage_options)
    if not storage.is_local(fs):
        return
    shown = storage.redact(url)
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"output.path: {shown} is a file, not a folder")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OutputError(f"output.path: {shown} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"output.path: {shown} cannot be written: no write permission on {existing}")
