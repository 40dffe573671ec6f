"""Stream a WebDataset tar shard from any fsspec URL and group its members into samples.

Reading
    The shard is opened with `storage.open_input`: on object stores that is a file with a large
    block size and background prefetch of the next block, so one tar costs a few large ranged
    GETs instead of thousands of small ones, and memory stays bounded (two blocks plus the
    members of one sample) whatever the shard size. The tar is read strictly sequentially
    (`pipeline.tarstream`: a lean parser of ustar/GNU/pax headers; gzip/bz2/xz tars are
    decompressed on the fly and checked against their stream checksum); members the job does
    not need (``.cls``, ``.npy``, ...) are skipped without being kept in memory.

Grouping (what WebDataset does, plus checks WebDataset does not make)
    A member ``dir/abc.def.jpg`` has key ``dir/abc`` (the path up to the first dot of the file
    name) and extension ``def.jpg`` (the rest). Consecutive members with the same key form one
    sample. Keys that contain dots are therefore cut at the first dot, exactly as WebDataset
    and every tool writing WebDataset shards assume.

    Odd shards are handled on purpose and reported, never merged into wrong samples:

    * a key that appears again after other keys (members of one sample not adjacent, or a
      duplicate key) -> the first occurrence is kept, every later group becomes a ledger row
      ``duplicate_key``: the output never holds a key twice;
    * the same extension twice inside one sample -> ledger row ``duplicate_member`` (which of
      the two is the real image cannot be known);
    * no member with an image extension -> ledger row ``no_image``;
    * several image members: the first extension of ``input.image_exts`` that matches the
      member's whole extension wins (``jpg`` over ``seg.png``); when none matches whole but
      several match on their last part (``v1.jpg``, ``v2.jpg``) -> ledger row
      ``ambiguous_image``; exactly one such member is used;
    * a needed member over `max_member_bytes` -> ledger row ``member_too_large``;
    * a member name that is not UTF-8 -> ledger row ``key_not_utf8``, its key written with the
      undecodable bytes escaped (``caf\\xe9``): a key must be text in every output format, and the
      escaped form still tells which member it was;
    * members without an extension, directories and links are not samples and are skipped.

    A tar that cannot be read to its end (truncated, damaged, not a tar) raises
    `ShardReadError`: the shard fails (and is retried) rather than committing a partial shard.
"""

from __future__ import annotations

import json
import logging
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from . import storage
from .config import IMAGE_EXTS
from .tarstream import open_members

__all__ = ["Sample", "SampleError", "ShardReadError", "ShardReader", "escape_key", "split_member_name"]

log = logging.getLogger(__name__)

MAX_MEMBER_BYTES = 128 * 1024 * 1024


class ShardReadError(OSError):
    """The shard itself cannot be read (missing, truncated, not a tar); names the URL."""


@dataclass
class Sample:
    """One sample of a shard: the chosen image member and its caption and metadata."""

    key: str
    #: Ordinal of the sample (member group) in the shard, from 0.
    index: int
    image: bytes
    #: Extension of the image member, e.g. "jpg".
    image_ext: str
    caption: str | None
    #: The sample's JSON member as text ("{}" when it has none).
    meta: str


@dataclass
class SampleError:
    """A member group that is not a usable sample; becomes a ledger row (stage "read")."""

    key: str
    index: int
    reason: str
    message: str


def split_member_name(name: str) -> tuple[str, str] | None:
    """``dir/abc.def.jpg`` -> (``dir/abc``, ``def.jpg``); None when the name has no extension."""
    if name.startswith("./"):
        name = name[2:]
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return None
    return (f"{directory}/{stem}" if directory else stem), ext


