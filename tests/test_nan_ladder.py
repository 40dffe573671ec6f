"""finite.py through the encode worker: non-finite fp16 posteriors are encoded again in fp32;
what stays non-finite goes to the ledger. Real weights (the shipped tiny checkpoint with some
weights scaled up) saved as .safetensors and loaded through `model.weights`."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import sample_photos, write_shard
from PIL import Image
from safetensors.torch import load_file, save_file

from latentae.presets import SHIPPED_WEIGHTS
from pipeline.cli import main
from pipeline.commit import read_commit
from pipeline.config import config_from_dict
from pipeline.finite import NON_FINITE, non_finite_samples
from pipeline.models import load_model
from pipeline.summary import EncodeSummary
from pipeline.worker import EncodeWorker


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _weights(path, **scale: float) -> str:
    """The shipped tiny checkpoint with tensors scaled (`name=factor`, dots as "__"), saved in fp32."""
    state = {k: v.float() for k, v in load_file(str(SHIPPED_WEIGHTS["tiny"])).items()}
    for name, factor in scale.items():
        state[name.replace("__", ".")] = state[name.replace("__", ".")] * factor
    save_file(state, str(path))
    return str(path)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """Three photos (their fp16 activations overflow with the scaled conv_in below) and a plain
    mid-grey image (whose do not), in one shard."""
    folder = tmp_path_factory.mktemp("ladder")
    samples = [(f"photo{i}", {"jpg": _jpeg(img.resize((72, 64))), "txt": name.encode()})
               for i, (name, img) in enumerate(sample_photos(count=3))]
    samples.insert(1, ("grey", {"jpg": _jpeg(Image.new("RGB", (64, 64), (128, 128, 128)))}))
    return str(write_shard(folder / "00000.tar", samples))


def _config(shard, out, weights, dtype, **output):
    return config_from_dict({
        "input": {"urls": shard},
        "output": {"path": str(out), "dtype": "fp32", **output},
        "model": {"preset": "tiny", "weights": weights, "dtype": dtype},
        "preprocess": {"resolution": 64},
        "ray": {"batch_size": 4, "decode_threads": 1},
        "qa": {"samples": 4},
    })


def _rows(out) -> dict[str, dict]:
    return {r["key"]: r for r in pq.read_table(f"{out}/shards/00000.parquet").to_pylist()}


def test_fp16_overflow_is_encoded_again_in_fp32(shard, tmp_path):
    # conv_in's weights x 1e4: a photo's first activations pass fp16's 65504, a flat grey image's do not.
    weights = _weights(tmp_path / "overflow.safetensors", encoder__conv_in__weight=1e4)
    model = load_model(_config(shard, tmp_path / "x", weights, "fp16").model).prepare("cpu", dtype="fp16")
    photo = torch.from_numpy(np.array(sample_photos(count=1)[0][1].resize((64, 64)))).permute(2, 0, 1)[None]
    with torch.inference_mode():
        overflowed = model.encode(photo.float() / 127.5 - 1)
    assert non_finite_samples((overflowed.mean.numpy(), overflowed.logvar.numpy(), None, None)).all()

    out16, out32 = tmp_path / "fp16", tmp_path / "fp32"
    result = EncodeWorker(_config(shard, out16, weights, "fp16", flip=True, store="mean+logvar"),
                          device="cpu").process_shard(shard, "00000")
    assert (result.rows, result.errors, result.fp32_retries, result.fp32_recovered) == (4, 0, 3, 3)
    EncodeWorker(_config(shard, out32, weights, "fp32", flip=True, store="mean+logvar"),
                 device="cpu").process_shard(shard, "00000")
    rows16, rows32 = _rows(out16), _rows(out32)
    for key, row in rows16.items():
        for col in ("latent", "logvar", "latent_flip", "logvar_flip"):
            value = np.asarray(row[col], np.float32)
            assert np.isfinite(value).all(), (key, col)
            # The photos were encoded again in fp32: the fp32 run's values up to batching's low bits.
            tol = 1e-4 if key.startswith("photo") else 0.1
            np.testing.assert_allclose(value, np.asarray(rows32[key][col], np.float32), atol=tol, rtol=tol)
    # The grey image kept its fp16 posterior: close to fp32, not equal.
    assert rows16["grey"]["latent"] != rows32["grey"]["latent"]
    # The QA side table holds the fp32 second try too.
    qa = pq.read_table(f"{out16}/qa/samples/00000.parquet").to_pylist()
    assert qa and all(np.isfinite(q["latent"]).all() for q in qa)
    commit = read_commit(str(out16), "00000")
    assert commit.errors == 0 and sum(commit.stats["nan"]) == sum(commit.stats["inf"]) == 0


def test_still_non_finite_in_fp32_goes_to_the_ledger(shard, tmp_path):
    # An infinite weight: every photo's posterior is NaN/Inf in fp16 and in fp32 alike.
    state = {k: v.float() for k, v in load_file(str(SHIPPED_WEIGHTS["tiny"])).items()}
    state["encoder.conv_in.weight"][0, 0, 1, 1] = float("inf")
    weights = str(tmp_path / "inf.safetensors")
    save_file(state, weights)

    for dtype, retries in (("fp16", 4), ("fp32", 0)):
        out = tmp_path / dtype
        result = EncodeWorker(_config(shard, out, weights, dtype), device="cpu").process_shard(shard, "00000")
        assert (result.rows, result.errors, result.fp32_retries, result.fp32_recovered) == (0, 4, retries, 0)
        assert result.errors_by_reason == {str(NON_FINITE): 4}
        ledger = pq.read_table(f"{out}/errors/00000.parquet").to_pylist()
        assert sorted(r["key"] for r in ledger) == ["grey", "photo0", "photo1", "photo2"]
        assert {(r["stage"], r["error"]) for r in ledger} == {("encode", "non_finite")}
        assert ("again in fp32" in ledger[0]["message"]) == (dtype == "fp16")
        commit = read_commit(str(out), "00000")
        assert (commit.rows, commit.errors_by_reason) == (0, {"encode/non_finite": 4})
        assert not (out / "qa/samples/00000.parquet").exists()


def test_run_counts_them_in_summary_and_qa_report(shard, tmp_path, ray_local, capsys):
    weights = _weights(tmp_path / "overflow.safetensors", encoder__conv_in__weight=1e4)
    out = tmp_path / "out"
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps({
        "input": {"urls": shard}, "output": {"path": str(out)},
        "model": {"preset": "tiny", "weights": weights, "dtype": "fp16"},
        "preprocess": {"resolution": 64}, "ray": {"workers": 1, "batch_size": 4}, "qa": {"samples": 2},
    }))
    # The scaled weights reconstruct badly, so the QA verdict may fail: what counts here are the counts.
    assert main(["run", str(config), "-q"]) in (0, 1)
    printed = capsys.readouterr().out
    assert "finite latents: 3 sample(s) with NaN/Inf in reduced precision encoded again in fp32, 3 of them stored" \
        in printed
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["fp32_retries"], summary["fp32_recovered"], summary["images"]) == (3, 3, 4)
    metrics = json.loads((out / "qa/metrics.json").read_text())
    assert metrics["counts"]["finite"] == {"fp32_retries": 3, "fp32_recovered": 3, "non_finite": 0}
    assert 'data-key="/counts/finite/fp32_retries"' in (out / "qa/report.html").read_text()


def test_summary_counts_and_prints_the_retries():
    summary = EncodeSummary(output="OUT", images=10, errors=1, errors_by_reason={"encode/non_finite": 1},
                            fp32_retries=3, fp32_recovered=2)
    again = EncodeSummary.from_dict(json.loads(json.dumps(summary.to_dict())))
    assert (again.fp32_retries, again.fp32_recovered) == (3, 2)
    assert ("finite latents: 3 sample(s) with NaN/Inf in reduced precision encoded again in fp32, 2 of them "
            "stored; 1 rejected as encode/non_finite") in summary.render()
    assert "finite latents" not in EncodeSummary(output="OUT", images=10).render()
