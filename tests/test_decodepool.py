"""Decoding in processes: the same bytes as in threads, a crashing decoder costs one sample only,
and decode processes do not outlive their worker."""

from __future__ import annotations

import io
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow.parquet as pq
import pytest
from conftest import sample_photos, write_shard
from PIL import Image

from pipeline.config import ConfigError, config_from_dict
from pipeline.decodepool import resolve_mode
from pipeline.faults import CRASH_KEY, HANG_KEY
from pipeline.worker import EncodeWorker

pytestmark = pytest.mark.timeout(180)


def _jpeg(img: Image.Image, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    img.resize(size).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _mixed_shard(path):
    """21 samples: photos of several shapes with bad samples of every stage in between."""
    photos = [img for _, img in sample_photos(count=6)]
    samples = []
    for i in range(17):
        w, h = (96, 80) if i % 3 else (120, 72)
        samples.append((f"p{i:02d}", {"jpg": _jpeg(photos[i % len(photos)], (w, h)), "txt": f"photo {i}".encode()}))
        if i == 3:
            samples.append(("broken", {"jpg": samples[0][1]["jpg"][:300]}))
        if i == 9:
            samples.append(("nocap", {"txt": b"no image"}))
        if i == 10:
            samples.append(("notimg", {"jpg": b"hello"}))
        if i == 12:
            samples.append(("p00", {"jpg": samples[0][1]["jpg"]}))  # a duplicate key
    return write_shard(path, samples)


def _config(url, out, mode, **ray):
    return config_from_dict({
        "input": {"urls": url},
        "output": {"path": str(out), "dtype": "fp32"},
        "preprocess": {"resolution": 64, "crop": "random"},
        "ray": {"batch_size": 4, "decode_threads": 2, "decode_mode": mode, **ray},
        "qa": {"samples": 5},
    })


@pytest.fixture(scope="module")
def tiny_model():
    from latentae import AutoencoderKL

    return AutoencoderKL.from_preset("tiny")


def test_processes_write_the_same_bytes_as_threads(tmp_path, tiny_model):
    shard = _mixed_shard(tmp_path / "mixed.tar")
    outs = {}
    for mode in ("threads", "processes"):
        out = tmp_path / mode
        worker = EncodeWorker(_config(str(shard), out, mode), device="cpu", model=tiny_model)
        assert worker.decode_mode == mode and worker.decode_pool.chunk == (1 if mode == "threads" else 8)
        try:
            result = worker.process_shard(str(shard), "mixed", num_shards=1)
        finally:
            worker.close()
        assert result.rows == 17 and result.errors == 4
        outs[mode] = out
    for sub in ("shards/mixed.parquet", "errors/mixed.parquet", "qa/samples/mixed.parquet"):
        assert (outs["threads"] / sub).read_bytes() == (outs["processes"] / sub).read_bytes(), sub
    # The ledger lists bad samples in shard order, whichever stage found them.
    ledger = pq.read_table(outs["processes"] / "errors/mixed.parquet").to_pylist()
    assert [(e["key"], e["stage"]) for e in ledger] == [
        ("broken", "decode"), ("nocap", "read"), ("notimg", "decode"), ("p00", "read")]


def test_a_decoder_crash_costs_one_sample(tmp_path, tiny_model, monkeypatch):
    shard = _mixed_shard(tmp_path / "mixed.tar")
    monkeypatch.setenv(CRASH_KEY, "p05")  # the decode process dies on this sample, every time
    worker = EncodeWorker(_config(str(shard), tmp_path / "out", "processes"), device="cpu", model=tiny_model)
    try:
        result = worker.process_shard(str(shard), "mixed", num_shards=1)
        assert worker.decode_pool.restarts >= 2  # the first crash, then the retry of p05 alone
        # The restarted pool keeps working for the next shard.
        again = worker.process_shard(str(shard), "again", num_shards=1)
    finally:
        worker.close()
    assert result.rows == again.rows == 16
    assert result.errors_by_reason == {"decode/crashed": 1, "decode/corrupt": 1, "decode/not_an_image": 1,
                                       "read/no_image": 1, "read/duplicate_key": 1}
    rows = pq.read_table(tmp_path / "out/shards/mixed.parquet").to_pylist()
    assert sorted(r["key"] for r in rows) == [f"p{i:02d}" for i in range(17) if i != 5]
    ledger = pq.read_table(tmp_path / "out/errors/mixed.parquet").to_pylist()
    crashed = [e for e in ledger if e["error"] == "crashed"]
    assert [(e["key"], e["stage"]) for e in crashed] == [("p05", "decode")] and "died" in crashed[0]["message"]


def test_a_hanging_decoder_costs_one_sample(tmp_path, tiny_model, monkeypatch):
    shard = _mixed_shard(tmp_path / "mixed.tar")
    monkeypatch.setenv(HANG_KEY, "p07")  # a decode process never finishes this sample
    config = _config(str(shard), tmp_path / "out", "processes", decode_timeout=1)
    worker = EncodeWorker(config, device="cpu", model=tiny_model)
    t0 = time.monotonic()
    try:
        result = worker.process_shard(str(shard), "mixed", num_shards=1)
    finally:
        worker.close()
    assert time.monotonic() - t0 < 60
    assert result.rows == 16 and result.errors_by_reason["decode/timeout"] == 1
    ledger = pq.read_table(tmp_path / "out/errors/mixed.parquet").to_pylist()
    assert [(e["key"], e["message"]) for e in ledger if e["error"] == "timeout"] == [
        ("p07", "decoding took more than 1 s")]


def test_threads_ignore_the_crash_hook(tmp_path, tiny_model, monkeypatch):
    # The hook kills decode processes only; in threads it would kill the worker itself.
    shard = _mixed_shard(tmp_path / "mixed.tar")
    monkeypatch.setenv(CRASH_KEY, "p05")
    worker = EncodeWorker(_config(str(shard), tmp_path / "out", "threads"), device="cpu", model=tiny_model)
    assert worker.process_shard(str(shard), "mixed", num_shards=1).rows == 17


def test_decode_processes_exit_with_their_worker(tmp_path):
    script = textwrap.dedent("""
        import os, signal
        from pipeline.decode import DecodeOptions
        from pipeline.decodepool import DecodePool
        from pipeline.preprocess import Preprocessor
        pool = DecodePool(2, "processes", DecodeOptions(), Preprocessor([(64, 64)]))
        pool.warm_up()
        print(" ".join(str(pid) for pid in pool.pids), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    children = [int(p) for p in proc.stdout.split()]
    assert len(children) == 2
    deadline = time.monotonic() + 10
    alive = children
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _alive(pid)]
        time.sleep(0.2)
    assert not alive, f"decode processes {alive} outlived their worker"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_mode_choice_and_config():
    assert resolve_mode("auto", gpu=True, workers=8) == "processes"
    assert resolve_mode("auto", gpu=True, workers=7) == "threads"
    assert resolve_mode("auto", gpu=False, workers=16) == "threads"
    assert resolve_mode("threads", gpu=True, workers=16) == "threads"
    assert resolve_mode("processes", gpu=False, workers=1) == "processes"
    assert config_from_dict({"input": {"urls": "a.tar"}, "output": {"path": "o"}}).ray.decode_mode == "auto"
    with pytest.raises(ConfigError, match=r"ray\.decode_mode: expected one of auto\|threads\|processes"):
        config_from_dict({"input": {"urls": "a.tar"}, "output": {"path": "o"}, "ray": {"decode_mode": "fork"}})


def test_decode_processes_are_small():
    # A decode process imports Pillow and numpy, not torch or Ray, whatever its worker imported.
    import ray  # noqa: F401  (imported here, it must not reach the children)
    import torch  # noqa: F401

    from pipeline.decode import DecodeOptions
    from pipeline.decodepool import DecodePool
    from pipeline.preprocess import Preprocessor

    pool = DecodePool(2, "processes", DecodeOptions(), Preprocessor([(64, 64)]))
    try:
        pool.warm_up()
        for pid in pool.pids:
            with open(f"/proc/{pid}/maps") as f:
                maps = f.read()
            assert "libtorch" not in maps and "_raylet" not in maps
            with open(f"/proc/{pid}/status") as f:
                rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
            assert rss_kb < 120_000
    finally:
        pool.close()
    assert all(not _alive(pid) for pid in pool.pids)  # close() ends them


def test_stray_output_and_garbage_answers(tmp_path):
    # Startup code of a decode process prints to its stdout (harmless: answers use their own
    # pipe), and the first process also writes garbage into its answer pipe: it is stopped and
    # replaced, and its chunk is redone, with every result still right.
    import sys

    from pipeline.decode import DecodeOptions
    from pipeline.decodepool import DecodePool
    from pipeline.preprocess import Preprocessor

    site = tmp_path / "site"
    site.mkdir()
    marker = tmp_path / "garbage-written"
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import os, sys
        os.write(1, b"noise on fd 1\\n")
        print("noise from print")
        if sys.argv[-1].isdigit():
            try:
                os.close(os.open({str(marker)!r}, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                os.write(int(sys.argv[-1]), b"this is not a message header at all")
            except FileExistsError:
                pass
    """))
    old = os.environ.get("PYTHONPATH")
    sys.path.insert(0, str(site))  # the pool passes the worker's import path to its processes
    try:
        pool = DecodePool(1, "processes", DecodeOptions(), Preprocessor([(64, 64)]))
    finally:
        sys.path.remove(str(site))
    assert os.environ.get("PYTHONPATH") == old
    try:
        photo = sample_photos(count=1)[0][1]
        items = [("a", _jpeg(photo, (96, 80))), ("b", b"not an image"), ("c", _jpeg(photo, (80, 120)))]
        results = pool.result(pool.submit(items), items)
    finally:
        pool.close()
    assert marker.exists() and pool.restarts == 1
    assert results[0].pixels.shape == results[2].pixels.shape == (64, 64, 3)
    assert results[1].reason == "not_an_image"


