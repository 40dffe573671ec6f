"""The QA stage end to end: a real encode (EncodeWorker, tiny preset), QA on a local Ray
instance, the report parsed and rendered in headless Chromium, and the two deliberate faults
(wrong scaling factor, mismatched decoder) that must flip the verdict."""

from __future__ import annotations

import base64
import io
import json
import math
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import sample_photos, write_shard
from PIL import Image
from test_qa_metrics import write_random_lpips_weights

from latentae.presets import SHIPPED_WEIGHTS
from pipeline.config import config_from_dict
from pipeline.manifest import check_or_write_manifest, read_manifest
from pipeline.qa import run_qa
from pipeline.qa.report import format_number, resolve
from pipeline.summary import EncodeSummary, FailedShard, write_summary

BUCKETS = [[64, 64], [56, 72]]

# The verdict tests need an autoencoder that reconstructs: the trained weights the tiny preset ships.
needs_trained_tiny = pytest.mark.skipif(not SHIPPED_WEIGHTS["tiny"].is_file(),
                                        reason="needs the tiny preset's shipped weights (latentae/weights/)")


def _input_shards(folder: Path) -> list[Path]:
    """Two WebDataset shards of small photos of both aspect ratios, plus one undecodable image."""
    photos = sample_photos(count=6)
    paths = []
    for s in range(2):
        samples = []
        for i in range(5):
            name, img = photos[(s * 5 + i) % len(photos)]
            img = img.convert("RGB").resize((80, 80) if i % 2 == 0 else (104, 80))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            samples.append((f"{s:03d}{i:04d}", {"png": buf.getvalue(), "txt": name.encode()}))
        samples.append((f"{s:03d}9999", {"png": b"this is not an image"}))
        paths.append(write_shard(folder / f"{s:05d}.tar", samples))
    return paths