def _is_utf8(text: str) -> bool:
    # Member names are decoded with "surrogateescape": bytes that are not UTF-8 became lone surrogates.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def escape_key(key: str) -> str:
    """`key` as text: the bytes of a member name that are not UTF-8 written as ``\\xNN``."""
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class ShardReader:
    """Iterate over the samples of one tar shard (see the module docstring for the rules)."""

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        image_exts: list[str] | tuple[str, ...] = IMAGE_EXTS,
        caption_key: str = "txt",
        max_member_bytes: int = MAX_MEMBER_BYTES,
    ):
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.image_exts = [e.lower().lstrip(".") for e in image_exts]
        self.caption_key = caption_key
        self.max_member_bytes = max_member_bytes
        if caption_key.startswith("json:"):
            self._caption_ext, self._caption_field = "json", caption_key[5:]
        else:
            self._caption_ext, self._caption_field = caption_key.lower(), None

    # -- which members are worth reading --------------------------------------------------------

    def _wanted(self, ext: str) -> bool:
        ext = ext.lower()
        return ext in self.image_exts or ext.rsplit(".", 1)[-1] in self.image_exts or ext in (
            self._caption_ext,
            "json",
        )

    # -- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Sample | SampleError]:
        where = storage.redact(self.url)
        try:
            f = storage.open_input(self.url, self.storage_options)
        except FileNotFoundError:
            raise FileNotFoundError(f"input shard not found: {where}") from None
        except OSError as e:
            raise ShardReadError(f"cannot open input shard {where}: {e}") from e
        with f:
            try:
                yield from self._iter_tar(f)
            except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
                if isinstance(e, FileNotFoundError):
                    raise FileNotFoundError(f"input shard not found: {where}") from None
                raise ShardReadError(f"cannot read input shard {where}: {type(e).__name__}: {e}") from e

    def _iter_tar(self, f) -> Iterator[Sample | SampleError]:
        seen: set[str] = set()
        index = 0
        key: str | None = None
        members: dict[str, bytes] = {}
        problems: list[tuple[str, str]] = []
        for name, size, read in open_members(f):
            parts = split_member_name(name)
            if parts is None:
                log.debug("%s: member %r has no extension; skipped", storage.redact(self.url), name)
                continue
            member_key, ext = parts
            if member_key != key:
                if key is not None:
                    yield self._finish(key, index, members, problems, seen)
                    index += 1
                key, members, problems = member_key, {}, []
            ext_l = ext.lower()
            if not self._wanted(ext_l):
                continue
            if ext_l in members:
                problems.append(("duplicate_member", f"member {name!r} appears twice in sample {key!r}"))
                continue
            if size > self.max_member_bytes:
                problems.append(("member_too_large", f"member {name!r} has {size} bytes > {self.max_member_bytes}"))
                continue
            members[ext_l] = read()
        if key is not None:
            yield self._finish(key, index, members, problems, seen)

    def _finish(
        self,
        key: str,
        index: int,
        members: dict[str, bytes],
        problems: list[tuple[str, str]],
        seen: set[str],
    ) -> Sample | SampleError:
        if not _is_utf8(key):
            shown = escape_key(key)
            return SampleError(shown, index, "key_not_utf8",
                               f"key {shown} is not UTF-8 (bytes shown as \\xNN); sample skipped")
        if key in seen:
            return SampleError(
                key,
                index,
                "duplicate_key",
                f"key {key!r} appears again after other keys (members of a sample must be adjacent); "
                "the first occurrence is kept and this one skipped",
            )
        seen.add(key)
        if problems:
            reason, message = problems[0]
            return SampleError(key, index, reason, message)
        chosen = self._choose_image(members)
        if isinstance(chosen, SampleError):
            chosen.key, chosen.index = key, index
            return chosen
        caption = self._caption(members)
        meta_bytes = members.get("json")
        meta = meta_bytes.decode("utf-8", errors="replace") if meta_bytes is not None else "{}"
        return Sample(key=key, index=index, image=members[chosen], image_ext=chosen, caption=caption, meta=meta)

    def _choose_image(self, members: dict[str, bytes]) -> str | SampleError:
        for ext in self.image_exts:
            if ext in members:
                return ext
        loose = [e for e in members if e.rsplit(".", 1)[-1] in self.image_exts]
        if len(loose) == 1:
            return loose[0]
        if loose:
            return SampleError("", 0, "ambiguous_image", f"several image members: {', '.join(sorted(loose))}")
        have = ", ".join(sorted(members)) or "none kept"
        return SampleError("", 0, "no_image", f"no member with an image extension ({have})")

    def _caption(self, members: dict[str, bytes]) -> str | None:
        data = members.get(self._caption_ext)
        if data is None:
            return None
        if self._caption_field is None:
            return data.decode("utf-8", errors="replace")
        try:
            value: Any = json.loads(data)
        except ValueError:
            return None
        for part in self._caption_field.split("."):
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
        return value if isinstance(value, str) else (None if value is None else json.dumps(value))
