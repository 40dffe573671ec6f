"""Hostile and mistaken inputs, as a new user would hit them: named before work starts, or ledgered.

One job runs end to end in a subprocess (as `python -m pipeline encode` runs) over shards with a
member name that is not UTF-8, path-traversing and absolute member names, an 8x8 image, an
invalid UTF-8 caption and a truncated shard; it checks the ledger, the tensor tar's member names
and what reaches the console. The mistakes that must be refused before anything is written run
the command line in this process (they end before Ray starts). The rest drive the reader,
decoder and preprocessor directly on crafted bytes.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import tracemalloc
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import sample_photos

from pipeline import cli, driver
from pipeline.config import ConfigError, PreprocessConfig, config_from_dict
from pipeline.decode import DecodeError, DecodeOptions, decode_image
from pipeline.decodepool import DecodeFailure, prepare
from pipeline.format_wds import member_key
from pipeline.preflight import InputError, check_files, check_inputs
from pipeline.preprocess import Preprocessor
from pipeline.reader import SampleError, ShardReader, ShardReadError

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(300)

BAD_NAME = b"caf\xe9".decode("utf-8", "surrogateescape")  # Latin-1 bytes: not UTF-8


@functools.cache
def _photos():
    return [photo.convert("RGB") for _, photo in sample_photos(count=2)]


def _image_bytes(size: tuple[int, int], fmt: str = "JPEG", index: int = 0) -> bytes:
    photo = _photos()[index]
    buf = io.BytesIO()
    photo.convert("RGB").resize(size).save(buf, format=fmt)
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    # GNU format writes names as their bytes (surrogateescape), as tools on any system may.
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _job(tmp_path: Path, urls: str, out: Path, **sections) -> Path:
    raw = {
        "input": {"urls": urls},
        "output": {"path": str(out)},
        "model": {"preset": "tiny"},
        "preprocess": {"resolution": 64},
        "ray": {"workers": 2, "num_gpus_per_worker": 0, "num_cpus_per_worker": 1, "batch_size": 4,
                "max_attempts": 1},
        "qa": {"samples": 4},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


# -- one job over hostile shards ------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    shards = tmp / "shards"
    shards.mkdir()
    jpg = _image_bytes((80, 64))
    _tar(shards / "00000.tar", [
        ("good-a.jpg", jpg), ("good-a.txt", b"a photo"),
        (f"{BAD_NAME}.jpg", jpg), (f"{BAD_NAME}.txt", b"latin-1 name"),
        ("../../../../tmp/x.jpg", jpg), ("../../../../tmp/x.txt", b"climbs out"),
        ("/abs/path/y.jpg", jpg),
        ("icon.png", _image_bytes((8, 8), "PNG")),
    ])
    _tar(shards / "00001.tar", [("good-b.jpg", _image_bytes((64, 96), index=1)), ("good-b.txt", b"\xffbad \xfe caption")])
    whole = _tar(tmp / "whole.tar", [("lost.jpg", jpg)]).read_bytes()
    (shards / "00002.tar").write_bytes(whole[:700])  # cut inside the member: the shard cannot be read
    out = tmp / "out"
    job = _job(tmp, str(shards / "*.tar"), out, output={"format": "wds"})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "encode", str(job)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    return proc, out


def _commit(out: Path, stem: str) -> dict:
    (path,) = (out / "_commits").glob(f"{stem}*.json")
    return json.loads(path.read_text())


def _ledger(out: Path, stem: str) -> list[dict]:
    (path,) = (out / "errors").glob(f"{stem}*.parquet")
    return pq.read_table(path).to_pylist()


def test_a_name_that_is_not_utf8_is_ledgered_and_the_shard_commits(hostile_run):
    proc, out = hostile_run
    assert proc.returncode == cli.EXIT_FAILED, proc.stderr[-3000:]  # only the truncated shard failed
    commit = _commit(out, "00000")
    assert commit["rows"] == 3  # good-a, ../../../../tmp/x, /abs/path/y
    ledger = {(r["stage"], r["error"]): r for r in _ledger(out, "00000")}
    row = ledger[("read", "key_not_utf8")]
    assert row["key"] == "caf\\xe9" and "caf\\xe9" in row["message"]


def test_member_names_in_tensor_tars_are_safe_and_keys_stay_in_the_json(hostile_run, tmp_path):
    _, out = hostile_run
    (shard,) = (out / "shards").glob("00000*.tar")
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
        for m in members:
            assert not m.name.startswith("/") and ".." not in m.name.split("/"), m.name
            tarfile.data_filter(m, str(tmp_path))  # what a careful unpacker checks: raises on escapes
        keys = {json.loads(tar.extractfile(m).read())["key"] for m in members if m.name.endswith(".json")}
        tar.extractall(tmp_path / "unpacked")  # no filter, as the unwary unpack
    assert keys == {"good-a", "../../../../tmp/x", "/abs/path/y"}
    names = {m.name for m in members}
    assert {"good-a.latent.npy", "%2E%2E%2F%2E%2E%2F%2E%2E%2F%2E%2E%2Ftmp%2Fx.latent.npy",
            "%2Fabs%2Fpath%2Fy.json"} <= names
    assert all(p.resolve().is_relative_to(tmp_path / "unpacked") for p in (tmp_path / "unpacked").rglob("*"))


def test_tiny_images_are_refused_not_blown_up(hostile_run):
    _, out = hostile_run
    ledger = {(r["stage"], r["error"]): r for r in _ledger(out, "00000")}
    row = ledger[("preprocess", "too_small")]
    assert row["key"] == "icon" and "8x8" in row["message"] and "max_upscale 4" in row["message"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preprocess"]["max_upscale"] == 4


def test_invalid_utf8_captions_are_kept_with_replacement_characters(hostile_run):
    _, out = hostile_run
    (shard,) = (out / "shards").glob("00001*.tar")
    with tarfile.open(shard) as tar:
        record = json.loads(tar.extractfile("good-b.json").read())
    assert record["caption"] == "\ufffdbad \ufffd caption"


def test_the_console_shows_the_job_and_its_errors_not_rays_noise(hostile_run):
    proc, _ = hostile_run
    console = proc.stdout + proc.stderr
    for noise in ("Token authentication", "dashboard", "(EncodeActor", "repeated", "Fatal Python error",
                  "Stack trace", "worker.py:"):
        assert noise not in console, noise
    assert "Encode summary" in proc.stdout and "committed" in proc.stderr
    assert re.search(r"shard 00002\S* FAILED after 1 attempt\(s\): ShardReadError: cannot read input shard", proc.stderr)
    found = re.search(r"Ray's own messages: (\S+)", proc.stderr)
    assert found and "Started a local Ray instance" in Path(found.group(1)).read_text()


def test_not_utf8_names_with_qa_off_in_parquet(tmp_path):
    # The other path that once failed the shard: the writer's key column (no QA hashing).
    from pipeline.worker import EncodeWorker

    shard = _tar(tmp_path / "00000.tar", [(f"{BAD_NAME}.jpg", _image_bytes((64, 64))),
                                          ("good.jpg", _image_bytes((64, 64)))])
    config = config_from_dict({"input": {"urls": str(shard)}, "output": {"path": str(tmp_path / "out")},
                               "preprocess": {"resolution": 64}, "ray": {"batch_size": 2}, "qa": {"samples": 0}})
    worker = EncodeWorker(config, device="cpu")
    try:
        result = worker.process_shard(str(shard), "00000")
    finally:
        worker.close()
    assert (result.rows, result.errors_by_reason) == (1, {"read/key_not_utf8": 1})
    assert pq.read_table(tmp_path / "out" / "shards" / "00000.parquet").column("key").to_pylist() == ["good"]
    assert pq.read_table(tmp_path / "out" / "errors" / "00000.parquet").column("key").to_pylist() == ["caf\\xe9"]


def test_member_key_rule():
    for plain in ("000001", "dir/abc", "a b/c-d_e", "caf\u00e9", ".hidden/x"):
        assert member_key(plain) == plain
    assert member_key("../x") == "%2E%2E%2Fx"
    assert member_key("/etc/passwd") == "%2Fetc%2Fpasswd"
    assert member_key("a//b") == "a%2F%2Fb" and member_key("a/./b") == "a%2F%2E%2Fb"
    assert member_key("100%") == "100%25" and member_key("back\\slash") == "back%5Cslash"
    assert member_key("nul\x00") == "nul%00"
    # Escaped names always hold "%" and plain ones never do: two keys never share a name.
    assert member_key("%2E%2E%2Fx") != member_key("../x")


# -- refused before anything is written (in this process; Ray never starts) ------------------------


@pytest.fixture
def no_ray(monkeypatch):
    def started(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(driver, "connect_ray", started)


def _refused(job: Path, capsys, *overrides: str) -> str:
    code = cli.main(["encode", str(job), *overrides])
    captured = capsys.readouterr()
    assert code == cli.EXIT_USAGE, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


@pytest.fixture
def one_shard(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _tar(shards / "00000.tar", [("a.jpg", _image_bytes((64, 64)))])
    return shards


def test_bad_weights_are_named_before_ray_starts(tmp_path, one_shard, capsys, no_ray):
    import pickle

    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    out = tmp_path / "out"
    job = _job(tmp_path, str(one_shard / "*.tar"), out)
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": Payload()}, tmp_path / "evil.ckpt")
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": Payload()}, f, protocol=2)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "folder").mkdir()
    (tmp_path / "model.onnx").write_bytes(b"x")
    cases = {
        "missing.safetensors": "does not exist",
        "evil.ckpt": "is refused: its pickle needs objects other than tensors and plain containers (posix.system)",
        "evil.pt": "is refused: its pickle needs objects other than tensors and plain containers (posix.system)",
        "junk.safetensors": "is not a safetensors file",
        "folder": "is a folder but not a diffusers autoencoder folder",
        "model.onnx": "is not a known weights format",
    }
    for name, reason in cases.items():
        line = _refused(job, capsys, f"model.weights={tmp_path / name}")
        assert line.startswith(f"error: model.weights: {tmp_path / name} ") and reason in line, line
    assert not out.exists()


def test_remote_weights_are_checked_without_downloading(s3_server):
    import s3fs

    from pipeline.config import ModelConfig
    from pipeline.models import check_weights

    so = s3_server.storage_options
    bucket = s3_server.bucket("preflight-weights")
    s3fs.S3FileSystem(**so).pipe(f"{bucket[5:]}/vae/model.onnx", b"x")
    check_weights(ModelConfig(weights=f"{bucket}/vae", storage_options=so))  # a folder: its files are the workers'
    for url, reason in ((f"{bucket}/missing.safetensors", "does not exist"),
                        (f"{bucket}/vae/model.onnx", "is not a known weights format")):
        with pytest.raises(ConfigError, match=reason):
            check_weights(ModelConfig(weights=url, storage_options=so))


def test_worker_start_up_errors_carry_their_cause(ray_local):
    from pipeline.cluster import ActorPool, start_actors

    class Broken:
        def __init__(self):
            raise FileNotFoundError("weights /models/vae.safetensors vanished")

        def probe(self):
            return "ok"

    pool = ActorPool(start_actors(Broken, 1, num_cpus=0, num_gpus=0), label="encode worker", per_actor=1,
                     probe="probe")
    with pytest.raises(RuntimeError) as err:
        pool.first_answer()
    assert str(err.value) == ("no encode worker could start: "
                              "FileNotFoundError: weights /models/vae.safetensors vanished")


def test_an_output_that_cannot_be_written_is_one_line(tmp_path, one_shard, capsys, no_ray, s3_server):
    job = _job(tmp_path, str(one_shard / "*.tar"), tmp_path / "out")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    line = _refused(job, capsys, f"output.path={a_file}")
    assert line == f"error: output.path: {a_file} is a file, not a folder"
    line = _refused(job, capsys, f"output.path={a_file}/out")
    assert line == f"error: output.path: {a_file}/out cannot be created: {a_file} is a file"
    # Object stores are checked by the first write: the lease, before Ray starts.
    so = json.dumps(s3_server.storage_options)
    line = _refused(job, capsys, "output.path=s3://no-such-bucket/out", f"output.storage_options={so}")
    assert line.startswith("error: output.path: ") and "s3://no-such-bucket/out" in line


def test_missing_inputs_are_named_before_anything_is_written(tmp_path, one_shard, capsys, no_ray):
    out = tmp_path / "out"
    job = _job(tmp_path, str(one_shard / "*.tar"), out)
    line = _refused(job, capsys, f"input.urls={one_shard}/{{00000..00013}}.tar")
    assert line == (f"error: input.urls: 13 input shard(s) do not exist: {one_shard}/00001.tar, "
                    f"{one_shard}/00002.tar, {one_shard}/00003.tar, {one_shard}/00004.tar, "
                    f"{one_shard}/00005.tar and 8 more")
    line = _refused(job, capsys, f"input.urls={one_shard}/{{}}.tar")
    assert line == f"error: input.urls: 1 input shard(s) do not exist: {one_shard}/{{}}.tar"
    line = _refused(job, capsys, f"input.urls=[{one_shard}/00000.tar, {tmp_path}/nowhere/00000.tar]")
    assert line == f"error: input.urls: 1 input shard(s) do not exist: {tmp_path}/nowhere/00000.tar"
    line = _refused(job, capsys, f"input.urls={one_shard}")
    assert line == f"error: input.urls: 1 input(s) are folders, not tar files: {one_shard}"
    line = _refused(job, capsys, f"input.urls={one_shard}/*.tgz")
    assert "matches no files" in line
    # An S3 endpoint that refuses connections (no retries, to keep the test short).
    so = json.dumps({"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
                     "config_kwargs": {"retries": {"max_attempts": 1}}})
    line = _refused(job, capsys, "input.urls=s3://bucket/{0000..0009}.tar", f"input.storage_options={so}")
    assert line.startswith("error: input.urls: cannot list s3://bucket: EndpointConnectionError")
    assert not out.exists()
    assert cli.main(["encode", str(job), f"input.urls={one_shard}/0000{{0,1}}.tar", "--dry-run"]) == cli.EXIT_USAGE
    assert "00001.tar" in capsys.readouterr().err


def test_planned_shards_are_checked_by_name_not_as_patterns(tmp_path):
    # A glob can match a file whose name holds brace characters: once planned it is a file name.
    named = tmp_path / "a{1,2}.tar"
    named.write_bytes(b"x")
    check_files([str(named)])
    with pytest.raises(InputError, match="2 input shard"):
        check_inputs(str(named))  # as a pattern it means a1.tar and a2.tar, which do not exist


def test_inputs_are_checked_with_one_list_per_folder(counting_s3):
    import s3fs

    so = counting_s3.storage_options
    bucket = counting_s3.bucket("preflight")
    fs = s3fs.S3FileSystem(**so)
    for i in range(3):
        fs.pipe(f"{bucket[5:]}/a/{i:05d}.tar", b"x")
    fs.pipe(f"{bucket[5:]}/b/00000.tar", b"x")
    counting_s3.reset()
    check_inputs([f"{bucket}/a/{{00000..00002}}.tar", f"{bucket}/b/00000.tar"], so)
    with pytest.raises(InputError, match=r"2 input shard\(s\) do not exist: s3://preflight/a/00003.tar, "
                                         r"s3://preflight/b/00001.tar$"):
        check_inputs([f"{bucket}/a/{{00000..00003}}.tar", f"{bucket}/b/0000{{0,1}}.tar"], so)
    assert counting_s3.count("HEAD") == 0
    assert counting_s3.count("GET", contains="list-type=2") == counting_s3.count() == 4  # 2 folders x 2 checks


# -- upscaling limit ------------------------------------------------------------------------------


def test_upscale_limit_default_and_configuration():
    config = config_from_dict({"input": {"urls": "x.tar"}, "output": {"path": "o"}})
    assert config.preprocess.max_upscale == 4.0
    pre = Preprocessor.from_config(PreprocessConfig(resolution=128))
    icon = decode_image(_image_bytes((8, 8), "PNG"))
    assert prepare(_image_bytes((32, 40), "PNG"), "k", DecodeOptions(), pre).target_size == (128, 128)  # 4x
    refused = prepare(_image_bytes((8, 8), "PNG"), "k", DecodeOptions(), pre)
    assert refused == DecodeFailure("preprocess", "too_small", "8x8 (HxW) would be upscaled 16x to cover 128x128, "
                                                                "more than preprocess.max_upscale 4")
    unlimited = Preprocessor.from_config(PreprocessConfig(resolution=128, max_upscale=None))
    assert unlimited(icon, "k").pixels.shape == (128, 128, 3)
    with pytest.raises(ConfigError, match=r"preprocess.max_upscale: must be >= 1"):
        config_from_dict({"input": {"urls": "x.tar"}, "output": {"path": "o"}, "preprocess": {"max_upscale": 0.5}})


# -- crafted bytes: bombs, lies and floods --------------------------------------------------------


def _jpeg_claiming(height: int, width: int) -> bytes:
    data = bytearray(_image_bytes((16, 16)))
    sof = data.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def _png_bomb(width: int, height: int) -> bytes:
    """A valid greyscale PNG of zeros: a few hundred KB that decode to width x height bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused_from_the_header():
    bomb = _png_bomb(12000, 12000)  # 144 Mpx, over the default max_pixels
    assert len(bomb) < 1_000_000
    for data in (bomb, _jpeg_claiming(65500, 65500)):
        with pytest.raises(DecodeError) as err:
            decode_image(data)
        assert err.value.reason == "too_large"


