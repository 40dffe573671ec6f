"""Fraction of the device's bf16 peak reached by the encoder.

    python -m benchmarks.device_peak --preset sd --resolution 256 --batch 64

Counts the encoder's floating-point operations per image with torch's FLOP counter (a multiply-add
is 2 FLOP), times the encoder in bf16 (optionally channels_last and compiled) and divides the achieved
rate by two peaks: the datasheet's dense bf16 figure (`--peak-tflops`, H100/H200 SXM: 989) and a
large bf16 matrix product measured on this device in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from latentae import AutoencoderKL


def encoder_flops(model: AutoencoderKL, resolution: int) -> float:
    x = torch.randn(1, 3, resolution, resolution, device="meta")
    counter = FlopCounterMode(display=False)
    meta = AutoencoderKL(model.config).to("meta")
    with counter, torch.no_grad():
        meta.encode(x)
    return float(counter.get_total_flops())


def matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    model = AutoencoderKL.from_preset(args.preset)
    flops = encoder_flops(model, args.resolution)
    model.prepare(device="cuda", dtype="bf16", channels_last=args.channels_last, compile=args.compile)
    x = torch.randn(args.batch, 3, args.resolution, args.resolution, device="cuda")
    with torch.inference_mode():
        for _ in range(3):
            model.encode(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model.encode(x)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    rate = args.batch / statistics.median(times)
    achieved = rate * flops / 1e12
    measured_peak = matmul_tflops()
    result = {
        "preset": args.preset, "resolution": args.resolution, "batch": args.batch, "compile": args.compile,
        "channels_last": args.channels_last, "gflop_per_image": flops / 1e9, "images_per_s": rate, "achieved_tflops": achieved,
        "fraction_of_datasheet_peak": achieved / args.peak_tflops,
        "matmul_tflops_measured": measured_peak, "fraction_of_measured_matmul": achieved / measured_peak,
    }
    print(f"encoder {args.preset} @ {args.resolution}px bf16 batch {args.batch}{' compiled' if args.compile else ''}"
          f"{' channels-last' if args.channels_last else ''}: "
          f"{flops / 1e9:.1f} GFLOP/image, {rate:.1f} images/s = {achieved:.1f} TFLOP/s = "
          f"{100 * achieved / args.peak_tflops:.1f}% of {args.peak_tflops:g} (datasheet), "
          f"{100 * achieved / measured_peak:.1f}% of the measured bf16 matmul ({measured_peak:.0f} TFLOP/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
