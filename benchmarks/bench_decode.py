"""The decode stage alone: what one image costs, and how decoders scale in threads and processes.

    python -m benchmarks.bench_decode [--resolution 256 --source-sides 320,640 --decoders 1,2]

Two tables, medians over interleaved repeats on the same JPEG shard (bundled photos, quality 90):

  per image   ms per image of read + decode + preprocess in one thread, for the shipped
              preprocessing (one Lanczos resampling of the crop's box) and for resizing the whole
              image and then cropping, which it replaces
  scaling     images/s of the decode pool (`pipeline.decodepool.DecodePool`, as the worker uses
              it) with N threads and N processes, and each against N x the one-thread rate

Where the scaling of threads falls behind that of processes, the decoders are waiting for the
GIL rather than for CPUs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import make_bench_shards, median, table


def _whole_then_crop(pre, decoded, key):
    """The preprocessing before crop-box resampling: resize the whole image, then crop."""
    from PIL import Image

    original = decoded.original_size
    target, resized = pre.target_for(original), pre.resized_size(original)
    pixels = decoded.pixels
    if pixels.shape[:2] != resized:
        pixels = np.asarray(Image.fromarray(pixels, "RGB").resize((resized[1], resized[0]), Image.Resampling.LANCZOS))
    top, left = pre.crop_offset(key, resized, target)
    return np.ascontiguousarray(pixels[top : top + target[0], left : left + target[1]])


def per_image(samples, pre, options, repeats: int) -> dict[str, float]:
    from pipeline.decode import decode_image

    def shipped():
        for key, data in samples:
            pre(decode_image(data, options, needed_size=pre.resized_size), key)

    def whole():
        for key, data in samples:
            _whole_then_crop(pre, decode_image(data, options, needed_size=pre.resized_size), key)

    times: dict[str, list[float]] = {"crop box (shipped)": [], "whole image, then crop": []}
    variants = list(zip(times, (shipped, whole)))
    for i in range(repeats):
        for name, fn in variants[i % 2:] + variants[: i % 2]:
            t0 = time.perf_counter()
            fn()
            times[name].append(1000 * (time.perf_counter() - t0) / len(samples))
    return {k: median(v) for k, v in times.items()}


def pool_rate(pool, samples) -> float:
    items = [samples[i : i + pool.chunk] for i in range(0, len(samples), pool.chunk)]
    t0 = time.perf_counter()
    futures = [(chunk, pool.submit(chunk)) for chunk in items]
    n = sum(len(pool.result(f, chunk)) for chunk, f in futures)
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--source-sides", default="320,640", help="shorter sides of the JPEGs, comma separated")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--decoders", default="1,2", help="decoder counts to measure, comma separated")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)

    from pipeline.decode import DecodeOptions
    from pipeline.decodepool import DecodePool
    from pipeline.preprocess import Preprocessor
    from pipeline.reader import Sample, ShardReader

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-decode-"))
    pre = Preprocessor([(args.resolution, args.resolution)], crop="random")
    options = DecodeOptions()
    counts = [int(n) for n in args.decoders.split(",")]
    for side in (int(s) for s in args.source_sides.split(",")):
        (url,) = make_bench_shards(workdir / f"side{side}", 1, args.images, side)
        samples = [(s.key, s.image) for s in ShardReader(url, {}) if isinstance(s, Sample)]
        costs = per_image(samples, pre, options, args.repeats)
        base = costs["whole image, then crop"]
        print(table(f"Decode + preprocess, one thread: {side} px JPEGs -> {args.resolution} px, {len(samples)} images "
                    f"x {args.repeats} repeats", ["preprocessing", "ms per image (median)", "vs whole image"],
                    [[k, v, v / base] for k, v in costs.items()]))

        pools = {(mode, n): DecodePool(n, mode, options, pre) for n in counts for mode in ("threads", "processes")}
        for pool in pools.values():
            pool.warm_up()
            pool_rate(pool, samples[:16])
        rates: dict[tuple[str, int], list[float]] = {k: [] for k in pools}
        keys = list(pools)
        for i in range(args.repeats):
            k = i % len(keys)
            for key in keys[k:] + keys[:k]:
                rates[key].append(pool_rate(pools[key], samples))
        for pool in pools.values():
            pool.close()
        one = median(rates[("threads", counts[0])]) / counts[0]
        rows = []
        for n in counts:
            t, q = median(rates[("threads", n)]), median(rates[("processes", n)])
            rows.append([n, t, q, t / (n * one), q / (n * one), q / t])
        print(table(f"Decode pool scaling: {side} px JPEGs -> {args.resolution} px",
                    ["decoders", "threads img/s", "processes img/s", "threads / (N x 1 thread)",
                     "processes / (N x 1 thread)", "processes / threads"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
