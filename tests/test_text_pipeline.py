"""Caption embeddings through the whole job: `python -m pipeline encode` with a `text:` section on a
local Ray instance, the stored columns against transformers' own outputs, inspect, resume, the
manifest guard, tensor (wds) shards, and an image-only job that never imports transformers."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import sample_photos, write_shard
from test_text import make_models, make_t5

from pipeline import cli
from pipeline.commit import read_commit
from pipeline.config import load_config
from pipeline.layout import shard_name
from pipeline.manifest import read_manifest
from pipeline.schema import from_storage, to_storage
from pipeline.text import read_npz_text, read_parquet_text

ROOT = Path(__file__).resolve().parent.parent
BATCH = 4
LONG = " ".join(["tabby"] * 40)
# Per sample: its caption, None for a sample without one.
CAPTIONS = [["a photo of a cat", None, "", LONG, "a red rocket", "coffee cup"],
            ["the moon", "grass", None, "a photo of the astronaut"]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("text-models"))


SHARDS_DIR: list[Path] = []


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text-shards")
    SHARDS_DIR[:] = [folder]
    photos = sample_photos(count=6)
    for s, captions in enumerate(CAPTIONS):
        samples = []
        for i, caption in enumerate(captions):
            buf = io.BytesIO()
            photos[(s + i) % len(photos)][1].resize((72, 64)).save(buf, format="JPEG", quality=90)
            members = {"jpg": buf.getvalue()}
            if caption is not None:
                members["txt"] = caption.encode()
            samples.append((f"{s}{i:03d}", members))
        write_shard(folder / f"{s:05d}.tar", samples)
    return folder


def _text_section(models, t5_path=None) -> list[dict]:
    sd = models["sd"]
    return [
        {"name": "clip_l", "kind": "clip", "path": str(sd), "max_length": 16, "outputs": ["penultimate"],
         "storage_dtype": "fp16"},
        {"name": "clip_g", "kind": "clip", "path": str(sd / "text_encoder_2"), "max_length": 16,
         "outputs": ["penultimate", "projected"], "storage_dtype": "fp32"},
        {"name": "t5", "kind": "t5", "path": str(t5_path or models["t5"]), "max_length": 12, "outputs": ["last"],
         "dtype": "fp32", "storage_dtype": "bf16"},
    ]


def _job(path: Path, shards: Path, out: Path, weights: str, text: list[dict] | None, fmt: str = "parquet") -> Path:
    raw = {
        "input": {"urls": f"{shards}/*.tar"},
        "output": {"path": str(out), "dtype": "fp32", "format": fmt},
        "model": {"preset": "tiny", "weights": weights},
        "preprocess": {"resolution": 64},
        "ray": {"workers": 1, "batch_size": BATCH, "decode_threads": 1, "num_cpus_per_worker": 1},
        # The saved tiny weights carry no measured scaling factor: QA's factor gates are not the point here.
        "qa": {"samples": 4, "min_psnr": 0.0, "stats_tolerance": 1000.0},
    }
    if text:
        raw["text"] = text
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


def _name(s: int) -> str:
    """Output shard name of input shard `s`."""
    return shard_name(str(SHARDS_DIR[0] / f"{s:05d}.tar"))


def _references(models, captions: list[str | None]) -> dict[str, list[np.ndarray]]:
    """What transformers computes for `captions`, in the worker's batches (of BATCH, shard order)."""
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    sd, t5 = models["sd"], models["t5"]
    texts = ["" if c is None else c for c in captions]
    out: dict[str, list] = {k: [] for k in ("clip_l_penultimate", "clip_g_penultimate", "clip_g_projected", "t5_last")}
    clip_l = CLIPTextModel.from_pretrained(str(sd / "text_encoder")).eval()
    clip_g = CLIPTextModelWithProjection.from_pretrained(str(sd / "text_encoder_2")).eval()
    t5_model = T5EncoderModel.from_pretrained(str(t5)).eval()
    tok_l, tok_g = AutoTokenizer.from_pretrained(str(sd / "tokenizer")), AutoTokenizer.from_pretrained(str(sd / "tokenizer_2"))
    tok_t5 = AutoTokenizer.from_pretrained(str(t5))
    for start in range(0, len(texts), BATCH):
        batch = texts[start : start + BATCH]
        with torch.no_grad():
            ids = tok_l(batch, padding="max_length", max_length=16, truncation=True, return_tensors="pt")["input_ids"]
            out["clip_l_penultimate"] += list(clip_l(input_ids=ids, output_hidden_states=True).hidden_states[-2].numpy())
            ids = tok_g(batch, padding="max_length", max_length=16, truncation=True, return_tensors="pt")["input_ids"]
            g = clip_g(input_ids=ids, output_hidden_states=True)
            out["clip_g_penultimate"] += list(g.hidden_states[-2].numpy())
            out["clip_g_projected"] += list(g.text_embeds.numpy())
            enc = tok_t5(batch, padding="longest", max_length=12, truncation=True, return_tensors="pt")
            last = t5_model(**enc).last_hidden_state.numpy()
            out["t5_last"] += [last[i, : int(n)] for i, n in enumerate(enc["attention_mask"].sum(1))]
    return out


