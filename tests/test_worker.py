"""EncodeWorker driven directly (no Ray): rows, ledger, QA side table, store modes, buckets."""

from __future__ import annotations

import hashlib
import io
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import sample_photos, write_shard
from PIL import Image

from pipeline.commit import read_commit
from pipeline.config import ConfigError, config_from_dict
from pipeline.qa_select import qa_per_shard
from pipeline.worker import EncodeWorker
from pipeline.writer import from_storage


def _config(urls, out, **sections):
    raw = {
        "input": {"urls": urls},
        "output": {"path": str(out), "dtype": "fp32"},
        "preprocess": {"resolution": 64},
        "ray": {"batch_size": 3, "decode_threads": 2},
        "qa": {"samples": 4},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)


def _rows(out, name):
    return pq.read_table(f"{out}/shards/{name}.parquet").to_pylist()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_model():
    from latentae import AutoencoderKL

    return AutoencoderKL.from_preset("tiny")


def test_shard_rows_match_the_encoder(sample_shards, tmp_path, tiny_model):
    out = tmp_path / "out"
    config = _config([str(p) for p in sample_shards], out)
    worker = EncodeWorker(config, device="cpu", model=tiny_model)
    result = worker.process_shard(str(sample_shards[0]), "00000", num_shards=2)
    assert (result.rows, result.errors, result.qa_rows) == (4, 0, qa_per_shard(4, 2)) == (4, 0, 2)

    rows = _rows(out, "00000")
    assert sorted(r["key"] for r in rows) == [f"000{i:04d}" for i in range(4)]
    first = next(r for r in rows if r["key"] == "0000000")
    assert first["caption"].startswith("a photo of ") and json.loads(first["meta"])["name"]
    assert first["source"] == str(sample_shards[0]) and first["index"] == 0
    assert tuple(first["target_size"]) == (64, 64) and tuple(first["original_size"]) == (80, 64)
    assert tuple(first["crop_top_left"]) == (8, 0)
    assert read_commit(str(out), "00000") is not None
    # Where the shard's time went: the CPU encoder does the bulk of it; the parts fit in the total.
    assert set(result.stage_seconds) == {"decode_wait", "encode", "write_wait", "commit"}
    assert result.stage_seconds["encode"] > 0 and sum(result.stage_seconds.values()) <= result.seconds + 0.01

    # QA side table: the 2 keys with the smallest sha1, pixels exactly as encoded, fp32 mean
    qa = pq.read_table(f"{out}/qa/samples/00000.parquet").to_pylist()
    keys = sorted((r["key"] for r in rows), key=lambda k: hashlib.sha1(k.encode()).digest())
    assert [q["key"] for q in qa] == keys[:2]
    q = qa[0]
    pixels = np.frombuffer(q["pixels"], np.uint8).reshape(q["pixels_shape"])
    assert pixels.shape == (64, 64, 3) and q["bucket"] == "64x64"
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.inference_mode():
        expected = tiny_model.encode(x).mean[0].numpy()
    latent = np.asarray(q["latent"], np.float32).reshape(q["latent_shape"])
    np.testing.assert_allclose(latent, expected, rtol=1e-4, atol=1e-4)
    stored = next(r for r in rows if r["key"] == q["key"])
    np.testing.assert_array_equal(np.asarray(stored["latent"], np.float32).reshape(latent.shape), latent)

    assert worker.manifest.shapes == [[tiny_model.latent_channels, 8, 8]]
    worker.close()


