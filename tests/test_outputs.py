"""Several outputs from one read (outputs.py, fanout.py, multi_driver.py and the `outputs:` config):
every output equal row for row to a single-output run of its config, one read and shared
decodes, resume per output, overrides into outputs.N. Real parts: tar shards of photos, the tiny
autoencoder, Parquet, a local Ray instance."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import sample_photos, write_shard
from PIL import Image

import pipeline.decodepool as decodepool
from pipeline.cli import main
from pipeline.commit import read_commit
from pipeline.config import ConfigError, apply_overrides, config_from_dict
from pipeline.decode import DecodeOptions, draft_size
from pipeline.decodepool import prepare, prepare_all
from pipeline.fanout import MultiEncodeWorker, OutputTask
from pipeline.manifest import read_manifest
from pipeline.outputs import OutputParts
from pipeline.preprocess import Preprocessor
from pipeline.worker import EncodeWorker

# Three outputs: A and C differ in storage only (one model, one preparation); B has its own
# resolution, crop, compute dtype and storage.
OUTPUTS = [
    {"output": {"path": "A"}},
    {"output": {"path": "B", "dtype": "fp8_e4m3", "store": "mean+logvar"},
     "preprocess": {"resolution": 32, "crop": "random"}, "model": {"dtype": "bf16"}},
    {"output": {"path": "C", "format": "wds", "dtype": "bf16", "flip": True}},
]


def _raw(urls, root: Path, outputs=OUTPUTS, **sections) -> dict:
    raw = {
        "input": {"urls": urls},
        "output": {"dtype": "fp16"},
        "preprocess": {"resolution": 64},
        "ray": {"batch_size": 3, "decode_threads": 2, "workers": 1},
        "qa": {"samples": 4},
        "outputs": copy.deepcopy(outputs),
    }
    for entry in raw["outputs"]:
        entry["output"]["path"] = str(root / entry["output"]["path"])
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def _single(raw: dict, i: int) -> dict:
    """The single-output config of entry `i`, written out by hand: its sections merged over the top level."""
    single = {k: v for k, v in raw.items() if k != "outputs"}
    for section, values in raw["outputs"][i].items():
        single[section] = {**raw.get(section, {}), **values}
    return single


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _shard_files(root: Path, name: str) -> dict[str, object]:
    """What one committed shard of an OUTPUT holds, in a form to compare: table rows, tar bytes."""
    record = read_commit(str(root), name)
    out: dict[str, object] = {"rows": record.rows, "errors_by_reason": record.errors_by_reason,
                              "stats": record.stats, "files": sorted(record.files)}
    for rel in record.files:
        path = root / rel
        out[rel] = pq.read_table(path).to_pylist() if rel.endswith(".parquet") else path.read_bytes()
    return out


# -- config ----------------------------------------------------------------------------------------


def test_entries_override_the_top_level_key_by_key(tmp_path):
    config = config_from_dict(_raw("in/*.tar", tmp_path))
    a, b, c = config.output_jobs()
    assert config.output.path == "" and [j.output.path for j in (a, b, c)] == [str(tmp_path / p) for p in "ABC"]
    assert (a.output.dtype, b.output.dtype, c.output.dtype) == ("fp16", "fp8_e4m3", "bf16")
    assert (a.preprocess.resolution, b.preprocess.resolution, b.preprocess.crop) == (64, 32, "random")
    assert (a.model.dtype, b.model.dtype, c.output.format) == ("fp32", "bf16", "wds")
    assert a.ray == config.ray and a.qa == config.qa and a.input == config.input  # shared sections
    assert [o["output"]["path"] for o in config.to_dict()["outputs"]] == [j.output.path for j in (a, b, c)]
    # A config without outputs is one output, unchanged.
    single = config_from_dict({"input": {"urls": "x.tar"}, "output": {"path": "out"}})
    assert single.output_jobs() == [single] and "outputs" not in single.to_dict()


def test_overrides_address_entries(tmp_path):
    raw = apply_overrides(_raw("in/*.tar", tmp_path), ["outputs.1.preprocess.resolution=48", "outputs.0.output.dtype=bf16",
                                                       "ray.workers=2"])
    a, b, _ = config_from_dict(raw).output_jobs()
    assert (a.output.dtype, b.preprocess.resolution, b.preprocess.crop, a.ray.workers) == ("bf16", 48, "random", 2)
    for override, message in (
        ("outputs.3.output.dtype=bf16", "outputs.3: no such entry: the list has 3"),
        ("outputs.one.output.dtype=bf16", "outputs.one: no such entry"),
        ("outputs.1=x", "outputs.1: names a list entry"),
    ):
        with pytest.raises(ConfigError, match=message):
            apply_overrides(_raw("in/*.tar", tmp_path), [override])
    bad = _raw("in/*.tar", tmp_path)
    bad["outputs"][1]["preprocess"]["resolution"] = -8
    with pytest.raises(ConfigError, match=r"^outputs\.1\.preprocess\.resolution: sizes must be positive"):
        config_from_dict(bad)
    bad["outputs"][1] = {"output": {"path": str(tmp_path / "A")}}
    with pytest.raises(ConfigError, match=r"^outputs\.1\.output\.path: is also the path of outputs\.0"):
        config_from_dict(bad)
    with pytest.raises(ConfigError, match=r"^outputs\.0\.ray: unknown key"):
        config_from_dict(_raw("in/*.tar", tmp_path, outputs=[{"output": {"path": "A"}, "ray": {}}]))
    with pytest.raises(ConfigError, match=r"^output\.path: with outputs"):
        config_from_dict({**_raw("in/*.tar", tmp_path), "output": {"path": "top"}})


def test_parts_share_models_and_preparations(tmp_path):
    parts = OutputParts.of(config_from_dict(_raw("in/*.tar", tmp_path)))
    assert parts.model_of == [0, 1, 0] and len(parts.models) == 2  # A and C: one model section
    assert parts.preparation_of == [0, 1, 0] and parts.preparations == 2


# -- decoding once -------------------------------------------------------------------------------


def test_prepare_all_decodes_once_per_draft_reduction(monkeypatch):
    photo = sample_photos(count=1)[0][1].resize((768, 512))
    data = _jpeg(photo)
    options = DecodeOptions()
    small, smaller, large = Preprocessor([(64, 64)]), Preprocessor([(48, 48)], crop="random"), Preprocessor([(256, 256)])
    # 512 px tall: 64 and 48 px targets are both reached at 1/8 (64 px); 256 px only at 1/2.
    assert draft_size(data, small.resized_size) == draft_size(data, smaller.resized_size) == (96, 64)
    assert draft_size(data, large.resized_size) == (384, 256)
    assert draft_size(b"not an image", small.resized_size) is None
    calls = []
    real = decodepool.decode_image
    monkeypatch.setattr(decodepool, "decode_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = prepare_all(data, "k", [(options, small), (options, smaller), (options, large)])
    assert len(calls) == 2  # one decode at 1/8 shared by two preparations, one at 1/2
    for result, pre in zip(got, (small, smaller, large)):
        alone = prepare(data, "k", options, pre)
        np.testing.assert_array_equal(result.pixels, alone.pixels)
        assert (result.crop_top_left, result.target_size) == (alone.crop_top_left, alone.target_size)
    # Other decode limits never share a decode; failures are per preparation.
    got = prepare_all(data, "k", [(options, small), (DecodeOptions(min_size=1000), small)])
    assert got[1].reason == "too_small" and got[0].pixels.shape == (64, 64, 3)


# -- one worker, several outputs -------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two shards of photos of several sizes (one large enough for draft decoding) and a bad sample."""
    folder = tmp_path_factory.mktemp("outputs-in")
    photos = sample_photos(count=6)
    paths = []
    for s in range(2):
        samples = []
        for i in range(5):
            name, img = photos[(s * 5 + i) % len(photos)]
            size = (320, 240) if i == 0 else (72 + 8 * i, 64 + 8 * (i % 2))
            samples.append((f"{s}-{i}", {"jpg": _jpeg(img.resize(size)), "txt": name.encode()}))
        samples.insert(2, (f"{s}-bad", {"jpg": b"\xff\xd8 truncated"}))
        paths.append(str(write_shard(folder / f"{s:05d}.tar", samples)))
    return paths


