"""Encoder throughput: latentae vs diffusers' AutoencoderKL.encode, same weights, batch and dtype.

    python -m benchmarks.bench_encoder                      # sd preset, 128 px, batch 2, fp32, CPU
    python -m benchmarks.bench_encoder --preset flux --resolution 512 --batch 8 --dtype bf16 --device cuda

Both models hold identical weights (random init of the preset's architecture, copied across with
latentae's key conversion; the script prints how far their posterior means differ). Calls alternate
between the two, first one then the other going first, so that drift in machine load affects both alike; the figure is the median over
``--repeats`` timed calls after ``--warmup`` untimed ones. diffusers runs the way its users run it:
weights and input cast to the dtype; latentae runs through ``prepare(dtype=...)`` (autocast).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from latentae import AutoencoderKL, get_preset
from latentae.checkpoint import config_to_diffusers, native_to_diffusers

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_pair(preset: str, device: str, dtype: str, channels_last: bool, compile: bool, seed: int = 0):
    """Our model and a diffusers AutoencoderKL with the same weights, both ready for inference."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its dtype-cast advice is noise here
    torch.manual_seed(seed)
    config = get_preset(preset)
    ours = AutoencoderKL(config)
    diffusers_config = {k: v for k, v in config_to_diffusers(config).items() if not k.startswith("_")}
    theirs = DiffusersAutoencoderKL.from_config(diffusers_config)
    theirs.load_state_dict(native_to_diffusers(ours.state_dict(), len(config.ch_mult)), strict=True)
    ours.prepare(device, dtype=dtype, channels_last=channels_last, compile=compile)
    theirs = theirs.eval().requires_grad_(False).to(device=device, dtype=DTYPES[dtype])
    if channels_last:
        theirs = theirs.to(memory_format=torch.channels_last)
    if compile:
        theirs.encoder.compile()
    return ours, theirs


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(
    preset: str = "sd",
    resolution: int = 128,
    batch: int = 2,
    dtype: str = "fp32",
    device: str = "cpu",
    repeats: int = 10,
    warmup: int = 2,
    channels_last: bool = False,
    compile: bool = False,
) -> dict[str, Any]:
    """Time both encoders; returns images/s per implementation and the ratio ours / diffusers."""
    ours, theirs = build_pair(preset, device, dtype, channels_last, compile)
    torch.manual_seed(1)
    x = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    x_theirs = x.to(DTYPES[dtype])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        x_theirs = x_theirs.contiguous(memory_format=torch.channels_last)

    calls: dict[str, Callable[[], torch.Tensor]] = {
        "latentae": lambda: ours.encode(x).mean,
        "diffusers": lambda: theirs.encode(x_theirs).latent_dist.mean,
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        diff = (calls["latentae"]().float() - calls["diffusers"]().float()).abs().max().item()
        for i in range(warmup + repeats):
            # Alternate who goes first, so that neither always runs on a warmer cache or a quieter machine.
            order = list(calls.items()) if i % 2 == 0 else list(calls.items())[::-1]
            for name, fn in order:
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)

    result: dict[str, Any] = {
        "preset": preset, "resolution": resolution, "batch": batch, "dtype": dtype, "device": device,
        "repeats": repeats, "channels_last": channels_last, "compile": compile,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "max_abs_diff_mean": diff,
    }
    for name, ts in times.items():
        med = statistics.median(ts)
        result[name] = {"median_s": med, "images_per_s": batch / med}
    result["ratio"] = result["latentae"]["images_per_s"] / result["diffusers"]["images_per_s"]
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sd")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--channels-last", action="store_true", help="both models in channels_last format")
    parser.add_argument("--compile", action="store_true", help="torch.compile both encoders")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.preset, args.resolution, args.batch, args.dtype, args.device, args.repeats, args.warmup,
                 args.channels_last, args.compile)
    print(f"encoder benchmark: preset={args.preset} {args.resolution}x{args.resolution} batch={args.batch} "
          f"dtype={args.dtype} device={args.device} threads={result['threads']} torch={result['torch']}")
    for name in ("latentae", "diffusers"):
        r = result[name]
        print(f"  {name:<10} {r['images_per_s']:9.2f} images/s   (median {r['median_s'] * 1000:.1f} ms per batch)")
    print(f"  ratio latentae/diffusers: {result['ratio']:.3f}   (posterior mean max abs diff {result['max_abs_diff_mean']:.2e})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