def test_store_modes_flip_and_determinism(sample_shards, tmp_path, tiny_model):
    url = str(sample_shards[1])
    a = tmp_path / "a"
    cfg = _config(url, a, output={"store": "mean+logvar", "flip": True, "dtype": "bf16"}, qa={"samples": 0})
    EncodeWorker(cfg, device="cpu", model=tiny_model).process_shard(url, "s", num_shards=1)
    rows = _rows(a, "s")
    assert all(r["logvar"] is not None and r["latent_flip"] is not None and r["logvar_flip"] is not None for r in rows)
    assert not (a / "qa/samples/s.parquet").exists()
    lat = from_storage(np.asarray(rows[0]["latent"], np.uint16), "bf16")
    flip = from_storage(np.asarray(rows[0]["latent_flip"], np.uint16), "bf16")
    assert not np.array_equal(lat, flip)

    # store: sample draws noise seeded per key: identical across runs and batch sizes, not the mean
    outs = []
    for i, batch in enumerate((1, 4)):
        out = tmp_path / f"s{i}"
        cfg = _config(url, out, output={"store": "sample"}, ray={"batch_size": batch}, qa={"samples": 0})
        EncodeWorker(cfg, device="cpu", model=tiny_model).process_shard(url, "s", num_shards=1)
        outs.append({r["key"]: np.asarray(r["latent"], np.float32) for r in _rows(out, "s")})
    mean_rows = {r["key"]: np.asarray(r["latent"], np.float32) for r in _rows(tmp_path / "a", "s")}
    for key, sample in outs[0].items():
        np.testing.assert_allclose(sample, outs[1][key], atol=2e-4)  # batching moves only low bits
        assert np.abs(sample - from_storage(mean_rows[key].astype(np.uint16), "bf16")).mean() > 1e-3

    # the same config twice gives bit-identical files
    for run in ("r1", "r2"):
        cfg = _config(url, tmp_path / run, qa={"samples": 2})
        EncodeWorker(cfg, device="cpu", model=tiny_model).process_shard(url, "s", num_shards=1)
    r1, r2 = _rows(tmp_path / "r1", "s"), _rows(tmp_path / "r2", "s")
    assert [r["latent"] for r in r1] == [r["latent"] for r in r2]


def test_qa_table_holds_the_stored_draw_for_store_sample(sample_shards, tmp_path, tiny_model):
    # QA compares the stored latent with its unrounded value: for `store: sample` that is the draw,
    # not the posterior mean (comparing with the mean failed every sample's readback check).
    url, out = str(sample_shards[0]), tmp_path / "out"
    cfg = _config(url, out, output={"store": "sample"}, qa={"samples": 4})
    EncodeWorker(cfg, device="cpu", model=tiny_model).process_shard(url, "s", num_shards=1)
    stored = {r["key"]: np.asarray(r["latent"], np.float32) for r in _rows(out, "s")}
    qa = pq.read_table(f"{out}/qa/samples/s.parquet").to_pylist()
    assert qa
    for q in qa:
        latent = np.asarray(q["latent"], np.float32)
        np.testing.assert_array_equal(latent, stored[q["key"]])


