"""The regular-file members of a tar stream, read strictly in order, with little Python per member.

`tarfile` in stream mode spends about 25 us of Python per member (a dozen calls to parse each
header field, its own buffering layer over the file); a WebDataset sample has two to five members
and the reader runs in the worker's process, next to the encoder's launching thread, so those
microseconds hold the GIL at every image. `TarStream` parses the same formats with one slice per
field:

* ustar, GNU and POSIX.1-2001 (pax) headers; the ustar name prefix; pax ``path`` and ``size``
  records; GNU long names (``L``); sizes in octal or in GNU base-256;
* header checksums are verified (unsigned or signed sum, as `tarfile` accepts);
* directories, links, devices and FIFOs are skipped; so are GNU sparse files (their stored data
  is not the file), global pax headers and types this reader does not know (their data too);
* the end is two zero blocks or, as `tarfile` accepts too, the end of the stream at a header;
* a pax or GNU long-name header over `MAX_HEADER_MEMBER` bytes is an error, not read into memory;
* a header that is cut short or fails its checksum after the first one is an error. `tarfile`'s
  stream mode takes it for the end of the archive and says nothing, which would commit a shard
  without the samples behind it.

Compressed tars (gzip, bzip2, xz; told by their magic bytes) are decompressed on the fly by the
standard library's stream readers and parsed the same way, with the same checks, and then read
to the end of the compressed stream, so that its checksum (gzip's CRC-32, xz's check, bzip2's
block CRCs) covers the members' bytes too: `tarfile` stops at the tar's end and never sees it.
An empty file is an error, as in `tarfile`.

Errors are `tarfile.ReadError` with what was wrong (a failed decompression too); errors of the
underlying stream (network, storage) pass through as they are.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

__all__ = ["TarStream", "open_members"]

BLOCK = 512
_REGULAR = (b"0", b"\x00", b"7")
# Links, devices, directories and FIFOs: no data follows their header. Every other type (regular,
# sparse, GNU dump directories, vendor types) is followed by `size` bytes, as `tarfile` reads it.
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")
_SKIP_CHUNK = 1 << 20
#: Largest pax or GNU long-name header member read into memory (real ones are a few hundred bytes).
MAX_HEADER_MEMBER = 1 << 20


def _number(field: bytes, what: str) -> int:
    """An octal (NUL/space padded) or GNU base-256 header number."""
    if field and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big") | ((field[0] & 0x3F) << (8 * (len(field) - 1)))
        return -value if field[0] & 0x40 else value
    text = field.split(b"\x00", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise tarfile.ReadError(f"invalid header: {what} field {field!r} is not a number") from None


def _name(field: bytes) -> str:
    return field.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """``"%d %s=%s\\n"`` records of a pax extended header."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise tarfile.ReadError("invalid pax header: bad record length") from None
        if space < 0 or length <= 0 or pos + length > len(data):
            raise tarfile.ReadError("invalid pax header: bad record length")
        record = data[space + 1 : pos + length - 1]  # without the trailing newline
        key, eq, value = record.partition(b"=")
        if not eq:
            raise tarfile.ReadError("invalid pax header: record without '='")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _read_up_to(f: Any, n: int) -> bytes:
    """Up to `n` bytes of `f`: fewer only at its end (a network stream or a pipe may return less
    than asked for on one read; keep reading)."""
    data = f.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = f.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class TarStream:
    """Iterate over (name, size) of the regular files of an uncompressed tar read from `f`.

    After each item, `read()` returns that member's bytes; a member not read is skipped when the
    iteration moves on (without keeping it in memory). `head` is the first header block when it
    has been read from `f` already (e.g. to look for compression magic).
    """

    def __init__(self, f: BinaryIO, head: bytes = b""):
        self._f = f
        self._head = head
        self._left = 0  # unread bytes of the current member
        self._pad = 0  # padding after it

    def _read_exact(self, n: int, what: str) -> bytes:
        data = _read_up_to(self._f, n)
        if len(data) < n:
            raise tarfile.ReadError(f"unexpected end of data in {what} ({len(data)} of {n} bytes)")
        return data

    def _skip(self, n: int) -> None:
        while n > 0:
            step = min(n, _SKIP_CHUNK)
            self._read_exact(step, "a skipped member")
            n -= step

    def read(self) -> bytes:
        """The current member's bytes (empty when it was read already)."""
        data = self._read_exact(self._left, "a member") if self._left else b""
        self._left = 0
        return data

    def _data(self, size: int, what: str) -> bytes:
        """The whole data of a header member (pax, long name) and its padding."""
        if size > MAX_HEADER_MEMBER:
            raise tarfile.ReadError(f"invalid header: {what} of {size} bytes")
        data = self._read_exact(size, what)
        self._skip(-size % BLOCK)
        return data

    def _header(self) -> bytes | None:
        """The next header block, or None at the end of the archive."""
        buf = self._head or _read_up_to(self._f, BLOCK)
        self._head = b""
        if not buf:
            return None  # no end-of-archive blocks: tarfile accepts that too
        if len(buf) < BLOCK:
            raise tarfile.ReadError(f"unexpected end of data in a header ({len(buf)} of {BLOCK} bytes)")
        if buf.count(0) == BLOCK:
            return None
        stored = _number(buf[148:156], "checksum")
        unsigned = sum(buf) - sum(buf[148:156]) + 8 * 32
        if stored != unsigned:
            signed = unsigned - 256 * sum(1 for b in buf if b >= 128) + 256 * sum(1 for b in buf[148:156] if b >= 128)
            if stored != signed:
                raise tarfile.ReadError("invalid header: bad checksum")
        return buf

    def __iter__(self) -> Iterator[tuple[str, int]]:
        pax: dict[str, str] = {}
        long_name: str | None = None
        while True:
            if self._left or self._pad:
                self._skip(self._left + self._pad)
                self._left = self._pad = 0
            buf = self._header()
            if buf is None:
                return
            kind = buf[156:157]
            size = _number(buf[124:136], "size")
            if size < 0:
                raise tarfile.ReadError("invalid header: negative size")
            if kind == b"x":
                pax.update(_pax_records(self._data(size, "a pax header")))
                continue
            if kind == b"L":
                long_name = _name(self._data(size, "a GNU long name"))
                continue
            if kind in (b"g", b"K"):
                self._skip(size + -size % BLOCK)
                continue
            name = _name(buf[0:100])
            if buf[257:265] == b"ustar\x0000":
                prefix = _name(buf[345:500])
                if prefix:
                    name = f"{prefix}/{name}"
            if long_name is not None:
                name = long_name
            if "path" in pax:
                name = pax["path"]
            if "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError:
                    raise tarfile.ReadError(f"invalid pax header: size {pax['size']!r}") from None
                if size < 0:
                    raise tarfile.ReadError("invalid pax header: negative size")
            pax, long_name = {}, None
            self._left = 0 if kind in _NO_DATA else size
            self._pad = -self._left % BLOCK
            # A sparse file's stored data is not its content; an old-style entry whose name ends
            # in "/" is a directory.
            if kind in _REGULAR and not (kind == b"\x00" and name.endswith("/")):
                yield name, size


