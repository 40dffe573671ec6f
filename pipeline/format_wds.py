"""Write the latent rows of one shard as a WebDataset tar (`shards/NAME.tar`).

Each row becomes the members `KEY.COLUMN.npy` (one per stored latent column, in stored dtype),
`KEY.json` (every other field, plus `dtype` and `latent_shape`), `KEY.txt` (the caption, when
there is one) and, when the output stores caption embeddings, `KEY.text.npz` (`pipeline.text`).

KEY in a member name is `member_key(key)`: the key itself when it is a plain relative path, else
its percent-encoded form (one file name, no folders). Keys come from input tar member names, which
anyone can write: ``../../etc/x`` or ``/tmp/x`` repeated verbatim would make whoever unpacks the
output with `tarfile` (no filter) or an old ``tar`` write outside the target folder. The key as
it was stays in the sample's `.json` record, which is what readers (`LatentDataset`) return.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import zlib

import numpy as np

from .manifest import Manifest
from .rows import LatentRow
from .schema import CHECKSUM_SUFFIX, ShardColumns
from .text import TEXT_MEMBER_SUFFIX

__all__ = ["WdsShardFormat", "member_key"]

# Tar members are streamed out in small batches.
GROUP_ROWS = 256

# Characters that make a path component unsafe or ambiguous to unpack: control characters (NUL
# ends a C string), the Windows separator, and "%", which the escaped form uses.
_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f\\%]")
# What the escaped form keeps as it is; every other byte of the UTF-8 key becomes %XX.
_KEPT = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def member_key(key: str) -> str:
    """The KEY of a row's member names: `key` when it is a plain relative path, else escaped.

    Plain: components separated by single "/", none of them empty, "." or "..", and no control
    character, backslash or "%" anywhere. Any other key is written as one file name in which every
    UTF-8 byte other than ``A-Z a-z 0-9 _ -`` is ``%XX`` (``../x`` -> ``%2E%2E%2Fx``). Plain keys
    hold no "%" and escaped ones always do, so no two keys share a member name.
    """
    parts = key.split("/")
    if not _UNSAFE_CHARS.search(key) and all(p not in ("", ".", "..") for p in parts):
        return key
    return "".join(chr(b) if b in _KEPT else f"%{b:02X}" for b in key.encode("utf-8", "surrogateescape"))


class WdsShardFormat:
    """One uncompressed POSIX (pax) tar with reproducible member headers.

    Members whose names fit a ustar header get exactly that header; longer or non-ASCII names get
    a pax record as well, rather than failing the shard.
    """

    suffix = "tar"

    @staticmethod
    def rows_per_group(row_bytes: int) -> int:
        """Rows handed to one `write_rows` call (a tar has no row groups; size does not matter)."""
        return GROUP_ROWS

    def __init__(self, path: str, columns: ShardColumns, manifest: Manifest | None):
        """Open the tar at local `path` for rows with `columns` (the manifest adds nothing to a tar)."""
        self.path = path
        self.columns = columns
        self._tar: tarfile.TarFile | None = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)

    def write_rows(self, rows: list[LatentRow], stored: dict[str, list[np.ndarray]]) -> None:
        """Append the members of `rows`, with their latents in stored form, per latent column."""
        for i, r in enumerate(rows):
            record = {
                "key": r.key,
                "source": r.source,
                "index": int(r.index),
                "dtype": self.columns.dtype,
                "latent_shape": [int(v) for v in np.shape(r.latent)],
                "caption": r.caption,
                "meta": r.meta_object(),
                "original_size": [int(v) for v in r.original_size],
                "crop_top_left": [int(v) for v in r.crop_top_left],
                "target_size": [int(v) for v in r.target_size],
            }
            text = self.columns.text
            if text:
                record["text_dtypes"] = text.dtypes()
            name = member_key(r.key)
            members: list[tuple[str, bytes]] = []
            for col, arrs in stored.items():
                buf = io.BytesIO()
                np.save(buf, arrs[i], allow_pickle=False)
                members.append((f"{name}.{col}.npy", buf.getvalue()))
            members.append((f"{name}.json", json.dumps(record, sort_keys=True).encode()))
            if r.caption is not None:
                members.append((f"{name}.txt", r.caption.encode()))
            if text:
                members.append((f"{name}{TEXT_MEMBER_SUFFIX}", text.npz_member(r.text)))
            # Per-sample check, as Parquet's page checksums: crc32 of every other member.
            sums = {member[len(name) + 1:]: f"{zlib.crc32(data):08x}" for member, data in members}
            members.append((f"{name}{CHECKSUM_SUFFIX}", json.dumps(sums, sort_keys=True).encode()))
            for member, data in members:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                info.mtime = 0  # reproducible bytes, so reruns give identical sha256
                info.mode = 0o644
                self._tar.addfile(info, io.BytesIO(data))

    def finish(self) -> None:
        """Close the tar (an empty shard is a valid empty tar)."""
        self.close()

    def close(self) -> None:
        """Close the tar as it is (abort: nothing more is written)."""
        if self._tar is not None:
            tar, self._tar = self._tar, None
            tar.close()
