"""The shipped weights of the `tiny` preset: present, small, loaded by default, and good on held-out photos."""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest
import torch

from latentae import AutoencoderKL, get_preset
from latentae.presets import SHIPPED_WEIGHTS
from latentae.sample_photos import HELDOUT_PHOTOS, SAMPLE_PHOTOS, sample_photos
from latentae.train import CropSampler, eval_crops, heldout_psnr

WEIGHTS = SHIPPED_WEIGHTS["tiny"]
needs_photos = pytest.mark.skipif(importlib.util.find_spec("skimage") is None,
                                  reason="the sample photos ship with scikit-image")


@pytest.fixture(scope="module")
def tiny() -> AutoencoderKL:
    return AutoencoderKL.from_preset("tiny").prepare("cpu")


def test_shipped_files():
    assert WEIGHTS.is_file() and WEIGHTS.with_suffix(".json").is_file()
    assert WEIGHTS.stat().st_size < 8 * 2**20, "the tiny weights must stay a few MB"
    info = json.loads(WEIGHTS.with_suffix(".json").read_text())
    config = get_preset("tiny").replace(**info["config"])
    assert config.same_architecture(get_preset("tiny")), "tiny.json must not change the preset's architecture"
    assert config.scaling_factor != 1.0, "scaling_factor is measured on the training latents"
    training = info["training"]
    assert training["recipe"].startswith("python -m latentae.train")
    assert set(training["heldout_photos"]) == set(HELDOUT_PHOTOS)
    assert training["heldout_psnr_128"] >= 24.0


def test_from_preset_loads_shipped_weights(tiny, caplog):
    with caplog.at_level(logging.WARNING):
        model = AutoencoderKL.from_preset("tiny")
    assert "RANDOM WEIGHTS" not in caplog.text
    assert model.weights_sha256 is not None
    info = json.loads(WEIGHTS.with_suffix(".json").read_text())["config"]
    assert model.scaling_factor == pytest.approx(info["scaling_factor"])
    assert model.shift_factor == pytest.approx(info["shift_factor"])
    z = tiny.encode(torch.zeros(1, 3, 128, 96)).mean
    assert z.shape == (1, tiny.latent_channels, 16, 12)


def test_heldout_photos_are_not_training_photos():
    assert set(HELDOUT_PHOTOS) < set(SAMPLE_PHOTOS)
    assert len(set(SAMPLE_PHOTOS) - set(HELDOUT_PHOTOS)) >= 10


@needs_photos
def test_heldout_psnr_at_128(tiny):
    psnr = heldout_psnr(tiny, size=128)
    assert len(psnr) == 3 * len(HELDOUT_PHOTOS)
    assert float(psnr.mean()) >= 24.0, f"held-out PSNR {psnr.tolist()}"


@needs_photos
def test_reconstruction_beats_a_blur(tiny):
    # A model that only learned the average colour would still score some dB; it must keep more than
    # a downscale by the same factor as its latents (8x, 3 values per 8x8 block against its 8) keeps.
    images = eval_crops(sample_photos("heldout"), 128)
    blurred = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(images, 8), scale_factor=8,
                                              mode="bilinear")
    from latentae.train import psnr, reconstruct

    assert float(psnr(images, reconstruct(tiny, images)).mean()) > float(psnr(images, blurred).mean()) + 1.0


@needs_photos
def test_scaled_latents_have_unit_scale(tiny):
    photos = [img for name, img in sample_photos("train")]
    x = CropSampler(photos, torch.Generator().manual_seed(1), augment=False).batch(128, 8)
    z = tiny.scale_latents(tiny.encode(x).mean)
    assert abs(float(z.mean())) < 0.5
    assert 0.5 < float(z.std()) < 2.0


def test_train_recipe_runs(tmp_path):
    """`python -m latentae.train` end to end on two small images: weights + config that load back."""
    import numpy as np
    from PIL import Image

    from latentae import train

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "weights"
    argv = ["--images", str(images), "--out", str(out), "--steps", "2", "--batch-size", "2", "--eval-every", "1",
            "--threads", "1", "--name", "mini"]
    assert train.main(argv) == 0
    info = json.loads((out / "mini.json").read_text())
    assert info["training"]["recipe"] == "python -m latentae.train " + " ".join(argv)
    model = AutoencoderKL.from_pretrained(out / "mini.safetensors", config=info["config"])
    assert model.scaling_factor == pytest.approx(info["config"]["scaling_factor"])
    assert model.encoder.conv_in.weight.dtype == torch.float32
