"""Shared pieces of the benchmarks: bench shards, common arguments, the encode job in a process of its
own, medians, peak-memory samplers, tables."""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np


def photo_pool() -> list[np.ndarray]:
    """The RGB photos bundled with scikit-image (real JPEG-like content, not noise)."""
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "immunohistochemistry",
             "hubble_deep_field", "retina", "skin", "cat"]
    out = []
    for name in names:
        fn = getattr(data, name, None)
        if fn is None:
            continue
        try:
            arr = fn()
        except Exception:  # a photo missing from this scikit-image build
            continue
        if arr.ndim == 3 and arr.shape[2] >= 3:
            out.append(np.ascontiguousarray(arr[..., :3]).astype(np.uint8))
    return out


def make_bench_shards(folder: Path, shards: int, per_shard: int, source_side: int, seed: int = 0) -> list[str]:
    """Write `shards` WebDataset tars of JPEG photos whose shorter side is `source_side` px.

    Crops of the bundled photos at several aspect ratios, resized so that decoding costs what a
    web-scraped image of that size costs; quality 90 like typical LAION-style shards.
    """
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = photo_pool()
    aspects = (1.0, 4 / 3, 3 / 4, 3 / 2, 16 / 9)
    urls = []
    for s in range(shards):
        path = folder / f"{s:05d}.tar"
        urls.append(str(path))
        if path.exists():
            continue
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                photo = photos[int(rng.integers(len(photos)))]
                aspect = aspects[int(rng.integers(len(aspects)))]
                h, w = (source_side, round(source_side * aspect)) if aspect >= 1 else (round(source_side / aspect), source_side)
                img = Image.fromarray(photo).resize((w, h), Image.BICUBIC)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                key = f"{s:05d}{i:05d}"
                for ext, payload in (("jpg", buf.getvalue()), ("txt", b"a photo"), ("json", json.dumps({"i": i}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return urls


def add_job_arguments(p: argparse.ArgumentParser, *, shards: int, per_shard: int, dtype: str = "fp32") -> None:
    """The arguments every end-to-end benchmark takes: model, shards, batch, device, outputs."""
    p.add_argument("--preset", default="tiny")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--shards", type=int, default=shards)
    p.add_argument("--per-shard", type=int, default=per_shard)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", default=dtype, choices=["fp32", "fp16", "bf16"], help="compute dtype of the encoder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="also write the figures here")


def write_job_config(path: Path, shards: list[str], out: Path, *, preset: str, resolution: int, batch: int, cpus: float,
                     gpus: int, output: dict | None = None, model: dict | None = None, ray: dict | None = None) -> Path:
    """A job config of one encode worker over `shards`, written as YAML to `path`; `output`,
    `model` and `ray` add keys to those sections."""
    import yaml

    path.write_text(yaml.safe_dump({
        "input": {"urls": shards},
        "output": {"path": str(out), **(output or {})},
        "model": {"preset": preset, **(model or {})},
        "preprocess": {"resolution": resolution},
        "ray": {"workers": 1, "num_gpus_per_worker": gpus, "num_cpus_per_worker": cpus, "batch_size": batch,
                **(ray or {})},
        "qa": {"samples": 8},
    }))
    return path


#: What `python -m pipeline encode CONFIG` runs once Ray is up (`run_encode`, or `run_outputs` for
#: a config with `outputs:`), in a process that first starts a local Ray instance; argv[1] is JSON
#: {"config", "cpus", "gpus"}. Prints {"images", "seconds"} (images summed over the outputs),
#: timed from after `ray.init`, so actor start and model load count.
ENCODE_JOB = r'''
import json, sys, time
import ray

args = json.loads(sys.argv[1])
ray.init(num_cpus=args["cpus"], num_gpus=args["gpus"], include_dashboard=False, log_to_driver=False)
from pipeline.config import load_config
from pipeline.driver import run_encode
from pipeline.multi_driver import run_outputs

config = load_config(args["config"])
t0 = time.perf_counter()
summaries = run_outputs(config) if config.outputs else [run_encode(config)]
print(json.dumps({"images": sum(s.images for s in summaries), "seconds": time.perf_counter() - t0}))
'''


def run_script(script: str, payload: dict, *, peak_memory: bool = False) -> dict[str, Any]:
    """Run a job script in its own Python process (`payload` as JSON in argv[1]); returns the JSON
    of its last output line. With `peak_memory`, also `peak_mb` and `memory_measure` of the
    process tree (see `TreePeak`)."""
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(payload)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, RAY_DEDUP_LOGS="0"))
    if peak_memory:
        with TreePeak(proc.pid) as mem:
            out, err = proc.communicate()
    else:
        out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark job failed (exit {proc.returncode}):\n{err[-4000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    if peak_memory:
        result["peak_mb"] = mem.peak / 2**20
        result["memory_measure"] = mem.measure
    return result


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def timed(fn: Callable[[], int], repeats: int, warmup: int = 1) -> list[float]:
    """Run `fn` (which returns an item count) and return items/s per timed repeat."""
    for _ in range(warmup):
        fn()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t0))
    return rates