def open_members(f: BinaryIO) -> Iterator[tuple[str, int, Callable[[], bytes]]]:
    """(name, size, read) of each regular file of the tar in `f`, compressed or not; ``read()``
    returns the member's bytes if called before the next item is taken."""
    head = _read_up_to(f, BLOCK)  # the first block, whole (or the whole of a shorter file)
    if not head:
        raise tarfile.ReadError("empty file")
    opener = next((open_ for magic, open_ in _DECOMPRESSORS if head.startswith(magic)), None)
    stream = opener(_Prefixed(head, f)) if opener else None
    reader = TarStream(stream) if stream is not None else TarStream(f, head)

    def read() -> bytes:
        with _decompression_errors():
            return reader.read()

    with _decompression_errors():
        for name, size in reader:
            yield name, size, (read if stream is not None else reader.read)
        if stream is not None:
            # Read the compressed stream to its end: the decompressor checks its CRC there, which
            # is the only check the members' data gets (the tar's end comes before it).
            while stream.read(_SKIP_CHUNK):
                pass


@contextlib.contextmanager
def _decompression_errors() -> Iterator[None]:
    try:
        yield
    except (EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as e:
        raise tarfile.ReadError(f"cannot decompress: {type(e).__name__}: {e}") from e


def _gzip(f: Any) -> Any:
    return gzip.GzipFile(fileobj=f, mode="rb")


def _bz2(f: Any) -> Any:
    return bz2.BZ2File(f, "rb")


def _xz(f: Any) -> Any:
    return lzma.LZMAFile(f, "rb")


_DECOMPRESSORS: tuple[tuple[bytes, Callable[[Any], Any]], ...] = (
    (b"\x1f\x8b", _gzip), (b"BZh", _bz2), (b"\xfd7zXZ\x00", _xz),
)


class _Prefixed:
    """A read-only stream: `head`, then the rest of `f` (the decompressors only read)."""

    def __init__(self, head: bytes, f: BinaryIO):
        self._head = head
        self._f = f

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._f.read(n)
        if n is None or n < 0:
            data, self._head = self._head + self._f.read(), b""
            return data
        data, self._head = self._head[:n], self._head[n:]
        if len(data) < n:
            data += self._f.read(n - len(data))
        return data