def test_one_read_equals_single_runs_row_for_row(shards, tmp_path):
    config = config_from_dict(_raw(shards, tmp_path / "multi"))
    multi = MultiEncodeWorker(config, device="cpu")
    assert len(multi.parts.models) == 2 and multi.parts.preparations == 2
    try:
        result = multi.process_shard(shards[0], [OutputTask(i, "00000", 2) for i in range(3)], num_shards=2)
    finally:
        multi.close()
    assert not result.errors and sorted(result.results) == [0, 1, 2]
    for i, job in enumerate(config.output_jobs()):
        single = config_from_dict(_single(_raw(shards, tmp_path / "single"), i))
        assert single.output_jobs() == [single] and single.output.dtype == job.output.dtype
        worker = EncodeWorker(single, device="cpu")
        try:
            alone = worker.process_shard(shards[0], "00000", qa_rows=2)
        finally:
            worker.close()
        assert (alone.rows, alone.errors, alone.qa_rows) == (result.results[i].rows, result.results[i].errors, 2)
        assert alone.rows == 5 and alone.errors_by_reason == {"decode/not_an_image": 1}
        got = _shard_files(Path(job.output.path), "00000")
        want = _shard_files(Path(single.output.path), "00000")
        assert got == want, job.output.path


# -- the run: Ray, resume per output, the command line -------------------------------------------------


