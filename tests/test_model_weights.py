"""`model.weights` on object storage: downloaded once per machine and version, through s3fs."""

from __future__ import annotations

import os
import tempfile

import pytest
import s3fs
import torch

from pipeline.config import config_from_dict
from pipeline.models import load_model, local_weights

pytestmark = pytest.mark.timeout(180)


def _model_config(weights, storage_options, preset=None):
    raw = {"input": {"urls": "a.tar"}, "output": {"path": "o"},
           "model": {"preset": preset, "weights": weights, "storage_options": storage_options}}
    return config_from_dict(raw).model


def _same(a, b) -> bool:
    assert a is not b
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    return tmp_path / "tmp" / "latent-weights"


def test_remote_weights_file_and_folder(s3_server, tmp_path, cache_dir):
    from latentae import AutoencoderKL

    so = s3_server.storage_options
    fs = s3fs.S3FileSystem(**so)
    bucket = s3_server.bucket("weights")
    first = AutoencoderKL.from_preset("tiny")
    first.save_pretrained(str(tmp_path / "first"))  # a diffusers folder
    fs.put(str(tmp_path / "first"), f"{bucket}/vae", recursive=True)
    fs.put(str(tmp_path / "first" / "diffusion_pytorch_model.safetensors"), f"{bucket}/vae.safetensors")

    folder = load_model(_model_config(f"{bucket}/vae", so))
    assert _same(folder, first)
    single = load_model(_model_config(f"{bucket}/vae.safetensors", so, preset="tiny"))
    assert _same(single, first)
    cached = sorted(p.name for p in cache_dir.iterdir())
    assert len(cached) == 2

    # A second load uses the copy: same path, not downloaded again.
    path = local_weights(f"{bucket}/vae.safetensors", so)
    mtime = os.stat(path).st_mtime_ns
    assert local_weights(f"{bucket}/vae.safetensors", so) == path and os.stat(path).st_mtime_ns == mtime
    assert path.startswith(str(cache_dir)) and not [p for p in cache_dir.rglob("*.partial")]

    # New weights at the same URL are a new version: fetched again, never the stale copy.
    second = AutoencoderKL.from_preset("tiny")
    with torch.no_grad():
        second.encoder.conv_in.weight.mul_(0.5)
    second.save_pretrained(str(tmp_path / "second"))
    fs.put(str(tmp_path / "second" / "diffusion_pytorch_model.safetensors"), f"{bucket}/vae.safetensors")
    fs.invalidate_cache()
    s3fs.S3FileSystem.clear_instance_cache()
    reloaded = load_model(_model_config(f"{bucket}/vae.safetensors", so, preset="tiny"))
    assert _same(reloaded, second) and not _same(reloaded, first)
    assert local_weights(f"{bucket}/vae.safetensors", so) != path


def test_missing_remote_weights_name_the_url(s3_server, cache_dir):
    so = s3_server.storage_options
    bucket = s3_server.bucket("weights-missing")
    with pytest.raises(FileNotFoundError, match="weights-missing/nothing-here"):
        local_weights(f"{bucket}/nothing-here.safetensors", so)
