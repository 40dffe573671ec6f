"""Ours against the Ray Data way of writing the same job, side by side on the same shards.

    python -m benchmarks.bench_raydata [--preset tiny --resolution 128 --shards 4 --per-shard 64]

The peer is written the way the Ray Data preprocessing examples for Stable Diffusion write it:
`ray.data.read_webdataset` -> a CPU `map_batches` that decodes, resizes and center-crops ->
an Encoder class in `map_batches` (an actor pool, with the GPUs) -> `write_parquet`. Both run the
same `latentae` model, dtype and batch size, on a local Ray instance with the same CPUs and GPUs.
Each variant runs `--repeats` times, alternating; it reports median images/s (wall clock of the
whole job after Ray is up) and the peak resident memory summed over the driver and all Ray
worker processes.
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
from pathlib import Path

from benchmarks.common import PeakRSS, cmdline_has, make_bench_shards, median, table

_PEER = r'''
import io, sys, time, json
import numpy as np
import ray
from PIL import Image

args = json.loads(sys.argv[1])
ray.init(num_cpus=args["cpus"], num_gpus=args["gpus"], include_dashboard=False, log_to_driver=False)
res = args["resolution"]

def preprocess(batch):
    out = []
    for data in batch["jpg"]:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = img.size
        s = res / min(w, h)
        img = img.resize((max(res, round(w * s)), max(res, round(h * s))), Image.LANCZOS)
        w, h = img.size
        left, top = (w - res) // 2, (h - res) // 2
        out.append(np.asarray(img.crop((left, top, left + res, top + res))))
    return {"key": batch["__key__"], "pixels": np.stack(out)}

class Encoder:
    def __init__(self):
        import torch
        from latentae import AutoencoderKL
        torch.set_num_threads(max(1, int(args["encoder_cpus"])))
        self.torch = torch
        self.device = "cuda" if args["gpus"] else "cpu"
        self.model = AutoencoderKL.from_preset(args["preset"]).prepare(device=self.device, dtype=args["dtype"])

    def __call__(self, batch):
        torch = self.torch
        x = torch.from_numpy(batch["pixels"]).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.inference_mode():
            mean = self.model.encode(x).mean.float().cpu().numpy()
        return {"key": batch["key"], "latent": list(mean.reshape(len(mean), -1).astype(np.float16))}

t0 = time.perf_counter()
ds = ray.data.read_webdataset(args["shards"], decoder=False)
ds = ds.map_batches(preprocess, batch_size=args["batch"], num_cpus=1)
ds = ds.map_batches(Encoder, batch_size=args["batch"], concurrency=1, num_cpus=args["encoder_cpus"], num_gpus=args["gpus"])
ds.write_parquet(args["out"])
seconds = time.perf_counter() - t0
rows = sum(1 for _ in ray.data.read_parquet(args["out"]).iter_rows())
print(json.dumps({"images": rows, "seconds": seconds}))
'''


def run_peer(args, shards: list[str], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    gpus = 1 if args.device.startswith("cuda") else 0
    payload = {"shards": shards, "out": str(out), "cpus": args.cpus, "gpus": gpus, "resolution": args.resolution,
               "preset": args.preset, "dtype": args.dtype, "batch": args.batch,
               # On a CPU-only machine the encoder needs CPUs of its own; leave one for decoding.
               "encoder_cpus": 1 if gpus else max(1, args.cpus - 1)}
    proc = subprocess.run([sys.executable, "-c", _PEER, json.dumps(payload)], check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_ours(args, shards: list[str], workdir: Path) -> dict:
    import yaml

    out = workdir / "ours-out"
    shutil.rmtree(out, ignore_errors=True)
    cfg = workdir / "ours.yaml"
    gpus = 1 if args.device.startswith("cuda") else 0
    cfg.write_text(yaml.safe_dump({
        "input": {"urls": shards},
        "output": {"path": str(out), "dtype": "fp16"},
        "model": {"preset": args.preset, "dtype": args.dtype},
        "preprocess": {"resolution": args.resolution},
        "ray": {"workers": 1, "num_gpus_per_worker": gpus, "num_cpus_per_worker": args.cpus, "batch_size": args.batch},
        "qa": {"samples": 8},
    }))
    subprocess.run([sys.executable, "-m", "pipeline", "encode", str(cfg)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    summary = json.loads((out / "summary.json").read_text())
    return {"images": summary["images"], "seconds": summary["seconds"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--per-shard", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-raydata-"))
    shards = make_bench_shards(workdir / "shards", args.shards, args.per_shard, int(args.resolution * 1.25))
    results: dict[str, list[dict]] = {"ours": [], "ray-data": []}
    everything = cmdline_has("ray::", "-m pipeline", "raylet", "gcs_server", "ray.data.read_webdataset")
    for _ in range(args.repeats):
        for name, fn in (("ours", lambda: run_ours(args, shards, workdir)),
                         ("ray-data", lambda: run_peer(args, shards, workdir / "peer-out"))):
            with PeakRSS({"all": everything}) as mem:
                t0 = time.perf_counter()
                r = fn()
                r["wall"] = time.perf_counter() - t0
            r["rate"] = r["images"] / r["seconds"]
            r["peak_rss_mb"] = mem.peak["all"] / 2**20
            results[name].append(r)

    med = {k: {m: median(r[m] for r in v) for m in ("rate", "peak_rss_mb", "images")} for k, v in results.items()}
    print(table(
        f"Ours vs the Ray Data way: {args.preset} @ {args.resolution}px, {args.dtype}, batch {args.batch}, "
        f"{args.device}, {args.cpus} CPUs, {args.shards * args.per_shard} images x {args.repeats} repeats",
        ["pipeline", "images", "images/s (median)", "peak RSS MiB (median)"],
        [[k, int(v["images"]), v["rate"], v["peak_rss_mb"]] for k, v in med.items()]))
    ratio = med["ours"]["rate"] / med["ray-data"]["rate"]
    mem_ratio = med["ours"]["peak_rss_mb"] / med["ray-data"]["peak_rss_mb"]
    print(table("Ratios", ["ratio", "value"], [["ours / ray-data images/s", ratio],
                                               ["ours / ray-data peak RSS", mem_ratio]]))
    if args.json:
        Path(args.json).write_text(json.dumps({"medians": med, "speed_ratio": ratio, "memory_ratio": mem_ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
