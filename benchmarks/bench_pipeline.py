"""Pipeline efficiency: end-to-end images/s against the two stage limits, measured side by side.

    python -m benchmarks.bench_pipeline [--preset tiny --resolution 128 --shards 4 --per-shard 64]

On the same shards, model and worker resources it measures, as medians over `--repeats` runs:

  decode   read + decode + preprocess only (the worker's reader, decoder and preprocessor in a
           thread pool of `decode_threads`), no encoder
  encode   the encoder alone on pre-decoded uint8 pixels, batch by batch (host->device included)
  worker   one `EncodeWorker` over all shards: read, decode, encode, write, commit
  job      `python -m pipeline encode` on a local Ray instance with one worker (Ray start-up and
           actor start excluded: the driver's own images/s over the shards)

and prints efficiency = worker / min(decode, encode). On a GPU the two stages use different
hardware, so the target is >= 0.90. On a CPU-only machine the encoder and the decoder share the
same cores, so the reachable rate is the serial combination 1 / (1/decode + 1/encode); that ratio
is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.common import make_bench_shards, median, table


def build_config(args, shards: list[str], out: str):
    from pipeline.config import config_from_dict

    return config_from_dict({
        "input": {"urls": shards},
        "output": {"path": out, "dtype": args.out_dtype, "format": "parquet"},
        "model": {"preset": args.preset, "dtype": args.dtype, "channels_last": args.channels_last,
                  "compile": args.compile},
        "preprocess": {"resolution": args.resolution},
        "ray": {"workers": 1, "num_gpus_per_worker": 1 if args.device.startswith("cuda") else 0,
                "num_cpus_per_worker": args.cpus, "batch_size": args.batch, "decode_threads": args.decode_threads},
        "qa": {"samples": 8},
    })


def decode_only(worker, shards: list[str]) -> int:
    """Read + decode + preprocess every sample with the worker's own pieces and thread count."""
    from pipeline.reader import Sample, ShardReader

    cfg = worker.config
    n = 0
    with ThreadPoolExecutor(worker.decode_threads) as pool:
        for url in shards:
            reader = ShardReader(url, cfg.input.storage_options, image_exts=cfg.input.image_exts,
                                 caption_key=cfg.input.caption_key)
            futures = [pool.submit(worker._prepare, s) for s in reader if isinstance(s, Sample)]
            n += sum(1 for f in futures if not hasattr(f.result(), "stage"))
    return n


def encode_only(worker, batches: list[np.ndarray]) -> int:
    import torch

    n = 0
    for pixels in batches:
        worker._posterior(pixels)
        n += len(pixels)
    if worker.device.type == "cuda":
        torch.cuda.synchronize()
    return n


def worker_e2e(worker, shards: list[str], out_root: str) -> int:
    from pipeline.storage import filesystem

    fs, path = filesystem(out_root)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    n = 0
    for url in shards:
        n += worker.process_shard(url, Path(url).stem, num_shards=len(shards)).rows
    return n


def job_e2e(args, shards: list[str], workdir: Path) -> float:
    """images/s reported by the driver of `python -m pipeline encode` (one worker, local Ray)."""
    cfg = workdir / "bench.yaml"
    out = workdir / "job-out"
    shutil.rmtree(out, ignore_errors=True)
    import yaml

    cfg.write_text(yaml.safe_dump({
        "input": {"urls": shards},
        "output": {"path": str(out), "dtype": args.out_dtype},
        "model": {"preset": args.preset, "dtype": args.dtype, "channels_last": args.channels_last},
        "preprocess": {"resolution": args.resolution},
        "ray": {"workers": 1, "num_gpus_per_worker": 1 if args.device.startswith("cuda") else 0,
                "num_cpus_per_worker": args.cpus, "batch_size": args.batch, "decode_threads": args.decode_threads},
        "qa": {"samples": 8},
    }))
    env = dict(os.environ, RAY_DEDUP_LOGS="0")
    subprocess.run([sys.executable, "-m", "pipeline", "encode", str(cfg)], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    return float(summary["images_per_second"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--source-side", type=int, default=None, help="shorter side of the JPEGs (default 1.25x resolution)")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--per-shard", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--out-dtype", default="fp16", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cpus", type=float, default=float(os.cpu_count() or 1))
    p.add_argument("--decode-threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-job", action="store_true", help="skip the Ray job run (e.g. where Ray is not installed)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)

    import torch

    from pipeline.worker import EncodeWorker

    if args.device == "cpu":
        torch.set_num_threads(max(1, int(args.cpus)))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-pipeline-"))
    source = args.source_side or int(args.resolution * 1.25)
    shards = make_bench_shards(workdir / "shards", args.shards, args.per_shard, source)
    config = build_config(args, shards, str(workdir / "worker-out"))
    worker = EncodeWorker(config, device=args.device)

    # Pre-decoded batches for the encoder-only limit: the same pixels the pipeline encodes.
    from pipeline.reader import Sample, ShardReader

    pixels = []
    for s in ShardReader(shards[0], {}, image_exts=config.input.image_exts):
        if isinstance(s, Sample):
            pixels.append(worker._prepare(s).pixels)
    pixels = np.stack(pixels)
    total = args.shards * args.per_shard
    batches = [pixels[np.arange(i, i + args.batch) % len(pixels)] for i in range(0, total, args.batch)]

    rates: dict[str, list[float]] = {"decode": [], "encode": [], "worker": []}
    encode_only(worker, batches[:2])  # warm-up (cuDNN autotune, compile)
    for _ in range(args.repeats):
        # Interleaved so that machine noise hits every variant alike.
        for name, fn in (("decode", lambda: decode_only(worker, shards)),
                         ("encode", lambda: encode_only(worker, batches)),
                         ("worker", lambda: worker_e2e(worker, shards, str(workdir / "worker-out")))):
            t0 = time.perf_counter()
            n = fn()
            rates[name].append(n / (time.perf_counter() - t0))
    worker.close()
    if not args.no_job:
        rates["job"] = [job_e2e(args, shards, workdir) for _ in range(args.repeats)]

    med = {k: median(v) for k, v in rates.items()}
    limit = min(med["decode"], med["encode"])
    serial = 1.0 / (1.0 / med["decode"] + 1.0 / med["encode"])
    rows = [[k, med[k], f"{min(v):.1f}-{max(v):.1f}"] for k, v in rates.items()]
    print(table(
        f"Pipeline efficiency: {args.preset} @ {args.resolution}px, {args.dtype}, batch {args.batch}, "
        f"{args.device}, {args.cpus:g} CPUs, {total} images x {args.repeats} repeats",
        ["stage", "images/s (median)", "range"], rows))
    ratios = {
        "worker / min(decode, encode)": med["worker"] / limit,
        "worker / serial(decode, encode)": med["worker"] / serial,
    }
    if "job" in med:
        ratios["job / min(decode, encode)"] = med["job"] / limit
        ratios["job / serial(decode, encode)"] = med["job"] / serial
    print(table("Ratios", ["ratio", "value"], [[k, v] for k, v in ratios.items()]))
    if args.json:
        Path(args.json).write_text(json.dumps({"medians": med, "ratios": ratios, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
