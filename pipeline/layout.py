"""Where everything lives inside an OUTPUT root (any fsspec URL).

    ROOT/manifest.json
    ROOT/shards/NAME.parquet      (NAME.tar with format "wds")
    ROOT/_commits/NAME.json       written last: the shard is done iff this exists and matches
    ROOT/errors/NAME.parquet      bad-sample ledger
    ROOT/qa/samples/NAME.parquet  QA side table (preprocessed pixels + unrounded latents)
    ROOT/qa/report.html, ROOT/qa/metrics.json, ROOT/summary.json
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache

from .storage import join, redact

__all__ = [
    "FORMATS",
    "MANIFEST",
    "SHARDS_DIR",
    "COMMITS_DIR",
    "ERRORS_DIR",
    "QA_SAMPLES_DIR",
    "shard_ext",
    "manifest_url",
    "shard_url",
    "shard_relpath",
    "commit_url",
    "errors_url",
    "errors_relpath",
    "qa_sample_url",
    "qa_sample_relpath",
    "summary_url",
    "qa_report_url",
    "qa_metrics_url",
    "shard_name",
    "shard_names",
]

FORMATS = ("parquet", "wds")
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
COMMITS_DIR = "_commits"
ERRORS_DIR = "errors"
QA_SAMPLES_DIR = "qa/samples"


def shard_ext(fmt: str) -> str:
    """File extension of a latent shard in format `fmt`."""
    if fmt == "parquet":
        return "parquet"
    if fmt == "wds":
        return "tar"
    raise ValueError(f"unknown output format {fmt!r}; expected one of {FORMATS}")


def manifest_url(root: str) -> str:
    return join(root, MANIFEST)


def shard_relpath(name: str, fmt: str) -> str:
    return f"{SHARDS_DIR}/{name}.{shard_ext(fmt)}"


def shard_url(root: str, name: str, fmt: str) -> str:
    return join(root, shard_relpath(name, fmt))


def commit_url(root: str, name: str) -> str:
    return join(root, COMMITS_DIR, f"{name}.json")


def errors_relpath(name: str) -> str:
    return f"{ERRORS_DIR}/{name}.parquet"


def errors_url(root: str, name: str) -> str:
    return join(root, errors_relpath(name))


def qa_sample_relpath(name: str) -> str:
    return f"{QA_SAMPLES_DIR}/{name}.parquet"


def qa_sample_url(root: str, name: str) -> str:
    return join(root, qa_sample_relpath(name))


def summary_url(root: str) -> str:
    return join(root, "summary.json")


def qa_report_url(root: str) -> str:
    return join(root, "qa", "report.html")


def qa_metrics_url(root: str) -> str:
    return join(root, "qa", "metrics.json")


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_ARCHIVE_EXTS = (".tar.gz", ".tar.bz2", ".tar.xz", ".tar.zst", ".tgz", ".tar")


def _path_parts(url: str) -> list[str]:
    url = redact(url).split("::")[-1]
    url = url.split("?", 1)[0].split("#", 1)[0]
    if "://" in url:
        url = url.split("://", 1)[1]
    return [p for p in url.split("/") if p]


def _base(url: str) -> str:
    parts = _path_parts(url)
    base = parts[-1] if parts else "shard"
    for ext in _ARCHIVE_EXTS:
        if base.lower().endswith(ext) and len(base) > len(ext):
            base = base[: -len(ext)]
            break
    else:
        if "." in base.lstrip("."):
            base = base.rsplit(".", 1)[0]
    return _clean(base)


def _clean(text: str) -> str:
    text = _UNSAFE.sub("_", text).strip("._")
    return text or "shard"


@lru_cache(maxsize=8)
def _names_for(urls: tuple[str, ...]) -> dict[str, str]:
    bases = {u: _base(u) for u in urls}
    counts: dict[str, int] = {}
    for u in dict.fromkeys(urls):
        counts[bases[u]] = counts.get(bases[u], 0) + 1
    names: dict[str, str] = {}
    colliding = [u for u in dict.fromkeys(urls) if counts[bases[u]] > 1]
    for u in dict.fromkeys(urls):
        if counts[bases[u]] == 1:
            names[u] = bases[u]
    # Colliding base names get their parent folders prefixed (the fewest that make them unique),
    # so names stay readable; anything still ambiguous gets a hash of the URL.
    depth = 1
    pending = colliding
    while pending and depth <= 8:
        candidates = {}
        for u in pending:
            parts = _path_parts(u)
            prefix = parts[-1 - depth : -1] if len(parts) > 1 else []
            candidates[u] = _clean("__".join([*prefix, bases[u]]))
        seen: dict[str, int] = {}
        for c in candidates.values():
            seen[c] = seen.get(c, 0) + 1
        taken = set(names.values())
        nxt = []
        for u, c in candidates.items():
            if seen[c] == 1 and c not in taken:
                names[u] = c
            else:
                nxt.append(u)
        pending = nxt
        depth += 1
    for u in pending:
        digest = hashlib.sha1(redact(u).encode()).hexdigest()[:10]
        names[u] = f"{bases[u]}-{digest}"
    return names


def shard_names(all_urls: list[str]) -> dict[str, str]:
    """Output shard NAME for every input URL: its file name without extension, made unique."""
    return dict(_names_for(tuple(all_urls)))


def shard_name(input_url: str, all_urls: list[str] | None = None) -> str:
    """Output shard NAME of `input_url` among `all_urls` (the whole job's inputs).

    NAME is the input file name without its extension (``.../00042.tar`` -> ``00042``); when two
    inputs share a base name in different folders, the distinguishing parent folders are prefixed
    (``a/00000.tar`` -> ``a__00000``). The result is a safe file name.
    """
    if not all_urls:
        return _base(input_url)
    names = _names_for(tuple(all_urls))
    if input_url not in names:
        raise KeyError(f"input shard {redact(input_url)} is not among the job's inputs")
    return names[input_url]