class _Sampler:
    """Runs `_sample` every `interval` seconds in a background thread while the `with` block runs."""

    def __init__(self, interval: float):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set() and self._sample():
            self._stop.wait(self.interval)

    def _sample(self) -> bool:
        """Take one sample; False ends the sampling."""
        raise NotImplementedError


class PeakRSS(_Sampler):
    """Samples resident memory of process groups in the background and keeps each group's peak.

    `groups` maps a name to a predicate over a psutil.Process (e.g. "the driver", "Ray workers");
    a group's figure is the largest single process of the group (`per_process=True`) or the
    group's sum at one instant.
    """

    def __init__(self, groups: dict[str, Callable], per_process: bool = False, interval: float = 0.1):
        super().__init__(interval)
        self.groups = groups
        self.per_process = per_process
        self.peak = dict.fromkeys(groups, 0)

    def _sample(self) -> bool:
        import psutil

        current = dict.fromkeys(self.groups, 0)
        for proc in psutil.process_iter(["cmdline"]):
            try:
                rss = proc.memory_info().rss
                for name, pred in self.groups.items():
                    if pred(proc):
                        current[name] = max(current[name], rss) if self.per_process else current[name] + rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        for name, value in current.items():
            self.peak[name] = max(self.peak[name], value)
        return True


class TreePeak(_Sampler):
    """Peak memory of a process and all its descendants (a job's driver, raylet, GCS, workers).

    Sums PSS (proportional set size) where the kernel reports it: pages shared between processes
    (Ray's object store, the torch libraries) count once in total instead of once per process,
    which a sum of RSS would do. Falls back to RSS where PSS cannot be read.
    """

    # Reading PSS of a process that maps torch takes milliseconds; sampled every 0.1 s over a
    # job's dozen processes that took a tenth of a 2-core machine away from the job measured.
    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(interval)
        self.pid = pid
        self.peak = 0
        self.measure = "pss"
        self._root = None

    def _one(self, proc) -> int:
        import psutil

        try:
            if self.measure == "pss":
                return proc.memory_full_info().pss
            return proc.memory_info().rss
        except psutil.AccessDenied:
            self.measure = "rss"
            return proc.memory_info().rss

    def _sample(self) -> bool:
        import psutil

        try:
            if self._root is None:
                self._root = psutil.Process(self.pid)
            procs = [self._root, *self._root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return False
        total = 0
        for proc in procs:
            try:
                total += self._one(proc)
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
        self.peak = max(self.peak, total)
        return True


def cmdline_has(*needles: str) -> Callable:
    def pred(proc) -> bool:
        cmd = " ".join(proc.info.get("cmdline") or [])
        return any(n in cmd for n in needles)

    return pred


def table(title: str, header: list[str], rows: list[list]) -> str:
    cells = [header] + [[c if isinstance(c, str) else f"{c:,.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [f"\n## {title}\n", "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in cells[1:]:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    return "\n".join(lines)
