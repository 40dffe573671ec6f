"""Planning: expand the input URL patterns into shards, name them, and skip committed ones.

Committed shards come from the consolidated index (`pipeline.index`): a rerun costs a few
requests when the index is current and one LIST request per 1000 commits otherwise, never one
request per shard. Shard names follow `layout.shard_name` (the input's own URL alone), and an
input that a committed shard records as its source is recognised by that URL, so adding,
removing or reordering inputs never re-encodes or duplicates a committed shard.

`input.urls` accepts, alone or in a list:

* brace patterns as WebDataset and Bash write them: numeric ranges ``{00000..00099}`` (the width
  of the first bound is kept as zero padding) and alternatives ``{train,val}``; braces nest;
* globs (``*``, ``?``, ``[...]``), expanded by listing the filesystem (S3, GCS, local, ...);
* plain URLs, taken as they are: planning makes no request per URL. That they exist is checked
  before a job starts with one LIST per folder (`pipeline.preflight`); one that disappears later
  fails as its own shard, by URL, when read.

The order of the expanded list is the scheduling order; duplicates are dropped.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import layout, storage
from .index import ShardIndex, load_index
from .layout import canonical_url
from .lease import LeaseRecord

__all__ = ["PlanError", "ShardTask", "Plan", "committed_index", "expand_braces", "expand_urls", "make_plan", "qa_quotas"]

log = logging.getLogger(__name__)


class PlanError(ValueError):
    """The inputs cannot be planned (pattern matches nothing, bad brace syntax, ...)."""


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: an input shard URL, its output NAME and its QA quota (`qa_quotas`)."""

    url: str
    name: str
    qa_rows: int = 0


@dataclass
class Plan:
    """All input shards of a job, split into already committed and still to do.

    `index` is the OUTPUT's committed shards as planned against (the driver brings it up to date
    and rewrites it at the end of the run).
    """

    shards: list[ShardTask]
    done: list[ShardTask] = field(default_factory=list)
    todo: list[ShardTask] = field(default_factory=list)
    index: ShardIndex | None = None


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


#: What planning reads of the index: a rerun at 10^5 shards holds three columns, not every record.
_PLAN_COLUMNS = ("name", "source", "qa_rows")


def qa_quotas(
    names: Sequence[str], samples: int, committed_qa_rows: int = 0, committed: Collection[str] = ()
) -> dict[str, int]:
    """QA samples each to-do shard keeps, so the whole OUTPUT keeps fewer than 2 x `samples`.

    The carriers are the min(len(names), samples) shards of the job with the smallest SHA-256 of
    their NAME (a choice that depends on the names alone, not on order or workers), each keeping
    ceil(samples / carriers). The `committed_qa_rows` the output holds count against the budget:
    the carriers not in `committed`, in hash order, get their quota only while the total stays
    below `samples`, so a job that grows its inputs never adds more. Other shards keep none.
    """
    if samples <= 0 or not names:
        return {}
    carriers = sorted(names, key=lambda n: (hashlib.sha256(n.encode("utf-8")).digest(), n))[: min(len(names), samples)]
    quota = -(-samples // len(carriers))
    out: dict[str, int] = {}
    kept = committed_qa_rows
    for name in carriers:
        if kept >= samples:
            break
        if name in committed:
            continue
        out[name] = quota
        kept += quota
    return out


def committed_index(
    output_root: str,
    output_storage_options: Mapping[str, Any] | None = None,
    *,
    lease: LeaseRecord | None | bool = True,
    columns: Sequence[str] | None = None,
) -> ShardIndex:
    """`load_index` of OUTPUT for planning; a storage failure is a PlanError naming `output.path`."""
    try:
        return load_index(output_root, output_storage_options, lease=lease, columns=columns)
    except Exception as e:  # storage clients raise their own types (e.g. botocore NoCredentialsError)
        raise PlanError(
            f"output.path: cannot read the commits of {storage.redact(output_root)}: {type(e).__name__}: {e}"
        ) from e


def make_plan(
    urls: str | list[str],
    output_root: str,
    input_storage_options: Mapping[str, Any] | None = None,
    output_storage_options: Mapping[str, Any] | None = None,
    *,
    index: ShardIndex | None = None,
    qa_samples: int = 0,
) -> Plan:
    """Expand the inputs, name every shard and split them by whether OUTPUT has it committed.

    The committed shards come from `index` or else `load_index` (the consolidated index plus a
    LIST of `_commits/`: no per-shard request). An input whose source URL a committed shard records
    is that shard, whatever its NAME (outputs from before the stable-name rule keep their names);
    any other input gets `layout.shard_name`. A NAME already committed from another source URL is
    refused. `qa_samples` sets the to-do shards' QA quotas (`qa_quotas`).
    """
    expanded = expand_urls(urls, input_storage_options)
    if index is None:
        index = committed_index(output_root, output_storage_options, columns=_PLAN_COLUMNS)
    committed_source = {n: canonical_url(s) if s else None for n, s in zip(index.names, index.column("source"))}
    by_source = {c: n for n, c in committed_source.items() if c}
    shards: list[ShardTask] = []
    names_seen: dict[str, str] = {}
    for url in expanded:
        canon = canonical_url(url)
        name = by_source.get(canon) or layout.shard_name(url)
        if name in names_seen:
            if names_seen[name] == canon:
                log.warning("input.urls: %s is the same shard as an earlier input; dropped", storage.redact(url))
                continue
            raise PlanError(f"input.urls: {storage.redact(url)} and {storage.redact(names_seen[name])} "
                            f"both get the shard name {name!r}")
        owner = committed_source.get(name)
        if owner is not None and owner != canon:
            raise PlanError(f"input.urls: {storage.redact(url)} gets the shard name {name!r}, which "
                            f"{storage.redact(output_root)} holds already from {storage.redact(owner)}")
        names_seen[name] = canon
        shards.append(ShardTask(url=url, name=name))
    done = [s for s in shards if s.name in index]
    qa_rows = sum(index.column("qa_rows")) if "qa_rows" in index.table.column_names else 0
    quotas = qa_quotas([s.name for s in shards], qa_samples, qa_rows, index)
    todo = [ShardTask(url=s.url, name=s.name, qa_rows=quotas.get(s.name, 0)) for s in shards if s.name not in index]
    return Plan(shards=shards, done=done, todo=todo, index=index)