def test_bad_samples_go_to_the_ledger(tmp_path, tiny_model):
    photos = sample_photos(count=2)
    good = _jpeg(photos[0][1].resize((96, 80)))
    tiny = _jpeg(photos[1][1].resize((20, 20)))
    path = write_shard(tmp_path / "bad.tar", [
        ("ok1", {"jpg": good, "txt": b"fine"}),
        ("broken", {"jpg": good[: len(good) // 3]}),
        ("notimg", {"jpg": b"hello"}),
        ("small", {"jpg": tiny}),
        ("nocap", {"txt": b"only text"}),
        ("ok1", {"jpg": good}),
        ("ok2", {"png": good}),  # a JPEG under .png still decodes (format sniffed from bytes)
    ])
    out = tmp_path / "out"
    cfg = _config(str(path), out, preprocess={"min_size": 32})
    result = EncodeWorker(cfg, device="cpu", model=tiny_model).process_shard(str(path), "bad", num_shards=1)
    assert result.rows == 2 and result.errors == 5
    assert result.errors_by_reason == {"decode/corrupt": 1, "decode/not_an_image": 1, "decode/too_small": 1,
                                       "read/no_image": 1, "read/duplicate_key": 1}
    ledger = pq.read_table(f"{out}/errors/bad.parquet").to_pylist()
    assert {(e["key"], e["stage"], e["error"]) for e in ledger} == {
        ("broken", "decode", "corrupt"), ("notimg", "decode", "not_an_image"), ("small", "decode", "too_small"),
        ("nocap", "read", "no_image"), ("ok1", "read", "duplicate_key")}
    assert all(e["source"] == str(path) and e["message"] for e in ledger)
    assert sorted(r["key"] for r in _rows(out, "bad")) == ["ok1", "ok2"]


def test_buckets_batch_per_shape(tmp_path, tiny_model):
    photo = sample_photos(count=1)[0][1]
    sizes = [(64, 120), (120, 64), (64, 64), (70, 140), (90, 90)]
    path = write_shard(tmp_path / "b.tar", [(f"k{i}", {"jpg": _jpeg(photo.resize((w, h)))}) for i, (h, w) in enumerate(sizes)])
    out = tmp_path / "out"
    cfg = _config(str(path), out, preprocess={"resolution": None, "buckets": [[64, 64], [48, 96], [96, 48]]},
                  ray={"batch_size": 2}, qa={"samples": 5})
    worker = EncodeWorker(cfg, device="cpu", model=tiny_model)
    assert worker.manifest.shapes == [[8, 8, 8], [8, 6, 12], [8, 12, 6]]
    worker.process_shard(str(path), "b", num_shards=1)
    rows = {r["key"]: r for r in _rows(out, "b")}
    expect = {"k0": (48, 96), "k1": (96, 48), "k2": (64, 64), "k3": (48, 96), "k4": (64, 64)}
    for key, target in expect.items():
        assert tuple(rows[key]["target_size"]) == target
        assert tuple(rows[key]["latent_shape"]) == (8, target[0] // 8, target[1] // 8)
    qa = pq.read_table(f"{out}/qa/samples/b.parquet").to_pylist()
    assert {q["bucket"] for q in qa} == {"48x96", "96x48", "64x64"}


def test_sizes_must_fit_the_model(tmp_path, tiny_model):
    cfg = _config("x.tar", tmp_path, preprocess={"resolution": 60})
    with pytest.raises(ConfigError, match=r"preprocess\.resolution: 60x60 is not divisible .* factor 8"):
        EncodeWorker(cfg, device="cpu", model=tiny_model)
    assert math.ceil(64 / 3) == qa_per_shard(64, 3) and qa_per_shard(0, 3) == 0


@pytest.mark.parametrize("decode_mode", ["threads", "processes"])
def test_concurrent_shards_match_one_at_a_time(sample_shards, tmp_path, tiny_model, decode_mode):
    # Two shards at a time (the GPU default, there with decode processes) share the decode pool.
    from concurrent.futures import ThreadPoolExecutor

    urls = [str(p) for p in sample_shards]
    alone, together = tmp_path / "alone", tmp_path / "together"
    one = EncodeWorker(_config(urls, alone, output={"flip": True}), device="cpu", model=tiny_model)
    assert one.concurrency == 1  # the CPU default
    for i, url in enumerate(urls):
        one.process_shard(url, f"{i:05d}", num_shards=3)
    two = EncodeWorker(_config(urls, together, output={"flip": True},
                               ray={"max_in_flight_per_worker": 2, "decode_mode": decode_mode}),
                       device="cpu", model=tiny_model)
    assert two.concurrency == 2 and two.decode_mode == decode_mode
    try:
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda a: two.process_shard(a[1], f"{a[0]:05d}", num_shards=3), enumerate(urls)))
    finally:
        two.close()
    assert [r.rows for r in results] == [4, 4, 4] and two.running == {}
    for sub in ("shards", "qa/samples"):
        files = sorted(p.relative_to(alone) for p in (alone / sub).iterdir())
        assert files and files == sorted(p.relative_to(together) for p in (together / sub).iterdir())
        for f in files:
            assert (alone / f).read_bytes() == (together / f).read_bytes(), f


def test_torch_thread_and_decoder_rules():
    from pipeline.worker import default_decoders, torch_threads

    assert [torch_threads("cpu", 4), torch_threads("cpu", 0.5), torch_threads("cuda", 16), torch_threads("cuda", 1)] == [4, 1, 2, 1]
    assert [default_decoders("cpu", 16), default_decoders("cuda", 16), default_decoders("cuda", 3),
            default_decoders("cuda", 0.5)] == [16, 14, 3, 1]


def test_channels_last_auto_is_on_for_cpu_workers(tmp_path):
    from latentae import AutoencoderKL

    auto = EncodeWorker(_config("x.tar", tmp_path / "a"), device="cpu", model=AutoencoderKL.from_preset("tiny"))
    off = EncodeWorker(_config("x.tar", tmp_path / "b", model={"channels_last": False}), device="cpu",
                       model=AutoencoderKL.from_preset("tiny"))
    assert auto.model.channels_last and not off.model.channels_last
    weight = auto.model.encoder.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
