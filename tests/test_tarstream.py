"""The lean tar reader against Python's tarfile (and GNU tar where installed) on the same bytes."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import shutil
import subprocess
import tarfile

import pytest

from pipeline.tarstream import TarStream, _number, open_members


def _reference(data: bytes) -> list[tuple[str, bytes]]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        for info in tar:
            if info.isfile():
                out.append((info.name, tar.extractfile(info).read()))
    return out


def _ours(data: bytes) -> list[tuple[str, bytes]]:
    return [(name, read()) for name, _, read in open_members(io.BytesIO(data))]


def _tar(members, fmt=tarfile.PAX_FORMAT, mode="w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=fmt) as tar:
        for name, payload in members:
            if payload is None:
                info = tarfile.TarInfo(name)
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(payload, tuple):  # (link type, target)
                info = tarfile.TarInfo(name)
                info.type, info.linkname = payload
                tar.addfile(info)
            else:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


LONG = "shards/" + "a-very-long-directory-name/" * 6 + "sample0001.jpg"  # > 100 characters
MEMBERS = [
    ("d", None),
    ("d/000.jpg", b"\xff\xd8" + bytes(range(256)) * 7),
    ("d/000.txt", b"a caption"),
    ("d/000.json", b""),  # empty member
    ("link.jpg", (tarfile.SYMTYPE, "d/000.jpg")),
    ("hard.jpg", (tarfile.LNKTYPE, "d/000.jpg")),
    (LONG, b"long name" * 100),
    ("d/café-ünïcode.txt", b"non-ASCII name"),
    ("d/exact.bin", b"x" * 1024),  # a multiple of the block size: no padding
]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_same_members_as_tarfile(fmt):
    members = MEMBERS
    if fmt == tarfile.USTAR_FORMAT:
        # ustar cannot hold non-ASCII names without pax; the long name goes into its prefix.
        members = [m for m in MEMBERS if m[0].isascii()]
    data = _tar(members, fmt)
    ours = _ours(data)
    assert ours == _reference(data)
    names = [n for n, _ in ours]
    assert LONG in names and "d/000.json" in names
    assert "d" not in names and "link.jpg" not in names and "hard.jpg" not in names


_COMPRESS = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}


@pytest.mark.parametrize("kind", sorted(_COMPRESS))
def test_compressed_tars_get_the_same_checks(kind):
    plain = [m for m in MEMBERS if isinstance(m[1], bytes)]
    data = _tar(plain, mode=f"w:{kind}")
    assert _ours(data) == _reference(data) == [(n, p) for n, p in plain]
    # A damaged header inside the compressed stream: an error here; tarfile ends the archive.
    raw = bytearray(_tar([("a.jpg", b"1" * 3000), ("b.jpg", b"2" * 10)]))
    raw[512 + 3072 + 5] ^= 0x20
    damaged = _COMPRESS[kind](bytes(raw))
    with pytest.raises(tarfile.ReadError, match="checksum"):
        _ours(damaged)
    assert [n for n, _ in _reference(damaged)] == ["a.jpg"]
    # A compressed stream cut short, even by its last bytes (after the tar's end): an error.
    for cut in (len(data) // 2, len(data) - 3):
        with pytest.raises(tarfile.ReadError, match="cannot decompress"):
            _ours(data[:cut])
    # One flipped byte anywhere in the compressed stream: an error (a header check, or the
    # stream's own checksum read at its end), never silently different member bytes.
    for at in range(10, len(data) - 10, max(1, len(data) // 25)):
        flipped = bytearray(data)
        flipped[at] ^= 0xFF
        try:
            got = _ours(bytes(flipped))
        except (tarfile.ReadError, OSError):
            continue
        assert got == _ours(data), f"byte {at} of {len(data)} changed the members silently"


def test_members_not_read_are_skipped():
    data = _tar([(f"{i:03d}.{ext}", f"{i}-{ext}".encode() * (i * 50 + 1)) for i in range(20) for ext in ("jpg", "cls")])
    got = {}
    for name, size, read in open_members(io.BytesIO(data)):
        if name.endswith(".jpg") and int(name[:3]) % 3 == 0:
            got[name] = read()
            assert len(got[name]) == size
            assert read() == b""  # read once
    assert got == {n: p for n, p in _reference(data) if n in got}
    assert sorted(got) == [f"{i:03d}.jpg" for i in range(0, 20, 3)]


def test_end_of_archive_and_empty_files():
    data = _tar([("a.jpg", b"1" * 700), ("b.jpg", b"2")])
    end = len(data)
    while data[end - 512 : end] == bytes(512):
        end -= 512
    # No end-of-archive blocks at all: accepted, as tarfile accepts it.
    assert _ours(data[:end]) == _reference(data[:end]) == [("a.jpg", b"1" * 700), ("b.jpg", b"2")]
    # Anything after the first zero block is not read.
    assert _ours(data + b"garbage" * 100) == _reference(data)
    assert _ours(bytes(1024)) == _reference(bytes(1024)) == []
    with pytest.raises(tarfile.ReadError, match="empty file"):
        _ours(b"")


def test_broken_tars_raise_readerror():
    data = _tar([("a.jpg", b"1" * 3000), ("b.jpg", b"2" * 10)])
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        _ours(data[: 512 + 100])  # truncated inside a member
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        _ours(data[: 512 + 3072 + 200])  # truncated inside a header
    with pytest.raises(tarfile.ReadError, match="checksum"):
        _ours(b"this is not a tar file" * 40)
    corrupt = bytearray(data)
    corrupt[512 + 3072 + 5] ^= 0x20  # one bit of the second header's name
    with pytest.raises(tarfile.ReadError, match="checksum"):
        _ours(bytes(corrupt))
    # tarfile's stream mode ends the archive at such a header without a word: the rest of the
    # shard would be lost. Here it is an error, so the shard fails and is retried instead.
    assert [n for n, _ in _reference(bytes(corrupt))] == ["a.jpg"]
    assert [n for n, _ in _reference(data[: 512 + 3072 + 200])] == ["a.jpg"]


def test_signed_checksum_and_base256_size():
    data = bytearray(_tar([("é.jpg", b"payload")], fmt=tarfile.GNU_FORMAT))
    header = data[:512]
    header[148:156] = b" " * 8
    # Old tars summed the header as signed bytes; tarfile accepts both sums, so must we.
    signed = sum(b - 256 if b >= 128 else b for b in header)
    assert signed != sum(header)
    data[148:156] = b"%06o\x00 " % signed
    assert _ours(bytes(data)) == _reference(bytes(data)) == [("é.jpg", b"payload")]
    # GNU base-256 sizes (members over 8 GiB) and octal ones.
    assert _number(b"\x80" + (12 * 2**30).to_bytes(11, "big"), "size") == 12 * 2**30
    assert _number(b"00000001750\x00", "size") == 1000
    assert _number(b"\x00" * 12, "size") == 0


def _fix_checksum(data: bytearray, at: int) -> None:
    data[at + 148 : at + 156] = b" " * 8
    data[at + 148 : at + 156] = b"%06o\x00 " % sum(data[at : at + 512])


def test_unknown_types_and_old_directories_are_skipped_with_their_data():
    data = bytearray(_tar([("a.jpg", b"A" * 600), ("dump", b"D" * 700), ("b.jpg", b"B" * 5)], fmt=tarfile.GNU_FORMAT))
    second = 512 + 1024  # a.jpg's header and its two data blocks
    assert data[second : second + 4] == b"dump"
    data[second + 156 : second + 157] = b"D"  # a GNU dump directory: data follows its header

    _fix_checksum(data, second)
    ours = _ours(bytes(data))
    assert ours == _reference(bytes(data)) == [("a.jpg", b"A" * 600), ("b.jpg", b"B" * 5)]
    # An old (pre-POSIX) tar marks a directory by a name ending in "/" and type NUL.
    old = bytearray(_tar([("dir/", b""), ("dir/c.jpg", b"C")], fmt=tarfile.USTAR_FORMAT))
    old[156:157] = b"\x00"
    _fix_checksum(old, 0)
    assert _ours(bytes(old)) == _reference(bytes(old)) == [("dir/c.jpg", b"C")]


def test_a_huge_pax_header_is_refused_not_read():
    header = bytearray(_tar([("a.jpg", b"1")]))[:512]
    header[156:157] = b"x"
    header[124:136] = b"%011o\x00" % (1 << 30)  # a 1 GiB pax header
    _fix_checksum(header, 0)
    with pytest.raises(tarfile.ReadError, match="pax header of 1073741824 bytes"):
        _ours(bytes(header) + bytes(4096))


def test_pax_size_and_path_records():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("short.jpg")
        info.size = 5
        info.pax_headers = {"path": "renamed/by-pax.jpg", "comment": "x=y z"}
        tar.addfile(info, io.BytesIO(b"12345"))
    data = buf.getvalue()
    assert _ours(data) == _reference(data) == [("renamed/by-pax.jpg", b"12345")]
    negative = tarfile.TarInfo("a.jpg")
    negative.size, negative.pax_headers = 3, {"size": "-5"}
    with pytest.raises(tarfile.ReadError, match="negative size"):
        _ours(negative.tobuf(tarfile.PAX_FORMAT) + b"abc".ljust(512, b"\0") + bytes(1024))


@pytest.mark.skipif(shutil.which("tar") is None, reason="no tar command")
@pytest.mark.parametrize("fmt", ["gnu", "posix", "ustar"])
def test_archives_written_by_the_tar_command(tmp_path, fmt):
    src = tmp_path / "src"
    deep = src / ("deep-directory-name-" * 3) / ("more-" * 10)
    deep.mkdir(parents=True)
    (deep / "x.jpg").write_bytes(b"\x00\x01" * 3000)
    (src / "a.txt").write_text("caption")
    (src / "link.txt").symlink_to("a.txt")
    out = tmp_path / "t.tar"
    subprocess.run(["tar", f"--format={fmt}", "-cf", str(out), "-C", str(src), "."], check=True)
    data = out.read_bytes()
    ours = _ours(data)
    assert ours == _reference(data)
    assert sorted(len(p) for _, p in ours) == [7, 6000]


class _Trickle(io.RawIOBase):
    """A stream that returns at most 100 bytes per read, as a network stream or a pipe may."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self._data.read(min(n, 100) if n is not None and n >= 0 else 100)


def test_short_reads_are_not_truncation():
    data = _tar([(m[0], m[1]) for m in MEMBERS if isinstance(m[1], bytes)])
    got = [(name, read()) for name, _, read in open_members(_Trickle(data))]
    assert got == _reference(data)
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        [read() for _, _, read in open_members(_Trickle(data[:1000]))]
    gz = _tar([("a.jpg", b"A" * 5000)], mode="w:gz")
    assert [(n, read()) for n, _, read in open_members(_Trickle(gz))] == [("a.jpg", b"A" * 5000)]


def test_tarstream_reads_from_a_plain_stream():
    data = _tar([("a.jpg", b"abc"), ("b.jpg", b"defg")])
    stream = TarStream(io.BytesIO(data))
    assert [(name, size, stream.read()) for name, size in stream] == [("a.jpg", 3, b"abc"), ("b.jpg", 4, b"defg")]
