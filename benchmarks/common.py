"""Shared pieces of the benchmarks: bench shards, medians, a peak-memory sampler, tables."""

from __future__ import annotations

import io
import json
import statistics
import tarfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

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


class PeakRSS:
    """Samples resident memory of process groups in the background and keeps each group's peak.

    `groups` maps a name to a predicate over a psutil.Process (e.g. "the driver", "Ray workers");
    a group's figure is the largest single process of the group (`per_process=True`) or the
    group's sum at one instant.
    """

    def __init__(self, groups: dict[str, Callable], per_process: bool = False, interval: float = 0.1):
        self.groups = groups
        self.per_process = per_process
        self.interval = interval
        self.peak = dict.fromkeys(groups, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
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
            self._stop.wait(self.interval)


class TreePeak:
    """Peak memory of a process and all its descendants (a job's driver, raylet, GCS, workers).

    Sums PSS (proportional set size) where the kernel reports it: pages shared between processes
    (Ray's object store, the torch libraries) count once in total instead of once per process,
    which a sum of RSS would do. Falls back to RSS where PSS cannot be read.
    """

    # Reading PSS of a process that maps torch takes milliseconds; sampled every 0.1 s over a
    # job's dozen processes that took a tenth of a 2-core machine away from the job measured.
    def __init__(self, pid: int, interval: float = 0.5):
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.measure = "pss"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _one(self, proc) -> int:
        import psutil

        try:
            if self.measure == "pss":
                return proc.memory_full_info().pss
            return proc.memory_info().rss
        except psutil.AccessDenied:
            self.measure = "rss"
            return proc.memory_info().rss

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for proc in procs:
                try:
                    total += self._one(proc)
                except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                    continue
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)


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
