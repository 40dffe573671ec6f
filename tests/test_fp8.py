"""output.dtype: fp8_e4m3 — the codec in schema.py against torch's float8_e4m3fn, the per-sample
per-channel scale, shards written by ShardWriter and read back by plain pyarrow, DuckDB and
LatentDataset, and the QA storage-precision rows against fp32 and bf16."""

from __future__ import annotations

import io
import json

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import sample_photos, write_shard
from output_builders import make_manifest, write_output

from pipeline.commit import read_commit
from pipeline.config import config_from_dict
from pipeline.dataset import LatentDataset
from pipeline.manifest import check_or_write_manifest
from pipeline.qa import run_qa
from pipeline.schema import FP8, fp8_scale, fp8_values, from_storage, to_storage
from pipeline.worker import EncodeWorker


def test_codes_match_torch_float8_e4m3fn():
    rng = np.random.default_rng(0)
    table = fp8_values(np.arange(256, dtype=np.uint8))
    reference = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(table, reference)  # NaN positions included
    finite = np.unique(table[np.isfinite(table) & (table >= 0)])
    ties = (finite[:-1] + finite[1:]) / 2  # exactly between two codes: rounds to the even one
    y = np.concatenate([rng.uniform(-448, 448, 20000), rng.uniform(-2.0**-5, 2.0**-5, 20000),
                        ties, -ties, finite, -finite]).astype(np.float32)
    scale = np.ones(1, np.float32)
    codes = to_storage(y[None, None], FP8, scale)[0, 0]
    np.testing.assert_array_equal(codes, torch.from_numpy(y).to(torch.float8_e4m3fn).view(torch.uint8).numpy())
    # Beyond 448 saturates (a scaled latent never gets there); non-finite becomes NaN.
    odd = to_storage(np.array([[[500.0, -1e9, np.nan, np.inf]]], np.float32), FP8, scale)[0, 0]
    assert list(odd[:2]) == [0x7E, 0xFE] and np.isnan(fp8_values(odd[2:])).all()


def test_scale_is_a_power_of_two_per_sample_and_channel():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 8, 8)).astype(np.float32) * np.array([1.0, 300.0, 1e-3, 0.0])[:, None, None]
    x[1, 2, 0, 0] = 448.0 * 2.0**-10  # the largest value lands exactly on 448
    scale = fp8_scale(x)
    assert scale.shape == (3, 4) and scale.dtype == np.float32
    mantissa, _ = np.frexp(scale)
    assert (mantissa == 0.5).all()  # powers of two: dividing and multiplying back are exact
    amax = np.abs(x).max(axis=(2, 3))
    used = amax[:, :3] / scale[:, :3]
    assert ((used > 224) & (used <= 448)).all() and (scale[:, 3] == 1).all()
    assert scale[1, 2] == 2.0**-10
    # Per sample: one row's scale never depends on the others it is written with.
    np.testing.assert_array_equal(fp8_scale(x[1]), scale[1])


def test_round_trip_error_is_within_e4m3_rounding():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((16, 4, 8, 8)) * rng.uniform(0.01, 50, (16, 4, 1, 1))).astype(np.float32)
    scale = fp8_scale(x)
    back = from_storage(to_storage(x, FP8, scale), FP8, scale)
    step = scale[..., None, None] * 2.0**-10  # half a subnormal step
    assert (np.abs(back - x) <= 2.0**-4 * np.abs(x) + step).all()
    with pytest.raises(ValueError, match="scale"):
        from_storage(to_storage(x, FP8, scale), FP8)


