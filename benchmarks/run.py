"""`make bench`: every CPU benchmark, one after another, each printing its own table of medians and ratios.

    python -m benchmarks.run [--quick]

The GPU figures come from `benchmarks/gpu.sh` on a GPU machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

BENCHES = [
    ["benchmarks.bench_encoder", "--preset", "sd", "--resolution", "128", "--batch", "2", "--repeats", "10"],
    ["benchmarks.bench_pipeline", "--preset", "tiny", "--resolution", "128", "--shards", "4", "--per-shard", "256"],
    # GPU-like: encoder and decoder on disjoint cores, rates of the same order (large JPEGs).
    ["benchmarks.bench_pipeline", "--preset", "tiny", "--resolution", "64", "--source-side", "2048", "--shards", "2",
     "--per-shard", "128", "--encoder-threads", "1", "--decode-threads", "1", "--cpus", "2", "--no-job",
     "--decode-mode", "threads,processes", "--repeats", "5"],
    ["benchmarks.bench_reader"],
    ["benchmarks.bench_decode", "--resolution", "256", "--source-sides", "320,640", "--decoders", "1,2"],
    ["benchmarks.bench_raydata", "--preset", "tiny", "--resolution", "128", "--shards", "4", "--per-shard", "128",
     "--repeats", "5"],
    ["benchmarks.bench_memory", "--preset", "tiny", "--resolution", "128", "--shards", "2", "--per-shard", "64"],
    ["benchmarks.bench_outputs", "--case", "decode"],
    ["benchmarks.bench_outputs", "--case", "encoder"],
    ["benchmarks.bench_dataset", "--shards", "4", "--per-shard", "2048"],
    ["benchmarks.bench_scale", "--sizes", "1000,10000", "--where", "local,s3"],
    ["benchmarks.bench_text"],
]
#: Benchmarks without a --repeats option (each measures one run, or repeats on its own terms).
NO_REPEATS = {"benchmarks.bench_memory", "benchmarks.bench_scale"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="one repeat each (a smoke run, not a figure)")
    args = p.parse_args(argv)
    failed = 0
    for bench in BENCHES:
        cmd = [sys.executable, "-m", *bench] + (["--repeats", "1"] if args.quick and bench[0] not in NO_REPEATS else [])
        print("\n$ python -m " + " ".join(cmd[2:]), flush=True)
        failed += subprocess.run(cmd).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