def test_messages_carry_their_buffers_out_of_band():
    import numpy as np

    from pipeline.decodepool import ProtocolError, _read_message, _write_message
    from pipeline.preprocess import Preprocessed

    jpeg = bytes(range(256)) * 40
    stream = io.BytesIO()
    _write_message(stream, [("k1", pickle.PickleBuffer(jpeg)), ("k2", pickle.PickleBuffer(b"x"))])
    message = stream.getvalue()
    assert jpeg in message and message.count(jpeg) == 1  # sent once, raw, after the pickle
    got = _read_message(io.BytesIO(message))
    assert got == [("k1", jpeg), ("k2", b"x")] and type(got[0][1]) is bytes

    pixels = np.arange(64 * 48 * 3, dtype=np.uint8).reshape(64, 48, 3) % 251
    stream = io.BytesIO()
    _write_message(stream, [Preprocessed(pixels=pixels, original_size=(70, 50), crop_top_left=(3, 1),
                                         target_size=(64, 48))])
    (result,) = _read_message(io.BytesIO(stream.getvalue()), writable=True)
    assert np.array_equal(result.pixels, pixels) and result.pixels.flags.writeable
    assert (result.original_size, result.crop_top_left) == ((70, 50), (3, 1))

    with pytest.raises(EOFError):  # cut inside the pixel buffer
        _read_message(io.BytesIO(stream.getvalue()[:-100]), writable=True)
    with pytest.raises(ProtocolError):
        _read_message(io.BytesIO(b"LDP1" + stream.getvalue()[4:]))