@pytest.mark.parametrize("fmt", ["parquet", "wds"])
def test_shards_read_back_by_plain_readers_and_latent_dataset(tmp_path, fmt):
    root = str(tmp_path / fmt)
    manifest, written = write_output(root, {"00000": 7}, manifest=make_manifest(fmt, FP8))
    rows = written["00000"]
    record = read_commit(root, "00000")
    assert record.dtype == FP8
    if fmt == "parquet":
        # The README's recipe for plain pyarrow: codes through a 256-entry table, times the scale.
        table = pq.read_table(f"{root}/shards/00000.parquet")
        info = json.loads(table.schema.metadata[b"latent_precompute"])
        assert info["dtype"] == FP8 and "latent_scale" in info["scale"]
        assert table.schema.field("latent").type.value_type == pa.uint8()
        codes = np.arange(256)
        e, m = (codes >> 3) & 15, codes & 7
        lut = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0 ** (e - 7)) * np.where(codes & 128, -1, 1)
        for i, row in enumerate(rows):
            raw = table.column("latent")[i].values.to_numpy()
            scale = np.asarray(table.column("latent_scale")[i].as_py(), np.float32)
            z = (lut[raw].reshape(4, 4, 4) * scale[:, None, None]).astype(np.float32)
            np.testing.assert_array_equal(z, from_storage(to_storage(row.latent, FP8, fp8_scale(row.latent)), FP8,
                                                          fp8_scale(row.latent)))
        n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{root}/shards/00000.parquet') "
                       "WHERE len(latent) = 64 AND len(latent_scale) = 4").fetchall()[0][0]
        assert n == 7
    got = {r["key"]: r for r in LatentDataset(root, shuffle=False, scale=False, sample=False, flip=False)}
    assert set(got) == {r.key for r in rows}
    for row in rows:
        for col in ("latent",):
            scale = fp8_scale(getattr(row, col))
            want = from_storage(to_storage(getattr(row, col), FP8, scale), FP8, scale)
            np.testing.assert_array_equal(got[row.key][col].numpy(), want)


def test_bytes_do_not_depend_on_row_groups(tmp_path):
    """A row's stored values depend on that row alone (per-sample scales), however rows are grouped."""
    outs = []
    for groups in (1, 7):
        root = str(tmp_path / f"g{groups}")
        write_output(root, {"00000": 7}, manifest=make_manifest("parquet", FP8), row_group_rows=groups)
        outs.append(pq.read_table(f"{root}/shards/00000.parquet", columns=["latent", "latent_scale", "logvar_scale"]))
    assert outs[0].to_pylist() == outs[1].to_pylist()


@pytest.fixture(scope="module")
def fp8_output(tmp_path_factory):
    """An fp8 output encoded by the worker from real photos (tiny preset), and its input shard."""
    folder = tmp_path_factory.mktemp("fp8")
    samples = []
    for i, (name, img) in enumerate(sample_photos(count=6)):
        buf = io.BytesIO()
        img.resize((80, 64)).save(buf, format="JPEG", quality=90)
        samples.append((f"k{i}", {"jpg": buf.getvalue(), "txt": name.encode()}))
    shard = str(write_shard(folder / "00000.tar", samples))
    return shard, folder / "out"


def _config(shard, out, dtype, **sections):
    raw = {"input": {"urls": shard}, "output": {"path": str(out), "dtype": dtype},
           "preprocess": {"resolution": 64}, "ray": {"batch_size": 3, "decode_threads": 1, "workers": 1},
           "qa": {"samples": 6}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)


def test_qa_storage_precision_row_against_fp32_and_bf16(fp8_output, ray_local):
    shard, out = fp8_output
    config = _config(shard, out, FP8)
    worker = EncodeWorker(config, device="cpu")
    check_or_write_manifest(str(out), worker.manifest)
    worker.process_shard(shard, "00000")
    assert run_qa(config) in (0, 1)
    metrics = json.loads((out / "qa/metrics.json").read_text())
    storage = metrics["storage"]
    assert storage["dtype"] == FP8 and storage["beyond_rounding"] == 0
    assert storage["psnr_bf16"]["count"] == storage["psnr_stored"]["count"] == 6
    # fp8 costs something against bf16 and against fp32, but a fraction of a dB on these photos.
    assert 0 < storage["psnr_lost_vs_bf16_db"]["mean"] < 1.5 and 0 < storage["psnr_lost_db"]["mean"] < 1.5
    readback = next(c for c in metrics["checks"] if c["name"] == "readback")
    assert readback["status"] == "pass"
    html = (out / "qa/report.html").read_text()
    assert 'data-key="/storage/psnr_lost_vs_bf16_db/mean"' in html and 'data-key="/storage/psnr_bf16/mean"' in html
