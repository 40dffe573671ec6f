"""Tar shard reading: WebDataset grouping, odd keys reported (never merged), S3 streaming."""

from __future__ import annotations

import io
import tarfile

import pytest
from conftest import write_shard

from pipeline.reader import Sample, SampleError, ShardReader, ShardReadError, split_member_name


def _read(path, **kw):
    return list(ShardReader(str(path), **kw))


def test_split_member_name():
    assert split_member_name("dir/abc.def.jpg") == ("dir/abc", "def.jpg")
    assert split_member_name("./k1.jpg") == ("k1", "jpg")
    assert split_member_name("README") is None
    assert split_member_name(".hidden") is None


def test_grouping_caption_and_meta(tmp_path):
    path = write_shard(tmp_path / "a.tar", [
        ("k1", {"jpg": b"J1", "txt": b"a cat", "json": b'{"caption": "from json", "w": 3}', "cls": b"7"}),
        ("k2", {"png": b"P2", "seg.png": b"S2"}),
        ("dir/k3", {"v1.webp": b"W3"}),
    ])
    items = _read(path)
    assert all(isinstance(i, Sample) for i in items)
    k1, k2, k3 = items
    assert (k1.key, k1.index, k1.image, k1.image_ext, k1.caption) == ("k1", 0, b"J1", "jpg", "a cat")
    assert k1.meta == '{"caption": "from json", "w": 3}'
    assert (k2.image, k2.image_ext, k2.caption, k2.meta) == (b"P2", "png", None, "{}")  # whole ext beats seg.png
    assert (k3.key, k3.image, k3.image_ext) == ("dir/k3", b"W3", "v1.webp")
    by_json = _read(path, caption_key="json:caption")
    assert by_json[0].caption == "from json" and by_json[1].caption is None


def test_odd_keys_are_ledgered_not_merged(tmp_path):
    path = write_shard(tmp_path / "odd.tar", [
        ("a", {"jpg": b"A"}),
        ("b", {"txt": b"no image here"}),
        ("a", {"txt": b"late caption for a"}),  # non-adjacent member of key a
        ("c", {"v1.jpg": b"C1", "v2.jpg": b"C2"}),
        ("d", {"jpg": b"D"}),
    ])
    # the same member twice within one sample
    with tarfile.open(path, "a") as tar:
        for data in (b"E1", b"E2"):
            info = tarfile.TarInfo("e.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    items = _read(path)
    kinds = [(i.key, i.reason if isinstance(i, SampleError) else "ok") for i in items]
    assert kinds == [("a", "ok"), ("b", "no_image"), ("a", "duplicate_key"), ("c", "ambiguous_image"),
                     ("d", "ok"), ("e", "duplicate_member")]
    assert items[0].image == b"A" and items[0].caption is None  # never merged with the late member
    assert [i.index for i in items] == list(range(6))


def test_member_size_limit_and_broken_tars(tmp_path):
    path = write_shard(tmp_path / "big.tar", [("a", {"jpg": b"x" * 100}), ("b", {"jpg": b"y"})])
    items = _read(path, max_member_bytes=50)
    assert isinstance(items[0], SampleError) and items[0].reason == "member_too_large"
    assert isinstance(items[1], Sample)

    data = path.read_bytes()
    (tmp_path / "trunc.tar").write_bytes(data[: 512 + 50])
    with pytest.raises(ShardReadError, match="trunc.tar"):
        _read(tmp_path / "trunc.tar")
    # A damaged header after the first sample: the shard fails (to be retried), it does not
    # end early with the samples behind the damage silently missing.
    damaged = bytearray(data)
    second = 512 + 512  # the header of b.jpg, after a.jpg's header and its one data block
    assert damaged[second : second + 5] == b"b.jpg"
    damaged[second] ^= 0x01
    (tmp_path / "damaged.tar").write_bytes(bytes(damaged))
    with pytest.raises(ShardReadError, match="damaged.tar.*checksum"):
        _read(tmp_path / "damaged.tar")
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(ShardReadError, match="junk.tar"):
        _read(tmp_path / "junk.tar")
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        _read(tmp_path / "missing.tar")


def test_gzip_tar(tmp_path):
    path = tmp_path / "z.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("k.jpg", b"J"), ("k.txt", b"t")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (item,) = _read(path)
    assert item.image == b"J" and item.caption == "t"


def test_streams_from_s3(s3_server, tmp_path):
    import s3fs

    samples = [(f"{i:04d}", {"jpg": bytes([i % 256]) * 3000, "txt": f"c{i}".encode()}) for i in range(200)]
    local = write_shard(tmp_path / "s.tar", samples)
    bucket = s3_server.bucket("reader-test")
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    fs.put_file(str(local), f"{bucket[5:]}/s.tar")
    reader = ShardReader(f"{bucket}/s.tar", s3_server.storage_options)
    items = list(reader)
    assert [i.key for i in items] == [k for k, _ in samples]
    assert items[123].image == bytes([123]) * 3000 and items[123].caption == "c123"