def _reader_items(path: Path) -> list:
    return list(ShardReader(str(path)))


class _Zeros(io.RawIOBase):
    """`size` zero bytes, read in pieces (the bomb is never whole in memory)."""

    def __init__(self, size: int):
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


def test_a_gzip_bomb_member_is_skipped_in_bounded_memory(tmp_path):
    path = tmp_path / "bomb.tar.gz"
    with gzip.open(path, "wb", compresslevel=9) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, size in (("bomb.jpg", 200 * 1024 * 1024), ("ok.jpg", 4), ("ok.txt", 4)):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, _Zeros(size))
    assert path.stat().st_size < 1_000_000
    tracemalloc.start()
    try:
        items = _reader_items(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(type(i).__name__, i.key) for i in items] == [("SampleError", "bomb"), ("Sample", "ok")]
    assert items[0].reason == "member_too_large" and peak < 32 * 1024 * 1024


def test_a_member_claiming_2_gib_in_a_short_file_fails_the_shard(tmp_path):
    info = tarfile.TarInfo("big.jpg")
    info.size = 2 * 1024**3
    path = tmp_path / "liar.tar"
    path.write_bytes(info.tobuf(tarfile.GNU_FORMAT) + b"\xff\xd8" * 100)
    with pytest.raises(ShardReadError, match="cannot read input shard"):
        _reader_items(path)


def test_fifty_thousand_one_byte_members(tmp_path):
    path = tmp_path / "flood.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo()
        info.size = 1
        for i in range(50_000):
            info.name = f"{i:06d}.cls"
            tar.addfile(info, io.BytesIO(b"1"))
    items = _reader_items(path)
    assert len(items) == 50_000 and all(isinstance(i, SampleError) and i.reason == "no_image" for i in items)


def test_the_readme_error_table_lists_every_exit_code_and_ledger_reason():
    from pipeline.reasons import ERRORS

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Errors: exit codes and ledger reasons"):]
    section = section[: section.index("\n### ", 1)]
    for stage, errors in ERRORS.items():
        for error in errors:
            assert f"| `{stage}/{error}` |" in section, f"{stage}/{error}"
    exits = {int(m) for m in re.findall(r"^\| (\d+) \|", section, re.MULTILINE)}
    assert exits == {cli.EXIT_OK, cli.EXIT_FAILED, cli.EXIT_USAGE, cli.EXIT_INTERRUPTED}
