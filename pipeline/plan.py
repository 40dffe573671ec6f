"""Planning: expand the input URL patterns into shards, name them, and skip committed ones.

`input.urls` accepts, alone or in a list:

* brace patterns as WebDataset and Bash write them: numeric ranges ``{00000..00099}`` (the width
  of the first bound is kept as zero padding) and alternatives ``{train,val}``; braces nest;
* globs (``*``, ``?``, ``[...]``), expanded by listing the filesystem (S3, GCS, local, ...);
* plain URLs, taken as they are: a missing one fails as its own shard, by URL, when read, so a
  plan of 100k brace-expanded shards does not cost 100k HEAD requests up front.

The order of the expanded list is the scheduling order; duplicates are dropped.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import layout, storage

__all__ = ["PlanError", "ShardTask", "Plan", "expand_braces", "expand_urls", "make_plan"]

log = logging.getLogger(__name__)


class PlanError(ValueError):
    """The inputs cannot be planned (pattern matches nothing, bad brace syntax, ...)."""


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: an input shard URL and its output NAME."""

    url: str
    name: str


@dataclass
class Plan:
    """All input shards of a job, split into already committed and still to do."""

    shards: list[ShardTask]
    done: list[ShardTask] = field(default_factory=list)
    todo: list[ShardTask] = field(default_factory=list)


_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(\d+))?$")


def expand_braces(pattern: str) -> list[str]:
    """Expand Bash/WebDataset brace syntax: ``a{0..2}b`` and ``x{p,q}`` (nesting allowed)."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    end = _matching_brace(pattern, start)
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    options = _brace_options(body, pattern)
    tails = expand_braces(tail)
    # the leftmost brace varies slowest, as in Bash: a{0,1}{x,y} -> a0x a0y a1x a1y
    return [head + option + t for option in options for t in tails]


def _matching_brace(s: str, start: int) -> int:
    depth = 0
    for i in range(start, len(s)):
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    raise PlanError(f"unbalanced '{{' in input pattern {storage.redact(s)!r}")


def _brace_options(body: str, pattern: str) -> list[str]:
    """The fully expanded alternatives of one brace group's body."""
    m = _RANGE.match(body)
    if m:
        lo_s, hi_s, step_s = m.group(1), m.group(2), m.group(3)
        lo, hi = int(lo_s), int(hi_s)
        step = int(step_s) if step_s else 1
        if step <= 0:
            raise PlanError(f"range step must be positive in {storage.redact(pattern)!r}")
        # Bash pads to the widest bound when a bound has a leading zero: {00..10} -> 00 01 ... 10
        digits = [b.lstrip("-") for b in (lo_s, hi_s)]
        padded = any(len(d) > 1 and d.startswith("0") for d in digits)
        width = max(len(d) for d in digits) if padded else 0
        values = range(lo, hi + 1, step) if lo <= hi else range(lo, hi - 1, -step)
        return [str(v).zfill(width) if v >= 0 else "-" + str(-v).zfill(width) for v in values]
    parts: list[str] = []
    depth = 0
    current = ""
    for ch in body:
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        current += ch
    parts.append(current)
    if len(parts) == 1:
        # "{abc}" is not a brace expansion in Bash either: the braces stay, the inside may expand.
        return ["{" + inner + "}" for inner in expand_braces(body)]
    return [x for part in parts for x in expand_braces(part)]


_GLOB_CHARS = re.compile(r"[*?\[]")


def _protocol_prefix(url: str) -> str:
    if "://" in url:
        return url.split("://", 1)[0] + "://"
    return ""


def expand_urls(urls: str | list[str], storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Expand patterns (braces, then globs) into a de-duplicated list of shard URLs."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for pattern in patterns:
        for url in expand_braces(pattern):
            if _GLOB_CHARS.search(url.split("://", 1)[-1]):
                out.extend(_glob(url, storage_options))
            else:
                out.append(url)
    unique = list(dict.fromkeys(out))
    if len(unique) != len(out):
        log.warning("input.urls: %d duplicate shard URL(s) dropped", len(out) - len(unique))
    if not unique:
        raise PlanError("input.urls: no shards to process")
    return unique


def _glob(url: str, storage_options: Mapping[str, Any] | None) -> list[str]:
    fs, path = storage.filesystem(url, storage_options)
    try:
        matches = sorted(fs.glob(path))
    except FileNotFoundError:
        matches = []
    except Exception as e:  # storage clients raise their own types (e.g. botocore NoCredentialsError)
        raise PlanError(f"input.urls: cannot list {storage.redact(url)}: {type(e).__name__}: {e}") from e
    matches = [m for m in matches if not fs.isdir(m)] if matches else []
    if not matches:
        raise PlanError(f"input.urls: pattern {storage.redact(url)} matches no files")
    prefix = _protocol_prefix(url)
    out = []
    for m in matches:
        if prefix and not m.startswith(prefix):
            m = prefix + m
        out.append(m)
    return out


def make_plan(
    urls: str | list[str],
    output_root: str,
    input_storage_options: Mapping[str, Any] | None = None,
    output_storage_options: Mapping[str, Any] | None = None,
) -> Plan:
    """Expand the inputs, name every shard and split them by whether OUTPUT has their commit."""
    from .commit import committed_names

    expanded = expand_urls(urls, input_storage_options)
    names = layout.shard_names(expanded)
    shards = [ShardTask(url=u, name=names[u]) for u in expanded]
    try:
        done_names = set(committed_names(output_root, output_storage_options))
    except Exception as e:  # storage clients raise their own types (e.g. botocore NoCredentialsError)
        raise PlanError(
            f"output.path: cannot read the commits of {storage.redact(output_root)}: {type(e).__name__}: {e}"
        ) from e
    done = [s for s in shards if s.name in done_names]
    todo = [s for s in shards if s.name not in done_names]
    return Plan(shards=shards, done=done, todo=todo)
