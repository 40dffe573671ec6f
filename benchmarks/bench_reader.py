"""Reading tar shards: the worker's `ShardReader` and its tar parser against Python's `tarfile`.

    python -m benchmarks.bench_reader [--shards 4 --per-shard 512 --source-side 80 --repeats 7]

The reader runs in the worker's process and holds the GIL for every member it parses, next to
the encoder's launching thread; this is its cost per member and per sample (three members: jpg,
txt, json), from local files already in the page cache, medians of interleaved repeats:

* `tarfile` = `tarfile.open(mode="r|*")` over the same files, reading every regular member (what
  the reader used before `pipeline.tarstream`);
* `tarstream` = `pipeline.tarstream.open_members`, reading every regular member;
* `ShardReader` = the worker's reader: members grouped into samples, captions and metadata
  decoded, bad samples checked.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks.common import make_bench_shards, median, table


def _tarfile(paths: list[str]) -> int:
    n = 0
    for path in paths:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                if info.isfile():
                    tar.extractfile(info).read()
                    n += 1
    return n


def _tarstream(paths: list[str]) -> int:
    from pipeline.tarstream import open_members

    n = 0
    for path in paths:
        with open(path, "rb") as f:
            for _, _, read in open_members(f):
                read()
                n += 1
    return n


def _shard_reader(paths: list[str]) -> int:
    from pipeline.reader import ShardReader

    return sum(1 for path in paths for _ in ShardReader(path, {}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--per-shard", type=int, default=512)
    p.add_argument("--source-side", type=int, default=80, help="shorter side of the JPEGs in px")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-reader-"))
    paths = make_bench_shards(workdir / "shards", args.shards, args.per_shard, args.source_side)
    samples = args.shards * args.per_shard
    variants = [("tarfile", _tarfile, "member"), ("tarstream", _tarstream, "member"),
                ("ShardReader", _shard_reader, "sample")]
    for _, fn, _ in variants:
        fn(paths)  # warm the page cache and imports
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    counts: dict[str, int] = {}
    for i in range(args.repeats):
        for name, fn, _ in variants if i % 2 == 0 else variants[::-1]:
            t0 = time.perf_counter()
            counts[name] = fn(paths)
            times[name].append(time.perf_counter() - t0)
    rows = []
    for name, _, unit in variants:
        per = [t / counts[name] * 1e6 for t in times[name]]
        rows.append([name, f"{counts[name]} {unit}s", median(per), f"{min(per):.1f}-{max(per):.1f}",
                     median(t / samples * 1e6 for t in times[name])])
    print(table(f"Reading {args.shards} shards of {args.per_shard} samples (3 members each), {args.repeats} repeats",
                ["reader", "items", "us per item (median)", "range", "us per sample (median)"], rows))
    ratio = median(times["tarstream"]) / median(times["tarfile"])
    print(table("Ratios", ["ratio", "value"], [["tarstream / tarfile time", ratio]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