def _config(inputs: list[Path], out: Path, **sections):
    raw = {
        "input": {"urls": [str(p) for p in inputs]},
        "output": {"path": str(out), "dtype": "bf16"},
        "model": {"preset": "tiny"},
        "preprocess": {"buckets": BUCKETS},
        "qa": {"samples": 8},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


def _encode(config, model=None) -> None:
    from pipeline.worker import EncodeWorker

    worker = EncodeWorker(config, device="cpu", model=model)
    try:
        check_or_write_manifest(config.output.path, worker.manifest, config.output.storage_options)
        urls = config.input.urls
        for url in urls:
            worker.process_shard(url, Path(url).stem, num_shards=len(urls))
    finally:
        worker.close()


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """(inputs, good output) encoded once for the module; tests copy the output before QA writes into it."""
    base = tmp_path_factory.mktemp("qa")
    inputs = _input_shards(base)
    out = base / "good"
    _encode(_config(inputs, out))
    return inputs, out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


class _ReportParser(HTMLParser):
    """Collects images, data-key cells and every table cell's text."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.cells: list[tuple[str | None, str]] = []
        self.external: list[str] = []
        self._cell: tuple[str | None, list[str]] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag in ("script", "link", "iframe") or (a.get("src") or "").startswith(("http:", "https:", "//")):
            self.external.append(tag)
        if tag == "td":
            self._cell = (a.get("data-key"), [])

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append((self._cell[0], "".join(self._cell[1]).strip()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1].append(data)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _render(html_path: Path, png: Path) -> np.ndarray:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "headless Chromium is needed to render the report (apt-get install -y chromium)"
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1280,1600", f"--screenshot={png}",
             html_path.as_uri()],
            capture_output=True, text=True, timeout=120,
        )
    assert png.exists(), f"chromium wrote no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return np.asarray(Image.open(png).convert("RGB"))


@pytest.fixture(scope="module")
def good_report(encoded, ray_local, tmp_path_factory):
    """QA of the good output (with a summary.json naming a failed shard, LPIPS on): (exit code, metrics, folder)."""
    inputs, good = encoded
    base = tmp_path_factory.mktemp("good-report")
    out = _copy(good, base / "out")
    # The encode run's summary (as the driver writes it) names a shard that failed.
    write_summary(EncodeSummary(
        output=str(out), status="failed", shards_total=3, shards_committed=2, images=10, seconds=2.5,
        images_per_second=4.0, workers=1, retries=2,
        failed=[FailedShard("00002", "in/00002.tar", 3, "ReadError: truncated tar")],
    ), str(out))
    write_random_lpips_weights(base / "lpips.safetensors")
    code = run_qa(_config(inputs, out, qa={"lpips_weights": str(base / "lpips.safetensors")}))
    return code, json.loads((out / "qa" / "metrics.json").read_text()), out


def test_report_is_complete_and_matches_metrics(good_report, tmp_path):
    """Counts, every embedded image, every number against metrics.json, and a Chromium rendering."""
    code, metrics, out = good_report
    assert code == (0 if metrics["verdict"] == "pass" else 1)
    assert {c["name"]: c["status"] for c in metrics["checks"]}["shards"] == "warn"
    counts = metrics["counts"]
    assert counts["shards_failed"] == [{"name": "00002", "error": "ReadError: truncated tar"}]
    assert counts["throughput"]["images_per_second"] == 4.0
    assert counts["shards_committed"] == 2 and counts["images"] == 10 and counts["errors"] == 2
    assert counts["errors_by_reason"][0]["count"] == 2 and counts["errors_by_reason"][0]["examples"]
    assert counts["qa_scored"] == counts["qa_selected"] == 8 and counts["qa_problem_count"] == 0
    assert set(metrics["metrics"]["by_bucket"]) == {"64x64", "56x72"}
    assert set(metrics["metrics"]["by_shard"]) == {"00000", "00001"}
    assert metrics["lpips"]["enabled"] is True and metrics["metrics"]["overall"]["lpips"]["count"] == 8
    storage = metrics["storage"]
    assert storage["dtype"] == "bf16" and storage["beyond_rounding"] == 0
    assert abs(storage["psnr_lost_db"]["mean"]) < 0.5
    stats = metrics["latent_stats"]
    # 6 square images and 4 of 56x72: the manifest's latent shapes, in bucket order.
    square, wide = metrics["provenance"]["shapes"]
    assert stats["overall"]["count"] == 6 * math.prod(square) + 4 * math.prod(wide)
    assert stats["overall"]["nan"] == 0
    assert len(stats["channels"]) == square[0] == len(stats["histogram"]["channels"])
    assert metrics["provenance"]["manifest_fingerprint"]

    html_path = out / "qa" / "report.html"
    parser = _ReportParser()
    parser.feed(html_path.read_text("utf-8"))
    assert not parser.external, "the report must be self-contained"
    # Every embedded image decodes: 3 panels per shown sample (2 per group of 8), colour bar, 2 histograms.
    assert len(parser.images) == 3 * 6 + 1 + 2
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        image.load()
        assert image.width > 0 and image.height > 0
    # Every number on the page comes from metrics.json, and shows its value.
    keyed = [(k, t) for k, t in parser.cells if k]
    assert len(keyed) > 100
    for key, text in keyed:
        value = resolve(metrics, key)
        assert text == format_number(value), key
        if isinstance(value, float) and math.isfinite(value):
            assert float(text) == pytest.approx(value, rel=1e-4, abs=1e-12), key
    unkeyed_numbers = [t for k, t in parser.cells if not k and _is_number(t)]
    assert not unkeyed_numbers, f"numbers without a metrics.json source: {unkeyed_numbers}"

    shot = _render(html_path, tmp_path / "report.png")
    assert shot.shape[0] >= 1000 and shot.std() > 20
    assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 500
    # The verdict banner (green for PASS, red for FAIL) is on screen.
    banner = [0xE3, 0xF4, 0xE5] if metrics["verdict"] == "pass" else [0xFB, 0xE4, 0xE4]
    assert (np.abs(shot.astype(int) - banner).sum(axis=-1) == 0).sum() > 5000


@needs_trained_tiny
def test_good_output_passes(good_report):
    code, metrics, _ = good_report
    assert code == 0 and metrics["verdict"] == "pass", metrics["checks"]
    assert metrics["metrics"]["overall"]["psnr"]["mean"] >= 20
    assert metrics["provenance"]["decoder_matches_manifest"] is True
    stats = metrics["latent_stats"]
    assert stats["scale_ok"] and stats["shift_ok"]


@needs_trained_tiny
def test_wrong_scaling_factor_fails(encoded, ray_local, tmp_path):
    """Latents made by a model whose configured scaling factor is 4x too large."""
    from latentae import AutoencoderKL

    inputs, _ = encoded
    model = AutoencoderKL.from_preset("tiny")
    model.config = model.config.replace(scaling_factor=model.scaling_factor * 4)
    out = tmp_path / "wrong-scale"
    config = _config(inputs, out)
    _encode(config, model=model)
    assert read_manifest(str(out)).scaling_factor == pytest.approx(model.scaling_factor)

    assert run_qa(config) == 1
    metrics = json.loads((out / "qa" / "metrics.json").read_text())
    failed = {c["name"] for c in metrics["checks"] if c["status"] == "fail"}
    assert failed == {"scaling"}
    stats = metrics["latent_stats"]
    assert stats["scaled_std"] > 1.5 and not stats["scale_ok"] and stats["shift_ok"]
    assert "Verdict: FAIL" in (out / "qa" / "report.html").read_text("utf-8")


@needs_trained_tiny
def test_mismatched_decoder_fails(encoded, ray_local, tmp_path):
    """The same latents decoded by a tiny autoencoder with other (random) weights."""
    import torch

    from latentae import AutoencoderKL, get_preset

    inputs, good = encoded
    torch.manual_seed(123)
    other = AutoencoderKL(get_preset("tiny"))
    other.save_pretrained(tmp_path / "other-vae")
    out = _copy(good, tmp_path / "out")
    assert run_qa(_config(inputs, out, model={"weights": str(tmp_path / "other-vae")})) == 1

    metrics = json.loads((out / "qa" / "metrics.json").read_text())
    checks = {c["name"]: c["status"] for c in metrics["checks"]}
    assert checks["reconstruction"] == "fail" and checks["decoder"] == "warn"
    assert checks["scaling"] == "pass" and checks["readback"] == "pass"
    assert metrics["metrics"]["overall"]["psnr"]["mean"] < 20
    assert metrics["provenance"]["decoder_matches_manifest"] is False
    assert metrics["lpips"]["enabled"] is False and "not set" in metrics["lpips"]["reason"]
    assert "LPIPS off" in (out / "qa" / "report.html").read_text("utf-8")


def test_decoder_flags_readback_problems(encoded, tmp_path):
    """The plain decoder class: tampered, missing and fp16-stored latents, without Ray."""
    from pipeline.config import ModelConfig
    from pipeline.qa.decoder import ReconstructionDecoder
    from pipeline.qa.readback import PairedSample, read_side_rows

    inputs, good = encoded
    decoder = ReconstructionDecoder(ModelConfig(preset="tiny"), str(good), storage_dtype="bf16", batch_size=2)
    result = decoder.score_shard("00000", [r.key for r in read_side_rows(str(good), "00000")])
    assert result.scores and all(s.within_rounding and s.problem is None for s in result.scores)

    side = read_side_rows(str(good), "00000")[:3]
    pairs = [
        PairedSample(side[0].key, "00000", side[0].bucket, side[0].pixels, side[0].latent, side[0].latent * 1.05),
        PairedSample(side[1].key, "00000", side[1].bucket, side[1].pixels, side[1].latent, None),
        PairedSample(side[2].key, "00000", side[2].bucket, side[2].pixels, side[2].latent, side[2].latent.copy()),
    ]
    tampered, missing, fine = decoder.score(pairs)
    assert tampered.within_rounding is False and "beyond bf16 rounding" in tampered.problem
    assert missing.psnr is None and "not found" in missing.problem
    assert fine.problem is None and fine.psnr == pytest.approx(fine.psnr_fp32)

    # A WebDataset-format output stored as fp16 reads back through the same path.
    wds = tmp_path / "wds"
    _encode(_config(inputs[:1], wds, output={"format": "wds", "dtype": "fp16"}))
    wds_decoder = ReconstructionDecoder(ModelConfig(preset="tiny"), str(wds), storage_dtype="fp16")
    keys = [r.key for r in read_side_rows(str(wds), "00000")]
    scores = wds_decoder.score_shard("00000", keys).scores
    assert len(scores) == len(keys) > 0 and all(s.within_rounding and s.problem is None for s in scores)


def test_qa_on_s3_keeps_credentials_out(encoded, ray_local, s3_server):
    """Output on an S3-compatible server: QA reads it through s3fs and masks the credentials."""
    inputs, _ = encoded
    options = {
        "key": "qa-access-key-4711",
        "secret": "qa-secret-key-0815",
        "client_kwargs": {"endpoint_url": s3_server.endpoint_url, "region_name": "us-east-1"},
    }
    root = s3_server.bucket("qa-report") + "/out"
    config = _config(inputs[:1], root, output={"storage_options": options})
    _encode(config)
    assert run_qa(config) in (0, 1)  # the verdict is the other tests' business; here: it ran on S3

    import s3fs

    fs = s3fs.S3FileSystem(**options)
    html_text = fs.cat_file(root[len("s3://"):] + "/qa/report.html").decode()
    metrics_text = fs.cat_file(root[len("s3://"):] + "/qa/metrics.json").decode()
    metrics = json.loads(metrics_text)
    assert metrics["counts"]["qa_scored"] == metrics["counts"]["qa_selected"] > 0
    assert metrics["counts"]["qa_problem_count"] == 0 and metrics["output"] == root
    for text in (html_text, metrics_text):
        assert "qa-secret-key-0815" not in text and "qa-access-key-4711" not in text


def test_qa_without_an_output_cannot_run(tmp_path, capsys):
    config = _config([tmp_path / "in.tar"], tmp_path / "nothing-here")
    assert run_qa(config) == 2
    assert "no manifest" in capsys.readouterr().err
