"""Ours against the Ray Data way of writing the same job, side by side on the same shards.

    python -m benchmarks.bench_raydata [--preset tiny --resolution 128 --shards 4 --per-shard 128]

The peer is written the way the Ray Data preprocessing examples for Stable Diffusion write it:
`ray.data.read_webdataset` -> a CPU `map_batches` that decodes, resizes and center-crops -> an
Encoder class in `map_batches` (an actor pool, with the GPUs) -> `write_parquet`. The read tasks
hand over the JPEG bytes (`decoder=None`): with the default decoder they hand over whole decoded
images, and Ray Data cannot batch decoded images of different shapes (see the comment in the
script). The preprocessing tasks may run on all `--cpus` (`concurrency`), which also keeps Ray
Data from fusing them into the Encoder's actor, so they decode beside the encoder as they do on
a GPU node.

Both sides are measured the same way:

* each runs in its own Python process that first starts a local Ray instance with the same
  `--cpus` and GPUs; the clock starts after `ray.init` returns and stops when the output is
  written, so both figures include starting the encode actor and loading the model (ours:
  `pipeline.driver.run_encode`, exactly what `python -m pipeline encode` runs after Ray is up);
* both encoders use the same model, dtype, memory format, batch size and torch thread count (on a
  CPU-only machine: `--cpus` threads, and the peer's Encoder reserves no logical CPU so that its
  preprocessing may use them all, as our decoders do; with a GPU it reserves one, as the peers
  write it);
* peak memory is the largest sum of PSS over the job's whole process tree (driver, raylet,
  GCS, workers, object store pages counted once), sampled every 0.5 s.

Each variant runs `--repeats` times, interleaved and alternating which goes first; the table
shows medians and the ratio of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks import common

_PEER = r'''
import io, sys, time, json
import numpy as np
import ray
from PIL import Image

args = json.loads(sys.argv[1])
ray.init(num_cpus=args["cpus"], num_gpus=args["gpus"], include_dashboard=False, log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False
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
        torch.set_num_threads(max(1, int(args["torch_threads"])))
        self.torch = torch
        self.device = "cuda" if args["gpus"] else "cpu"
        self.model = AutoencoderKL.from_preset(args["preset"]).prepare(
            device=self.device, dtype=args["dtype"], channels_last=args["channels_last"])

    def __call__(self, batch):
        torch = self.torch
        x = torch.from_numpy(batch["pixels"]).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.inference_mode():
            mean = self.model.encode(x).mean.float().cpu().numpy()
        return {"key": batch["key"], "latent": list(mean.reshape(len(mean), -1).astype(np.float16))}

t0 = time.perf_counter()
# decoder=None: the JPEG bytes go to the preprocessing tasks. With read_webdataset's default
# decoder the read tasks hand over whole decoded images, and Ray Data fails to batch images of
# different shapes that share a dimension (ValueError: could not broadcast ... in
# _concat_same_type), which a web-scale shard always holds.
ds = ray.data.read_webdataset(args["shards"], decoder=None)
ds = ds.map_batches(preprocess, batch_size=args["batch"], num_cpus=1, concurrency=args["cpus"])
ds = ds.map_batches(Encoder, batch_size=args["batch"], concurrency=1, num_cpus=args["encoder_cpus"], num_gpus=args["gpus"])
ds.write_parquet(args["out"])
seconds = time.perf_counter() - t0
rows = sum(1 for _ in ray.data.read_parquet(args["out"]).iter_rows())
print(json.dumps({"images": rows, "seconds": seconds}))
'''


def _device_type(args) -> str:
    return "cuda" if args.device.startswith("cuda") else "cpu"


def _torch_threads(args) -> int:
    # The rule of EncodeWorker(set_threads=True), for the peer's encoder too.
    from pipeline.worker import torch_threads

    return torch_threads(_device_type(args), args.cpus)


def _channels_last(args) -> bool:
    # Both sides use the same memory format: the pipeline's own rule for "auto".
    from pipeline.config import ModelConfig

    value = "auto" if args.channels_last == "auto" else args.channels_last == "true"
    return ModelConfig(channels_last=value).channels_last_on(_device_type(args))


def run_peer(args, shards: list[str], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    gpus = 1 if args.device.startswith("cuda") else 0
    payload = {"shards": shards, "out": str(out), "cpus": args.cpus, "gpus": gpus, "resolution": args.resolution,
               "preset": args.preset, "dtype": args.dtype, "batch": args.batch,
               # With a GPU the Encoder actor asks for one CPU, as the peers write it, and the
               # preprocessing tasks get the rest. Without one its torch threads already span all
               # CPUs (as ours do), so it reserves none: the preprocessing tasks may then run on
               # every CPU too, as our decoders do, and the OS shares the cores on both sides.
               "encoder_cpus": 1 if gpus else 0, "torch_threads": _torch_threads(args), "channels_last": _channels_last(args)}
    return common.run_script(_PEER, payload, peak_memory=True)


def run_ours(args, shards: list[str], workdir: Path) -> dict:
    out = workdir / "ours-out"
    shutil.rmtree(out, ignore_errors=True)
    gpus = 1 if args.device.startswith("cuda") else 0
    cfg = common.write_job_config(
        workdir / "ours.yaml", shards, out, preset=args.preset, resolution=args.resolution, batch=args.batch,
        cpus=args.cpus, gpus=gpus, output={"dtype": "fp16"},
        model={"dtype": args.dtype, "channels_last": _channels_last(args)},
    )
    payload = {"config": str(cfg), "cpus": args.cpus, "gpus": gpus}
    return common.run_script(common.ENCODE_JOB, payload, peak_memory=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_job_arguments(p, shards=4, per_shard=128)
    p.add_argument("--source-side", type=int, default=0,
                   help="shorter side of the JPEGs in px (default: 1.25 x --resolution); web-scale shards "
                        "hold images several times larger than the training resolution")
    p.add_argument("--channels-last", default="auto", choices=["auto", "true", "false"],
                   help="memory format of both encoders (auto: on for CPU, off for CUDA)")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-raydata-"))
    source_side = args.source_side or int(args.resolution * 1.25)
    shards = common.make_bench_shards(workdir / "shards", args.shards, args.per_shard, source_side)
    results: dict[str, list[dict]] = {"ours": [], "ray-data": []}
    variants = [("ours", lambda: run_ours(args, shards, workdir)),
                ("ray-data", lambda: run_peer(args, shards, workdir / "peer-out"))]
    for i in range(args.repeats):
        # Interleaved, alternating who goes first, so drifting machine load hits both alike.
        for name, fn in variants if i % 2 == 0 else variants[::-1]:
            r = fn()
            r["rate"] = r["images"] / r["seconds"]
            results[name].append(r)
            print(f"  {name}: {r['images']} images in {r['seconds']:.1f}s = {r['rate']:.2f} images/s, "
                  f"peak {r['peak_mb']:.0f} MiB", file=sys.stderr, flush=True)

    med = {k: {m: common.median(r[m] for r in v) for m in ("rate", "peak_mb", "images")} for k, v in results.items()}
    measure = results["ours"][0]["memory_measure"].upper()
    print(common.table(
        f"Ours vs the Ray Data way: {args.preset} @ {args.resolution}px, {args.dtype}, batch {args.batch}, "
        f"{args.device}, {args.cpus} CPUs, {args.shards * args.per_shard} JPEGs of {source_side}px x {args.repeats} repeats",
        ["pipeline", "images", "images/s (median)", "range", f"peak {measure} MiB (median)"],
        [[k, int(v["images"]), v["rate"], f"{min(r['rate'] for r in results[k]):.1f}-{max(r['rate'] for r in results[k]):.1f}",
          v["peak_mb"]] for k, v in med.items()]))
    ratio = med["ours"]["rate"] / med["ray-data"]["rate"]
    mem_ratio = med["ours"]["peak_mb"] / med["ray-data"]["peak_mb"]
    print(common.table("Ratios", ["ratio", "value"], [["ours / ray-data images/s", ratio],
                                               [f"ours / ray-data peak {measure}", mem_ratio]]))
    if args.json:
        Path(args.json).write_text(json.dumps({"medians": med, "runs": results, "speed_ratio": ratio,
                                               "memory_ratio": mem_ratio, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