@pytest.fixture(scope="module")
def encoded(ray_local, models, shards, tiny_weights, tmp_path_factory):
    """One encode run with three text encoders: (job config path, OUTPUT)."""
    folder = tmp_path_factory.mktemp("text-job")
    job = _job(folder / "job.yaml", shards, folder / "out", tiny_weights, _text_section(models))
    assert cli.main(["encode", str(job), "-q"]) == 0
    return job, folder / "out"


def test_stored_embeddings_equal_transformers(encoded, models):
    _, out = encoded
    for s, captions in enumerate(CAPTIONS):
        table = pq.read_table(out / "shards" / f"{_name(s)}.parquet")
        assert table.column("caption").to_pylist() == captions
        stored = read_parquet_text(table)
        ref = _references(models, captions)
        for i in range(len(captions)):
            # fp32: exact; fp16 and bf16: transformers' output rounded to the storage dtype, exactly
            assert np.array_equal(stored["clip_g_penultimate"][i], ref["clip_g_penultimate"][i])
            assert np.array_equal(stored["clip_g_projected"][i], ref["clip_g_projected"][i])
            assert np.array_equal(stored["clip_l_penultimate"][i],
                                  from_storage(to_storage(ref["clip_l_penultimate"][i], "fp16"), "fp16"))
            assert np.array_equal(stored["t5_last"][i], from_storage(to_storage(ref["t5_last"][i], "bf16"), "bf16"))
        # only the real tokens of T5 are stored: the end token alone for "" and a missing caption,
        # max_length for the truncated one; CLIP keeps all 16 positions, its length says where padding starts
        lengths = stored["t5_length"]
        assert [len(v) for v in stored["t5_last"]] == lengths
        for i, caption in enumerate(captions):
            if not caption:
                assert lengths[i] == 1 and stored["clip_l_length"][i] == 2
            if caption == LONG:
                assert lengths[i] == 12 and stored["clip_l_length"][i] == 16
            assert stored["clip_l_penultimate"][i].shape == (16, 32)


def test_manifest_columns_and_plain_readers(encoded):
    import duckdb

    _, out = encoded
    manifest = read_manifest(str(out))
    assert set(manifest.text) == {"clip_l", "clip_g", "t5"}
    t5 = manifest.text["t5"]
    assert t5["padding"] == "none" and t5["shapes"] == {"last": [12, 32]} and t5["storage_dtype"] == "bf16"
    assert t5["model"]["class"] == "T5EncoderModel" and len(t5["model"]["weights_sha256"]) == 64
    assert manifest.text["clip_g"]["model"]["class"] == "CLIPTextModelWithProjection"
    rows = duckdb.sql(f"""SELECT key, t5_length, len(t5_last) AS n, len(clip_l_penultimate) AS m
                          FROM read_parquet('{out}/shards/*.parquet') ORDER BY key""").fetchall()
    assert len(rows) == 10 and all(n == 32 * length and m == 16 * 32 for _, length, n, m in rows)


