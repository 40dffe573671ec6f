"""Where everything lives inside an OUTPUT root (any fsspec URL).

    ROOT/manifest.json
    ROOT/shards/NAME.parquet      (NAME.tar with format "wds")
    ROOT/_commits/NAME.json       written last: the shard is done iff this exists and matches
    ROOT/errors/NAME.parquet      bad-sample ledger (only for shards with bad samples)
    ROOT/qa/samples/NAME.parquet  QA side table (preprocessed pixels + unrounded latents)
    ROOT/qa/report.html, ROOT/qa/metrics.json, ROOT/summary.json
    ROOT/index                    consolidated Parquet list of committed shards (pipeline.index)
    ROOT/lease                    the running job's lease (pipeline.lease)
"""

from __future__ import annotations

import hashlib
import os
import re

from .storage import join

__all__ = [
    "FORMATS",
    "MANIFEST",
    "SHARDS_DIR",
    "COMMITS_DIR",
    "ERRORS_DIR",
    "QA_SAMPLES_DIR",
    "INDEX",
    "LEASE",
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
    "index_url",
    "lease_url",
    "canonical_url",
    "shard_name",
]

FORMATS = ("parquet", "wds")
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
COMMITS_DIR = "_commits"
ERRORS_DIR = "errors"
QA_SAMPLES_DIR = "qa/samples"
INDEX = "index"
LEASE = "lease"


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


def index_url(root: str) -> str:
    """OUTPUT/index: the consolidated Parquet list of committed shards (`pipeline.index`)."""
    return join(root, INDEX)


def lease_url(root: str) -> str:
    """OUTPUT/lease: the running job's lease (`pipeline.lease`)."""
    return join(root, LEASE)


def summary_url(root: str) -> str:
    return join(root, "summary.json")


def qa_report_url(root: str) -> str:
    return join(root, "qa", "report.html")


def qa_metrics_url(root: str) -> str:
    return join(root, "qa", "metrics.json")


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_USERINFO = re.compile(r"^[^/@]*@")
_ARCHIVE_EXTS = (".tar.gz", ".tar.bz2", ".tar.xz", ".tar.zst", ".tgz", ".tar")
#: Hex digits of the URL hash in a shard NAME: 40 bits, so two inputs with the same file name
#: collide with odds of about 1 in 10^12 per pair (and a collision is refused, never merged).
NAME_HASH_DIGITS = 10


def canonical_url(url: str) -> str:
    """The form of an input URL that its shard NAME is computed from.

    The last link of an fsspec chain (``simplecache::s3://b/x.tar`` -> ``s3://b/x.tar``); for a
    URL with a scheme, the lower-case scheme, no credentials (``user:secret@``), no query or
    fragment (presigned signatures change, the object does not) and no repeated slashes; a
    ``file://`` URL or a plain path becomes the absolute, normalized local path.
    """
    url = url.split("::")[-1]
    if "://" not in url:
        return os.path.abspath(url)
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme == "file":
        return os.path.abspath(rest)
    rest = rest.split("?", 1)[0].split("#", 1)[0]
    rest = re.sub("/{2,}", "/", _USERINFO.sub("", rest))
    return f"{scheme}://{rest}"


def _base(url: str) -> str:
    path = canonical_url(url).split("://", 1)[-1]
    base = path.rstrip("/").rsplit("/", 1)[-1]
    for ext in _ARCHIVE_EXTS:
        if base.lower().endswith(ext) and len(base) > len(ext):
            base = base[: -len(ext)]
            break
    else:
        if "." in base.lstrip("."):
            base = base.rsplit(".", 1)[0]
    return _UNSAFE.sub("_", base).strip("._") or "shard"


def shard_name(input_url: str) -> str:
    """Output shard NAME of the input shard at `input_url`; it depends on that URL alone.

    NAME is the input file name without its archive extension, made file-name safe, a dash, and
    the first 10 hex digits of the SHA-256 of `canonical_url(input_url)`:
    ``s3://b/train/00042.tar`` -> ``00042-<10 hex digits>``. Adding, removing or reordering other
    inputs never changes it. (Outputs written before this rule keep their names: the plan finds
    committed shards by their source URL first.)
    """
    digest = hashlib.sha256(canonical_url(input_url).encode("utf-8")).hexdigest()[:NAME_HASH_DIGITS]
    return f"{_base(input_url)}-{digest}"
