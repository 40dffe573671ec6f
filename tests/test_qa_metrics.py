"""QA building blocks: PSNR/SSIM against scikit-image, aggregates, LPIPS from local weights,
latent statistics from commit records, sample choice and the Pillow figures."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from pipeline.commit import ChannelStats, CommitRecord
from pipeline.qa import plots
from pipeline.qa.errors import QAError
from pipeline.qa.metrics import PSNR_CAP_DB, psnr, ssim, summarize
from pipeline.qa.sampling import choose
from pipeline.qa.stats import LatentStatistics, channel_histograms


def _pair(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth image and a noisy, shifted copy of it (uint8 HWC)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([127 + 100 * np.sin(xx / 7.0 + c) * np.cos(yy / 5.0 - c) for c in range(3)], axis=-1)
    a = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    b = np.clip(base * 0.9 + 12 + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return a, b


@pytest.mark.parametrize("shape", [(64, 64), (48, 80), (11, 23)])
def test_ssim_and_psnr_match_skimage(shape):
    pairs = [_pair(*shape, seed) for seed in range(3)]
    a = torch.from_numpy(np.stack([p[0] for p in pairs]))
    b = torch.from_numpy(np.stack([p[1] for p in pairs]))
    ours_ssim = ssim(a, b).numpy()
    ours_psnr = psnr(a, b).numpy()
    for i, (x, y) in enumerate(pairs):
        ref = structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=255, channel_axis=-1)
        assert ours_ssim[i] == pytest.approx(ref, abs=1e-9)
        assert ours_psnr[i] == pytest.approx(peak_signal_noise_ratio(x, y, data_range=255), abs=1e-9)


def test_ssim_of_identical_images_is_one_and_psnr_is_capped():
    a, _ = _pair(32, 32, 0)
    t = torch.from_numpy(a[None])
    assert float(ssim(t, t)[0]) == pytest.approx(1.0)
    assert float(psnr(t, t)[0]) == PSNR_CAP_DB
    tiny = torch.zeros(1, 8, 8, 3, dtype=torch.uint8)
    assert math.isnan(float(ssim(tiny, tiny)[0]))


def test_summarize_tails_follow_the_metric_direction():
    values = [float(v) for v in range(1, 101)] + [None, math.nan]
    up = summarize(values)
    assert up["count"] == 100 and up["missing"] == 2
    assert up["worst"] == 1 and up["best"] == 100 and up["median"] == 50.5
    assert up["p5"] == pytest.approx(np.percentile(np.arange(1, 101), 5))
    down = summarize(values, higher_is_better=False)
    assert down["worst"] == 100 and down["p5"] == pytest.approx(np.percentile(np.arange(1, 101), 95))
    assert summarize([None])["mean"] is None


def write_random_lpips_weights(path, prefix=""):
    """An LPIPS weight file with random values (the layout is what is tested, not the numbers)."""
    from safetensors.torch import save_file

    from pipeline.qa.lpips import _CHANNELS, LPIPS

    torch.manual_seed(0)
    model = LPIPS()
    tensors = {f"{prefix}features.{k}.{p}": getattr(m, p).detach().clone()
               for k, m in model.features.items() for p in ("weight", "bias")}
    for i, c in enumerate(_CHANNELS):
        tensors[f"lin{i}.model.1.weight"] = torch.rand(1, c, 1, 1)
    save_file(tensors, str(path))


def test_lpips_from_local_weights(tmp_path):
    from pipeline.qa.lpips import LPIPS

    write_random_lpips_weights(tmp_path / "lpips.safetensors", prefix="net.")
    model = LPIPS.from_local(tmp_path / "lpips.safetensors")
    a, b = _pair(64, 64, 1)
    x = torch.from_numpy(np.stack([a, a])).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = torch.from_numpy(np.stack([a, b])).permute(0, 3, 1, 2).float() / 127.5 - 1
    d = model(x, y)
    assert float(d[0]) == pytest.approx(0.0, abs=1e-6) and float(d[1]) > 0
    with pytest.raises(QAError, match="does not exist"):
        LPIPS.from_local(tmp_path / "absent.pth")
    torch.save({"lin0.model.1.weight": torch.rand(1, 64, 1, 1)}, tmp_path / "partial.pth")
    with pytest.raises(QAError, match="features.0.weight"):
        LPIPS.from_local(tmp_path / "partial.pth")


def _record(name: str, latents: np.ndarray) -> CommitRecord:
    stats = ChannelStats(latents.shape[1])
    stats.update(latents)
    return CommitRecord(name=name, format="parquet", dtype="fp32", rows=len(latents), errors=0, files={},
                        stats=stats.to_dict())


def test_latent_statistics_are_exact_and_flag_wrong_factors():
    rng = np.random.default_rng(0)
    a = rng.normal(0.5, 2.0, (10, 4, 4, 4))
    b = rng.normal(0.5, 2.0, (7, 4, 4, 4))
    b[0, 2, 0, 0] = np.nan
    b[1, 3, 0, 0] = np.inf
    stats = LatentStatistics.from_commits([_record("a", a), _record("b", b), CommitRecord(
        name="empty", format="parquet", dtype="fp32", rows=0, errors=0, files={})])
    assert stats.shards == 2 and stats.nonfinite == 2
    values = np.concatenate([a, b]).transpose(1, 0, 2, 3).reshape(4, -1)
    finite = values[np.isfinite(values)]
    mean, std = float(finite.mean()), float(finite.std())
    good = stats.report(1.0 / std, mean, tolerance=0.5)
    assert good["overall"]["mean"] == pytest.approx(mean) and good["overall"]["std"] == pytest.approx(std)
    assert good["recommended_scaling_factor"] == pytest.approx(1.0 / std)
    assert good["channels"][0]["mean"] == pytest.approx(values[0].mean())
    assert good["channels"][2]["nan"] == 1 and good["channels"][3]["inf"] == 1
    assert good["scale_ok"] and good["shift_ok"] and good["scaled_std"] == pytest.approx(1.0)
    wrong_scale = stats.report(4.0 / std, mean, tolerance=0.5)
    assert not wrong_scale["scale_ok"] and wrong_scale["scale_drift"] == pytest.approx(3.0)
    wrong_shift = stats.report(1.0 / std, mean + std, tolerance=0.5)
    assert wrong_shift["scale_ok"] and not wrong_shift["shift_ok"]
    counts = channel_histograms([v for v in a], stats.histogram_ranges(), bins=10)
    assert counts.shape == (4, 10) and counts.sum() == a.size


def test_choose_is_a_stable_subset():
    rows = [(f"s{i % 3}", f"key{i}", "64x64") for i in range(30)]
    picked = choose(rows, 10)
    assert sum(len(v) for v in picked.values()) == 10
    assert choose(list(reversed(rows)), 10) == picked
    everything = choose(rows, 100)
    assert sum(len(v) for v in everything.values()) == 30
    assert all(set(v) <= set(everything[k]) for k, v in picked.items())


def test_figures_are_valid_non_blank_pngs():
    hist = plots.value_histogram([10.0, 20.0, 21.0, 22.5, 30.0], "PSNR", "dB", markers=[(20.0, "min")])
    heat = plots.colorize(np.linspace(0, 80, 64 * 64).reshape(64, 64))
    for image in (hist, heat, plots.colorbar()):
        uri = plots.png_data_uri(image)
        import base64

        decoded = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        arr = np.asarray(decoded.convert("RGB"))
        assert arr.std() > 5  # drawn, not a blank canvas
    assert np.asarray(heat)[0, 0].tolist() == [0, 0, 4]
    assert np.asarray(heat)[-1, -1].tolist() == [252, 255, 164]
