"""Memory: peak RSS of the driver and of one encode worker for N and 4N shards (should stay flat).

    python -m benchmarks.bench_memory [--shards 2 --per-shard 64]

Runs `python -m pipeline encode` twice on a local Ray instance, the second time over four times
as many shards, and samples the resident memory of the driver process and of the encode actor.
Neither may grow with the dataset: the driver holds only the plan and the commits, the worker
streams its shard and holds at most a few batches. With `--device cuda` it also prints the peak
device memory of the encoder per batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import (
    PeakRSS,
    add_job_arguments,
    cmdline_has,
    make_bench_shards,
    table,
    write_job_config,
)


def run_job(args, shards: list[str], workdir: Path) -> dict:
    out = workdir / "out"
    shutil.rmtree(out, ignore_errors=True)
    cfg = write_job_config(workdir / "job.yaml", shards, out, preset=args.preset, resolution=args.resolution,
                           batch=args.batch, cpus=args.cpus, gpus=0)
    with PeakRSS({"driver": cmdline_has("-m pipeline encode"), "worker": cmdline_has("EncodeActor")},
                 per_process=True) as mem:
        subprocess.run([sys.executable, "-m", "pipeline", "encode", str(cfg)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    return {"images": summary["images"], "driver_mb": mem.peak["driver"] / 2**20, "worker_mb": mem.peak["worker"] / 2**20}


def device_memory(args) -> list[list]:
    import torch

    from latentae import AutoencoderKL

    model = AutoencoderKL.from_preset(args.preset).prepare(device="cuda", dtype=args.dtype)
    rows = []
    for batch in (1, 8, 32, 64):
        torch.cuda.reset_peak_memory_stats()
        x = torch.randn(batch, 3, args.resolution, args.resolution, device="cuda")
        with torch.inference_mode():
            model.encode(x)
        torch.cuda.synchronize()
        rows.append([batch, torch.cuda.max_memory_allocated() / 2**20])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(p, shards=2, per_shard=64, dtype="bf16")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)

    if args.device.startswith("cuda"):
        print(table(f"Peak device memory of the encoder: {args.preset} @ {args.resolution}px {args.dtype}",
                    ["batch", "MiB"], device_memory(args)))
        return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-memory-"))
    all_shards = make_bench_shards(workdir / "shards", 4 * args.shards, args.per_shard, int(args.resolution * 1.25))
    small = run_job(args, all_shards[: args.shards], workdir)
    large = run_job(args, all_shards, workdir)
    print(table(f"Peak RSS for N and 4N shards ({args.per_shard} images each, {args.preset} @ {args.resolution}px)",
                ["shards", "images", "driver MiB", "worker MiB"],
                [[args.shards, small["images"], small["driver_mb"], small["worker_mb"]],
                 [4 * args.shards, large["images"], large["driver_mb"], large["worker_mb"]]]))
    ratios = {"driver 4N / N": large["driver_mb"] / small["driver_mb"], "worker 4N / N": large["worker_mb"] / small["worker_mb"]}
    print(table("Ratios (flat = about 1.0)", ["ratio", "value"], [[k, v] for k, v in ratios.items()]))
    if args.json:
        Path(args.json).write_text(json.dumps({"small": small, "large": large, "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