def _summary(root: Path) -> dict:
    return json.loads((root / "summary.json").read_text())


def test_run_resumes_per_output(shards, tmp_path, ray_local, capsys):
    two = copy.deepcopy(OUTPUTS[:2])
    two[1]["output"]["dtype"] = "bf16"
    root = tmp_path / "run"
    cfg = tmp_path / "job.yaml"
    raw = _raw(shards, root, outputs=two)
    raw["qa"] = {"samples": 2}
    cfg.write_text(yaml.safe_dump(raw))

    # A alone first (its single-output config), then the two-output run: A is complete and skipped.
    single_cfg = tmp_path / "a.yaml"
    single_cfg.write_text(yaml.safe_dump(_single(raw, 0)))
    assert main(["encode", str(single_cfg), "-q"]) == 0
    first, second = sorted((root / "A/_commits").glob("*.json"))  # shard NAMEs carry a digest of the URL
    a_commit = first.read_bytes()
    capsys.readouterr()

    assert main(["run", str(cfg), "-q"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("Encode summary for") == 2
    a, b = _summary(root / "A"), _summary(root / "B")
    assert (a["shards_skipped"], a["shards_committed"]) == (2, 0)
    assert (b["shards_skipped"], b["shards_committed"], b["images"]) == (0, 2, 10)
    assert first.read_bytes() == a_commit  # not written again
    for out in ("A", "B"):
        assert (root / out / "qa/report.html").exists()
        assert json.loads((root / out / "qa/metrics.json").read_text())["counts"]["shards_committed"] == 2
    assert read_manifest(str(root / "B")).dtype == "bf16"

    # The second shard gone from A, the first from B: each is redone in that output only.
    assert sorted(p.name for p in (root / "B/_commits").glob("*.json")) == [first.name, second.name]
    second.unlink()
    (root / "B/_commits" / first.name).unlink()
    b_commit = (root / "B/_commits" / second.name).read_bytes()
    assert main(["encode", str(cfg), "-q"]) == 0
    a, b = _summary(root / "A"), _summary(root / "B")
    assert (a["shards_skipped"], a["shards_committed"], b["shards_skipped"], b["shards_committed"]) == (1, 1, 1, 1)
    assert first.read_bytes() == a_commit
    assert (root / "B/_commits" / second.name).read_bytes() == b_commit

    # Overrides reach one entry: output B with another resolution is another fingerprint, refused.
    capsys.readouterr()
    assert main(["encode", str(cfg), "outputs.1.preprocess.resolution=48", "-q"]) == 2
    assert "preprocess.sizes: existing [[32, 32]] != new [[48, 48]]" in capsys.readouterr().err
    # And a rerun with nothing to do in either output starts nothing.
    assert main(["encode", str(cfg), "-q"]) == 0
    assert _summary(root / "B")["shards_skipped"] == 2


def test_a_failing_output_leaves_the_others_committed(shards, tmp_path):
    raw = _raw(shards, tmp_path, outputs=OUTPUTS[:2])
    (tmp_path / "B").write_text("a file where output B's folder should be")
    multi = MultiEncodeWorker(config_from_dict(raw), device="cpu")
    truncated = tmp_path / "cut.tar"
    truncated.write_bytes(Path(shards[1]).read_bytes()[:30_000])
    try:
        result = multi.process_shard(shards[0], [OutputTask(0, "s0", 1), OutputTask(1, "s0", 1)])
        assert list(result.results) == [0] and list(result.errors) == [1]
        assert read_commit(str(tmp_path / "A"), "s0").rows == 5
        # A shard that cannot be read fails in every output, and nothing of it is committed.
        result = multi.process_shard(str(truncated), [OutputTask(0, "cut", 1)])
        assert not result.results and "cannot read input shard" in str(result.errors[0])
        assert read_commit(str(tmp_path / "A"), "cut") is None
    finally:
        multi.close()
