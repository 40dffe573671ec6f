"""`ray.batch_size: auto` and the memory estimate behind the batch warning, against real runs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from pipeline.batch_size import auto_batch_size, batch_warning, bytes_per_image, memory_budget
from pipeline.config import config_from_dict


def test_auto_depends_on_the_device_type_and_the_largest_size_only():
    cpu = {r: auto_batch_size("cpu", [(r, r)]) for r in (64, 128, 256, 512, 1024)}
    gpu = {r: auto_batch_size("cuda", [(r, r)]) for r in (64, 128, 256, 512, 1024)}
    assert cpu == {64: 16, 128: 16, 256: 16, 512: 4, 1024: 1}
    assert gpu == {64: 128, 128: 128, 256: 64, 512: 16, 1024: 4}
    # Aspect buckets: the largest area decides, whatever the order.
    buckets = [(832, 1216), (1024, 1024), (1216, 832), (640, 1536)]
    assert auto_batch_size("cuda", buckets) == auto_batch_size("cuda", buckets[::-1]) == 4
    # Powers of two only.
    assert all(b & (b - 1) == 0 for b in list(cpu.values()) + list(gpu.values()))


_PEAK = r"""
import json, sys, torch
from latentae import AutoencoderKL

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

res, batch = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(1)
m = AutoencoderKL.from_preset("tiny").prepare(device="cpu", dtype="fp32", channels_last=True)
with torch.inference_mode():
    m.encode(torch.zeros(1, 3, 32, 32))
    x = torch.zeros(batch, 3, res, res)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size to the current one
    before = status("VmRSS")
    m.encode(x)
print(json.dumps({"peak": status("VmHWM") - before, "ch": m.config.ch}))
"""


@pytest.mark.parametrize("res, batch", [(256, 4), (384, 2)])
def test_the_cpu_estimate_covers_the_measured_peak_without_wasting_half(res, batch):
    out = subprocess.run([sys.executable, "-c", _PEAK, str(res), str(batch)], capture_output=True, text=True,
                         check=True, timeout=120)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    estimate = batch * bytes_per_image(measured["ch"], (res, res), "cpu", "fp32")
    assert measured["peak"] <= estimate <= 2 * measured["peak"], (measured, estimate)


def test_the_warning_names_the_key_and_a_batch_that_fits():
    sizes = [(512, 512)]
    per = bytes_per_image(128, (512, 512), "cpu", "fp32")
    assert batch_warning(8, sizes, 128, "cpu", "fp32", budget=8 * per) is None
    text = batch_warning(32, sizes, 128, "cpu", "fp32", budget=5 * per)
    assert text.startswith("ray.batch_size 32 at 512x512 needs about 16.0 GiB")
    assert "lower ray.batch_size to 4" in text
    text = batch_warning(1, sizes, 128, "cpu", "fp32", budget=per // 2)
    assert "even one image does not fit" in text
    assert batch_warning(10**6, sizes, 128, "cpu", "fp32", budget=None) is None  # nothing known: no warning
    # Half precision on a GPU counts 10 bytes per channel and pixel (measured on an H200), fp32 16.
    assert bytes_per_image(128, (256, 256), "cuda", "bf16") == 10 * 128 * 256 * 256
    assert bytes_per_image(128, (256, 256), "cuda", "fp32") == bytes_per_image(128, (256, 256), "cpu", "bf16")


def test_cpu_budget_is_a_share_of_available_memory():
    import torch

    one = memory_budget(torch.device("cpu"), gpu_share=None, cpus=1)
    every = memory_budget(torch.device("cpu"), gpu_share=None, cpus=10**6)
    assert one is not None and 0 < one <= every
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert every <= available


def _config(url, out, **ray):
    return config_from_dict({"input": {"urls": str(url)}, "output": {"path": str(out)},
                             "preprocess": {"resolution": 64}, "ray": ray, "qa": {"samples": 0}})


def test_the_worker_uses_auto_and_warns_about_a_batch_too_large(sample_shards, tmp_path, caplog):
    from pipeline.worker import EncodeWorker

    caplog.set_level(logging.WARNING, logger="pipeline")
    url = sample_shards[0]
    worker = EncodeWorker(_config(url, tmp_path / "out"), device="cpu")
    try:
        assert worker.batch_size == 16 and "ray.batch_size" not in caplog.text
        assert worker.process_shard(str(url), "s").rows == 4
    finally:
        worker.close()
    worker = EncodeWorker(_config(url, tmp_path / "out2", batch_size=10**9), device="cpu")
    try:
        assert worker.batch_size == 10**9
        assert "ray.batch_size 1000000000 at 64x64 needs about" in caplog.text
    finally:
        worker.close()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_gpu_budget_is_a_share_of_free_device_memory():
    import torch

    device = torch.device("cuda")
    free, total = torch.cuda.mem_get_info(device)
    whole = memory_budget(device, gpu_share=None, cpus=1)
    half = memory_budget(device, gpu_share=0.5, cpus=1)
    assert 0 < half <= whole <= free and half <= total * 0.5