def test_inspect_shows_text_statistics(encoded, capsys):
    from pipeline.inspect import main as inspect_main

    _, out = encoded
    assert inspect_main([str(out)]) == 0
    printed = capsys.readouterr().out
    assert "text         t5: T5EncoderModel, max_length 12, padding none" in printed
    assert "clip_g_projected" in printed and "tokens t5" in printed and "1 of 10 at max_length 12" in printed
    assert inspect_main([str(out), "--json", "--text-rows", "3"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["text"]["rows_read"] == 3 and info["text"]["columns"]["t5_last"]["nan"] == 0


def test_resume_and_the_manifest_guard(encoded, models, shards, tiny_weights, tmp_path, capsys):
    job, out = encoded
    name = _name(1)
    before = read_commit(str(out), name)
    # nothing to do: the text encoders are compared on their configuration
    assert cli.main(["encode", str(job), "-q"]) == 0
    images_only = _job(tmp_path / "job-images-only.yaml", shards, out, tiny_weights, None)
    assert cli.main(["encode", str(images_only), "-q"]) == cli.EXIT_USAGE
    assert "text.t5: existing value" in capsys.readouterr().err
    changed = tmp_path / "job-max-length.yaml"
    text = _text_section(models)
    text[2]["max_length"] = 10
    _job(changed, shards, out, tiny_weights, text)
    assert cli.main(["encode", str(changed), "-q"]) == cli.EXIT_USAGE
    assert "text.t5.max_length: existing 12 != new 10" in capsys.readouterr().err

    # with a shard to redo, the loaded encoders are compared too: other T5 weights are refused
    (out / "_commits" / f"{name}.json").unlink()
    other = tmp_path / "t5-other"
    shutil.copytree(models["t5"], other)
    make_t5(other, seed=42)
    refused = _job(tmp_path / "job-other-t5.yaml", shards, out, tiny_weights, _text_section(models, t5_path=other))
    assert cli.main(["encode", str(refused), "-q"]) == cli.EXIT_USAGE
    assert "text.t5.model.weights_sha256: existing" in capsys.readouterr().err

    # the same config resumes and writes the same bytes again
    assert cli.main(["encode", str(job), "-q"]) == 0
    after = read_commit(str(out), name)
    assert after.files[f"shards/{name}.parquet"]["sha256"] == before.files[f"shards/{name}.parquet"]["sha256"]


def test_tensor_shards_hold_the_same_embeddings(encoded, models, shards, tiny_weights, tmp_path):
    from pipeline.dataset import LatentDataset
    from pipeline.manifest import write_manifest
    from pipeline.worker import EncodeWorker

    _, parquet_out = encoded
    job = _job(tmp_path / "job.yaml", shards, tmp_path / "out", tiny_weights, _text_section(models), fmt="wds")
    worker = EncodeWorker(load_config(job), device="cpu")
    try:
        worker.process_shard(str(shards / "00000.tar"), _name(0))
    finally:
        worker.close()
    expected = read_parquet_text(pq.read_table(parquet_out / "shards" / f"{_name(0)}.parquet"))
    with tarfile.open(tmp_path / "out" / "shards" / f"{_name(0)}.tar") as tar:
        names = tar.getnames()
        assert "0000.text.npz" in names
        for i in range(len(CAPTIONS[0])):
            record = json.loads(tar.extractfile(f"0{i:03d}.json").read())
            got = read_npz_text(tar.extractfile(f"0{i:03d}.text.npz").read(), record["text_dtypes"])
            assert set(got) == set(expected)
            for name, values in expected.items():
                assert np.array_equal(got[name], values[i])
    write_manifest(str(tmp_path / "out"), worker.manifest)
    from pipeline.inspect import inspect_output

    text = inspect_output(str(tmp_path / "out"))["text"]
    assert text["rows_read"] == len(CAPTIONS[0]) and text["tokens"]["t5"]["at_max_length"] == 1
    items = {it["key"]: it for it in LatentDataset(str(tmp_path / "out"), shuffle=False, pad_text=True)}
    assert len(items) == len(CAPTIONS[0])
    for i, key in enumerate(sorted(items)):
        n = expected["t5_length"][i]
        assert items[key]["t5_last"].shape == (12, 32) and int(items[key]["t5_mask"].sum()) == n
        assert np.array_equal(items[key]["t5_last"][:n].numpy(), expected["t5_last"][i])


def test_image_only_job_never_imports_transformers(shards, tiny_weights, tmp_path):
    job = _job(tmp_path / "job.yaml", shards, tmp_path / "out", tiny_weights, None)
    code = textwrap.dedent(f"""
        import sys
        from pipeline.config import load_config
        from pipeline.inspect import main as inspect_main
        from pipeline.worker import EncodeWorker

        from pipeline.dataset import LatentDataset
        from pipeline.manifest import write_manifest

        out = {str(tmp_path / 'out')!r}
        worker = EncodeWorker(load_config({str(job)!r}), device="cpu")
        result = worker.process_shard({str(shards / '00000.tar')!r}, "00000")
        worker.close()
        assert result.rows == 6, result
        write_manifest(out, worker.manifest)
        assert inspect_main([out]) == 0
        assert len(list(LatentDataset(out, shuffle=False))) == 6
        assert "transformers" not in sys.modules and "tokenizers" not in sys.modules, "imported"
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_latent_dataset_yields_embeddings(encoded):
    from torch.utils.data import DataLoader

    from pipeline.dataset import LatentDataset

    _, out = encoded
    stored = {}
    for s in range(len(CAPTIONS)):
        table = pq.read_table(out / "shards" / f"{_name(s)}.parquet")
        columns = read_parquet_text(table)
        for i, key in enumerate(table.column("key").to_pylist()):
            stored[key] = {name: values[i] for name, values in columns.items()}
    items = list(LatentDataset(str(out), shuffle=False, scale=False, sample=False, flip=False))
    assert sorted(it["key"] for it in items) == sorted(stored)
    for it in items:
        row = stored[it["key"]]
        assert it["t5_last"].shape == (row["t5_length"], 32) and int(it["t5_length"]) == row["t5_length"]
        for name in ("t5_last", "clip_l_penultimate", "clip_g_penultimate", "clip_g_projected"):
            assert np.array_equal(it[name].numpy(), row[name])
        assert "t5_mask" not in it

    # padded back to max_length with a mask: every item has one shape, so batches collate
    padded = LatentDataset(str(out), shuffle=False, scale=False, sample=False, flip=False, pad_text=True)
    for batch in DataLoader(padded, batch_size=5):
        assert batch["t5_last"].shape == (5, 12, 32) and batch["clip_l_penultimate"].shape == (5, 16, 32)
        assert torch.equal(batch["t5_mask"].sum(1), batch["t5_length"])
        assert torch.equal(batch["clip_l_mask"].sum(1), batch["clip_l_length"])
        for i, key in enumerate(batch["key"]):
            n = stored[key]["t5_length"]
            assert np.array_equal(batch["t5_last"][i, :n].numpy(), stored[key]["t5_last"])
            assert not batch["t5_last"][i, n:].any()


def test_qa_reports_text_statistics(encoded):
    job, out = encoded
    assert cli.main(["qa", str(job)]) == 0
    metrics = json.loads((out / "qa" / "metrics.json").read_text())
    (check,) = [c for c in metrics["checks"] if c["name"] == "text"]
    assert check["status"] == "pass" and check["value"] == 0
    stats = metrics["text_stats"]
    assert set(stats["columns"]) == {"clip_l_penultimate", "clip_g_penultimate", "clip_g_projected", "t5_last"}
    assert stats["tokens"]["t5"]["rows"] == metrics["counts"]["qa_scored"] == 4
    assert stats["columns"]["t5_last"]["nan"] == 0 and stats["columns"]["clip_g_projected"]["count"] == 4 * 24
    report = (out / "qa" / "report.html").read_text()
    assert "Caption embeddings" in report and 'data-key="/text_stats/columns/t5_last/mean"' in report
