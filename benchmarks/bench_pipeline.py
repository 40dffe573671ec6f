"""Pipeline efficiency: end-to-end images/s against the two stage limits, measured side by side.

    python -m benchmarks.bench_pipeline [--preset tiny --resolution 128 --shards 4 --per-shard 64]

On the same shards, model and worker resources it measures, as medians over `--repeats` runs:

  decode   read + decode + preprocess + batching only, as the worker does it (`ShardBatcher` over
           its reader and its pool of `decode_threads` threads or processes), no encoder
  encode   the encoder alone on pre-decoded uint8 pixels, batch by batch (host->device included)
  worker   one `EncodeWorker` over all shards: read, decode, encode, write, commit
  job      what `python -m pipeline encode` runs (`run_encode`, one worker) in a process that has
           started a local Ray instance first; the clock starts after `ray.init`, so actor
           start and model load are included (use enough images that they do not dominate)

  decode, concurrent / encode, concurrent
           both stage-only loops running at the same time for `--concurrent-seconds`: what the
           machine gives the two stages together (equal to the alone figures on a GPU; less on
           a shared CPU machine, where other processes take cores)

and prints efficiency = worker / min(decode, encode), and against the concurrent figures. On a GPU the two stages use different
hardware, so the target is >= 0.90. On a CPU-only machine the encoder and the decoder share the
same cores unless they are split: `--encoder-threads E --decode-threads D` gives the encoder E
torch threads and the decode pool D threads in every row (E + D = the CPUs: "GPU-like", the two
stages on disjoint hardware, the case the 0.90 target is about). Without a split the reachable
rate is the serial combination 1 / (1/decode + 1/encode); that ratio is printed too. The job row
always uses the worker's own thread rule (torch threads = decode threads = CPUs).

`--decode-mode threads,processes` measures the decode and worker rows once per decode mode, side
by side in the same run (`ray.decode_mode`); `--shards-at-once N` sets `ray.max_in_flight_per_worker`.

Each row also shows the CPU time of the benchmark's own process per image (all its threads; not
its decode processes). For the decode rows in processes mode that is what the worker's process
itself spends per image (reading the tar, feeding the pipes, batching): on a GPU it runs next
to the encoder's launching thread and must stay small.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.common import (
    ENCODE_JOB,
    add_job_arguments,
    make_bench_shards,
    median,
    run_script,
    table,
    write_job_config,
)


def _tri(value: str):
    return value if value == "auto" else value == "true"


def build_config(args, shards: list[str], out: str, decode_mode: str = "auto"):
    from pipeline.config import config_from_dict

    return config_from_dict({
        "input": {"urls": shards},
        "output": {"path": out, "dtype": args.out_dtype, "format": "parquet"},
        "model": {"preset": args.preset, "dtype": args.dtype, "channels_last": _tri(args.channels_last),
                  "compile": args.compile, "cuda_graphs": not args.no_cuda_graphs},
        "preprocess": {"resolution": args.resolution},
        "ray": {"workers": 1, "num_gpus_per_worker": 1 if args.device.startswith("cuda") else 0,
                "num_cpus_per_worker": args.cpus, "batch_size": args.batch, "decode_threads": args.decode_threads,
                "decode_mode": decode_mode, "max_in_flight_per_worker": args.shards_at_once},
        "qa": {"samples": 8},
    })


def decode_shard(worker, url: str, stop=None) -> int:
    """Read + decode + preprocess one shard as the worker does (a `ShardBatcher` over its reader
    and its decode pool of threads or processes), without the encoder and without a ledger; the
    count of prepared images, up to `stop`."""
    from pipeline.batcher import ShardBatcher
    from pipeline.reader import ShardReader

    cfg = worker.config
    reader = ShardReader(url, cfg.input.storage_options, image_exts=cfg.input.image_exts,
                         caption_key=cfg.input.caption_key)
    batches = iter(ShardBatcher(reader, url, worker.decode_pool, worker.batch_size, on_error=lambda row: None))
    n = 0
    for batch in batches:
        if stop is not None and stop.is_set():
            batches.close()
            break
        n += len(batch)
    return n


def decode_only(worker, shards: list[str]) -> int:
    """Read + decode + preprocess every sample, as the worker does, without the encoder."""
    return sum(decode_shard(worker, url) for url in shards)


def encode_only(worker, batches: list[np.ndarray]) -> int:
    import torch

    n = 0
    for pixels in batches:
        worker.device_encoder.launch(pixels, flip=False).get()
        n += len(pixels)
    if worker.device.type == "cuda":
        torch.cuda.synchronize()
    return n


def concurrent_limits(worker, shards: list[str], batches: list[np.ndarray], seconds: float) -> tuple[float, float]:
    """Decode-only and encode-only running at the same time for `seconds`; (decode, encode) images/s.

    On a GPU the two stages use different hardware and this equals the stage limits measured
    alone. On a shared or small CPU machine it is what the hardware actually gives two stages
    that run at once (other processes, hyper-threads and memory bandwidth included), so
    worker / min(these) separates the pipeline's own losses from the machine's.
    """
    import threading

    stop = threading.Event()
    counts = {"decode": 0, "encode": 0}

    def decode_loop() -> None:
        while not stop.is_set():
            for url in shards:
                counts["decode"] += decode_shard(worker, url, stop)
                if stop.is_set():
                    return

    def encode_loop() -> None:
        while not stop.is_set():
            for pixels in batches:
                if stop.is_set():
                    return
                worker.device_encoder.launch(pixels, flip=False).get()
                if not stop.is_set():
                    counts["encode"] += len(pixels)

    threads = [threading.Thread(target=decode_loop), threading.Thread(target=encode_loop)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return counts["decode"] / seconds, counts["encode"] / seconds


def worker_e2e(worker, shards: list[str], out_root: str, stage_time: dict[str, float]) -> int:
    """Images of one `EncodeWorker` run over `shards`; adds its shard seconds and their split into
    stages to `stage_time`."""
    from pipeline.storage import filesystem

    fs, path = filesystem(out_root)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    # As an actor runs them: `worker.concurrency` shards at a time (2 on CUDA, 1 on CPU by default).
    with ThreadPoolExecutor(worker.concurrency) as pool:
        results = list(pool.map(lambda url: worker.process_shard(url, Path(url).stem, num_shards=len(shards)), shards))
    for r in results:
        stage_time["shards"] = stage_time.get("shards", 0.0) + r.seconds
        for k, v in r.stage_seconds.items():
            stage_time[k] = stage_time.get(k, 0.0) + v
    return sum(r.rows for r in results)


def job_e2e(args, shards: list[str], workdir: Path, decode_mode: str = "auto") -> float:
    """images/s of the encode job (one worker, local Ray), timed from after `ray.init`."""
    out = workdir / "job-out"
    shutil.rmtree(out, ignore_errors=True)
    gpus = 1 if args.device.startswith("cuda") else 0
    cfg = write_job_config(
        workdir / "bench.yaml", shards, out, preset=args.preset, resolution=args.resolution, batch=args.batch,
        cpus=args.cpus, gpus=gpus, output={"dtype": args.out_dtype},
        model={"dtype": args.dtype, "channels_last": _tri(args.channels_last)},
        ray={"decode_threads": args.decode_threads, "decode_mode": decode_mode,
             "max_in_flight_per_worker": args.shards_at_once},
    )
    r = run_script(ENCODE_JOB, {"config": str(cfg), "cpus": args.cpus, "gpus": gpus})
    return r["images"] / r["seconds"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(p, shards=4, per_shard=64)
    p.add_argument("--source-side", type=int, default=None, help="shorter side of the JPEGs (default 1.25x resolution)")
    p.add_argument("--out-dtype", default="fp16", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--channels-last", default="auto", choices=["auto", "true", "false"],
                   help="model.channels_last (auto: on for CPU, off for CUDA)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-cuda-graphs", action="store_true", help="launch the encoder eagerly on CUDA")
    p.add_argument("--cpus", type=float, default=float(os.cpu_count() or 1))
    p.add_argument("--decode-threads", type=int, default=None, help="decoders per worker (default: the CPUs)")
    p.add_argument("--decode-mode", default="auto",
                   help="ray.decode_mode: auto, threads or processes; a comma list (threads,processes) "
                        "measures each side by side")
    p.add_argument("--shards-at-once", type=int, default=None,
                   help="ray.max_in_flight_per_worker (default: 2 on CUDA, 1 on CPU)")
    p.add_argument("--encoder-threads", type=int, default=None,
                   help="torch CPU threads of the encoder (default: the CPUs; 2 on CUDA, as a Ray actor sets)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concurrent-seconds", type=float, default=8.0,
                   help="length of the window in which both stages run at once")
    p.add_argument("--no-job", action="store_true", help="skip the Ray job run (e.g. where Ray is not installed)")
    args = p.parse_args(argv)

    import torch

    from pipeline.worker import EncodeWorker, torch_threads

    encoder_threads = args.encoder_threads or torch_threads(torch.device(args.device).type, args.cpus)
    torch.set_num_threads(encoder_threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-pipeline-"))
    source = args.source_side or int(args.resolution * 1.25)
    shards = make_bench_shards(workdir / "shards", args.shards, args.per_shard, source)
    modes = [m.strip() for m in args.decode_mode.split(",") if m.strip()]
    workers: dict[str, EncodeWorker] = {}
    for mode in modes:
        config = build_config(args, shards, str(workdir / "worker-out"), decode_mode=mode)
        first = next(iter(workers.values()), None)
        workers[mode] = EncodeWorker(config, device=args.device, model=first.model if first else None)
    worker = next(iter(workers.values()))

    # Pre-decoded batches for the encoder-only limit: the same pixels the pipeline encodes.
    from pipeline.decodepool import prepare
    from pipeline.reader import Sample, ShardReader

    pixels = []
    for s in ShardReader(shards[0], {}, image_exts=worker.config.input.image_exts):
        if isinstance(s, Sample):
            pixels.append(prepare(s.image, s.key, worker.decode_options, worker.preprocessor).pixels)
    pixels = np.stack(pixels)
    total = args.shards * args.per_shard
    batches = [pixels[np.arange(i, i + args.batch) % len(pixels)] for i in range(0, total, args.batch)]

    # One set of decode/worker rows per decode mode; with several modes the rows say which.
    def label(name: str, mode: str) -> str:
        return name if len(workers) == 1 else f"{name} [{mode}]"

    # Per decode mode: seconds of the worker rows' shards and their split into stages.
    stage_time: dict[str, dict[str, float]] = {mode: {} for mode in workers}
    variants = [("encode", lambda: encode_only(worker, batches))]
    for mode, w in workers.items():
        variants += [(label("decode", mode), lambda w=w: decode_only(w, shards)),
                     (label("worker", mode),
                      lambda w=w, mode=mode: worker_e2e(w, shards, str(workdir / "worker-out"), stage_time[mode]))]
    rates: dict[str, list[float]] = {name: [] for name, _ in variants}
    # CPU time of this process (all its threads, not its decode processes) per image.
    cpu_ms: dict[str, list[float]] = {name: [] for name, _ in variants}
    for mode in workers:
        rates[label("decode, concurrent", mode)] = []
        rates[label("encode, concurrent", mode)] = []
    if not args.no_job:
        rates["job"] = []
    encode_only(worker, batches[:2])  # warm-up (cuDNN autotune, compile)
    for i in range(args.repeats):
        # Interleaved (and the order rotated) so that machine noise hits every variant alike.
        k = i % len(variants)
        for name, fn in variants[k:] + variants[:k]:
            t0, c0 = time.perf_counter(), time.process_time()
            n = fn()
            rates[name].append(n / (time.perf_counter() - t0))
            cpu_ms[name].append((time.process_time() - c0) / max(n, 1) * 1e3)
        for mode, w in workers.items():
            both = concurrent_limits(w, shards, batches, args.concurrent_seconds)
            rates[label("decode, concurrent", mode)].append(both[0])
            rates[label("encode, concurrent", mode)].append(both[1])
        if not args.no_job:
            rates["job"].append(job_e2e(args, shards, workdir, modes[0]))
    for w in workers.values():
        w.close()

    med = {k: median(v) for k, v in rates.items()}
    rows = [[k, med[k], f"{min(v):.1f}-{max(v):.1f}", f"{median(cpu_ms[k]):.3f}" if cpu_ms.get(k) else "-"]
            for k, v in rates.items()]
    print(table(
        f"Pipeline efficiency: {args.preset} @ {args.resolution}px, {args.dtype}, batch {args.batch}, "
        f"{args.device}, {args.cpus:g} CPUs (encoder threads {encoder_threads}, "
        + ", ".join(f"decode {w.decode_mode} x{w.decode_threads}" for w in workers.values())
        + f", CUDA graphs {worker.device_encoder.cuda_graphs}, shards at a time {worker.concurrency}), "
        f"JPEG side {source}, {total} images x {args.repeats} repeats",
        ["stage", "images/s (median)", "range", "worker process CPU ms/image"], rows))
    ratios = {}
    for mode in workers:
        dec, wrk = med[label("decode", mode)], med[label("worker", mode)]
        limit = min(dec, med["encode"])
        concurrent_limit = min(med[label("decode, concurrent", mode)], med[label("encode, concurrent", mode)])
        serial = 1.0 / (1.0 / dec + 1.0 / med["encode"])
        ratios[label("worker / min(decode, encode)", mode)] = wrk / limit
        ratios[label("worker / min(decode, encode), both running at once", mode)] = wrk / concurrent_limit
        ratios[label("worker / serial(decode, encode)", mode)] = wrk / serial
        if "job" in med and mode == modes[0]:
            ratios["job / min(decode, encode)"] = med["job"] / limit
            ratios["job / serial(decode, encode)"] = med["job"] / serial
    if len(workers) > 1:
        base = med[label("worker", modes[0])]
        for mode in modes[1:]:
            ratios[f"worker [{mode}] / worker [{modes[0]}]"] = med[label("worker", mode)] / base
    print(table("Ratios", ["ratio", "value"], [[k, v] for k, v in ratios.items()]))
    from pipeline.worker import STAGES

    split = []
    for mode, acc in stage_time.items():
        total = acc.get("shards", 0.0)
        if total > 0:
            shares = [acc.get(k, 0.0) / total for k in STAGES]
            split.append([mode, *shares, max(0.0, 1.0 - sum(shares))])
    if split:
        print(table("Where the worker rows spent their shard time (summed over repeats)",
                    ["decode mode", *STAGES, "other"], split))
    if args.json:
        Path(args.json).write_text(json.dumps({"medians": med, "ratios": ratios, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
