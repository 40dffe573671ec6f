"""storage.py and layout.py: whole-object writes, redaction, path layout, on local disk and S3."""

from __future__ import annotations

import os

import pytest

from pipeline import layout, storage


def test_redact_urls():
    assert storage.redact("s3://bucket/a/b.tar") == "s3://bucket/a/b.tar"
    assert storage.redact("https://user:pa55@host/x.tar") == "https://***@host/x.tar"
    presigned = "https://b.s3.amazonaws.com/k.tar?X-Amz-Credential=AKIA123&X-Amz-Signature=abc&x=1"
    red = storage.redact(presigned)
    assert "AKIA123" not in red and "abc" not in red and "x=1" in red
    assert "sv=1" in storage.redact("https://a.blob.core.windows.net/c/x.tar?sv=1&sig=SECRET")
    assert "SECRET" not in storage.redact("https://a.blob.core.windows.net/c/x.tar?sv=1&sig=SECRET")
    assert storage.redact("pipe:curl -s https://u:p@h/x.tar") == "pipe:curl -s https://***@h/x.tar"
    assert storage.redact("simplecache::s3://k:s@bucket/x") == "simplecache::s3://***@bucket/x"
    opts = storage.redact_options({"key": "AKIA", "secret": "s", "client_kwargs": {"endpoint_url": "http://h:1",
                                   "aws_session_token": "t"}, "anon": False})
    assert opts == {"key": "***", "secret": "***", "client_kwargs": {"endpoint_url": "http://h:1",
                    "aws_session_token": "***"}, "anon": False}


def test_join():
    assert storage.join("s3://b", "shards", "x.parquet") == "s3://b/shards/x.parquet"
    assert storage.join("s3://b/out/", "/_commits/", "a.json") == "s3://b/out/_commits/a.json"
    assert storage.join("/tmp/o", "a") == "/tmp/o/a"


def test_local_whole_object_writes(tmp_path):
    url = str(tmp_path / "deep" / "dir" / "obj.bin")
    storage.put_bytes(url, b"first")
    storage.put_bytes(url, b"second")
    assert storage.read_bytes(url) == b"second"
    assert storage.exists(url) and storage.size(url) == 6
    src = tmp_path / "local.bin"
    src.write_bytes(b"payload")
    storage.put_file(src, str(tmp_path / "deep" / "moved.bin"), move=True)
    assert not src.exists()
    assert storage.list_files(str(tmp_path / "deep" / "dir")) == {"obj.bin": 6}
    assert sorted(storage.list_files(str(tmp_path / "deep"))) == ["moved.bin"]
    storage.remove(url)
    assert not storage.exists(url) and storage.size(url) is None
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(url)
    assert storage.list_files(str(tmp_path / "absent")) == {}


def test_local_failed_write_keeps_old_object(tmp_path, monkeypatch):
    url = str(tmp_path / "obj.bin")
    storage.put_bytes(url, b"good")

    def boom(*a, **k):
        raise OSError("disk full")

    src = tmp_path / "src" / "local.bin"
    src.parent.mkdir()
    src.write_bytes(b"partial")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(storage.StorageError, match="obj.bin"):
        storage.put_bytes(url, b"partial")
    for move in (False, True):
        with pytest.raises(storage.StorageError, match="obj.bin"):
            storage.put_file(src, url, move=move)
    monkeypatch.undo()
    assert storage.read_bytes(url) == b"good"
    assert sorted(os.listdir(tmp_path)) == ["obj.bin", "src"]  # no temporary file left behind
    assert src.read_bytes() == b"partial"  # a failed move keeps its source


def test_s3_whole_object_writes(s3_server, tmp_path):
    so = s3_server.storage_options
    root = s3_server.bucket("storage-test")
    url = storage.join(root, "a", "obj.bin")
    storage.put_bytes(url, b"hello", so)
    assert storage.read_bytes(url, so) == b"hello"
    local = tmp_path / "f.bin"
    local.write_bytes(b"x" * 1000)
    storage.put_file(local, storage.join(root, "a", "f.bin"), so)
    assert storage.list_files(storage.join(root, "a"), so) == {"obj.bin": 5, "f.bin": 1000}
    got = storage.read_many([url, storage.join(root, "a", "nope")], so)
    assert got == {url: b"hello", storage.join(root, "a", "nope"): None}
    with storage.open_input(storage.join(root, "a", "f.bin"), so) as f:
        assert f.read() == b"x" * 1000
    storage.remove(url, so)
    assert not storage.exists(url, so)


def test_layout_urls():
    assert layout.shard_url("s3://o", "n", "wds") == "s3://o/shards/n.tar"
    assert layout.commit_url("s3://o/", "n") == "s3://o/_commits/n.json"
    assert layout.errors_url("/o", "n") == "/o/errors/n.parquet"
    assert layout.qa_sample_url("/o", "n") == "/o/qa/samples/n.parquet"


def test_local_objects_follow_the_umask(tmp_path):
    # Published files get the mode a plain open() would give them, not mkstemp's 0600.
    mask = os.umask(0o022)
    os.umask(mask)
    want = 0o666 & ~mask
    storage.put_bytes(str(tmp_path / "a.json"), b"{}")
    fd, local = __import__("tempfile").mkstemp(dir=tmp_path)
    os.close(fd)
    storage.put_file(local, str(tmp_path / "out" / "b.parquet"), move=True)
    copied = tmp_path / "c.bin"
    copied.write_bytes(b"x")
    os.chmod(copied, 0o600)
    storage.put_file(copied, str(tmp_path / "out" / "c.bin"))
    for name in ("a.json", "out/b.parquet", "out/c.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == want, name
