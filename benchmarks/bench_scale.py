"""Metadata cost at scale: resume, LatentDataset and inspect over synthetic committed outputs.

    python -m benchmarks.bench_scale [--sizes 1000,10000,100000] [--where local,s3] [--ranks 1000]

Each output is synthetic and complete as far as metadata goes: a manifest, N commit records (8
channels of statistics, one row group, a source URL), the consolidated index and a released lease,
which is what a finished run leaves. No latent bytes are written: every operation measured reads
metadata only. "s3" is a moto S3 server in this process, behind a WSGI wrapper that counts the
requests it serves (the objects are placed in its memory directly, to build 10^5 in seconds).

Each operation runs in a child process of its own, and reports its wall time and the growth of
its peak RSS; the S3 requests are counted at the server:

  noop      `python -m pipeline encode CONFIG` with every shard committed: the whole command (its
            imports included: peak MB is the whole process here); inputs are checked to exist
  resume    `make_plan` over the N input URLs: the index is current (what a rerun does)
  stale     the same while a job holds the lease: the index is completed from a LIST of _commits/
  scan      the same without an index (outputs written before it: one GET per commit; N <= 10^4)
  dataset   `LatentDataset(rank=0, world_size=--ranks)` construction, per rank
  inspect   `inspect_output` (counts, rows, pooled statistics)

The growth of each column is fitted as a * N^b and b is printed (1 = linear; 0 = constant).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import table

# "stale" runs last: it leaves a live lease behind, which makes every later reader list.
OPS = ("noop", "resume", "scan", "dataset", "inspect", "stale")
CHANNELS = 8  # the tiny autoencoder's latent channels
#: The per-commit scan (one GET each) is measured up to these sizes only: beyond, it is minutes.
SCAN_LIMIT = {"local": 10_000, "s3": 1_000}


# ---------------------------------------------------------------------------------------------
# synthetic outputs


def _urls(in_dir: str, n: int) -> str:
    return f"{in_dir}/{{{0:06d}..{n - 1:06d}}}.tar"


def _commit_blobs(in_dir: str, n: int) -> dict[str, bytes]:
    """{shard name: commit JSON} for n shards of 1000 rows each."""
    from pipeline.commit import CommitRecord
    from pipeline.layout import shard_name

    rng = np.random.default_rng(0)
    out = {}
    for i in range(n):
        url = f"{in_dir}/{i:06d}.tar"
        name = shard_name(url)
        stats = {"count": [16384] * CHANNELS, "sum": rng.standard_normal(CHANNELS).tolist(),
                 "sumsq": (16384 + rng.random(CHANNELS)).tolist(), "min": (-4 - rng.random(CHANNELS)).tolist(),
                 "max": (4 + rng.random(CHANNELS)).tolist(), "nan": [0] * CHANNELS, "inf": [0] * CHANNELS}
        record = CommitRecord(
            name=name, format="parquet", dtype="fp16", rows=1000, errors=0,
            files={f"shards/{name}.parquet": {"size": 8_500_000 + i, "sha256": hashlib.sha256(name.encode()).hexdigest()}},
            stats=stats, shapes={f"{CHANNELS}x32x32": 1000}, row_groups=[1000], source=url, format_version=1,
        )
        out[name] = record.to_json().encode()
    return out


def _job_config(root: str, inputs: str, so: dict | None) -> dict:
    """The job whose finished output is synthesized (the no-op rerun runs it again)."""
    options = {"storage_options": so} if so else {}
    return {"input": {"urls": inputs, **options}, "output": {"path": root, "dtype": "fp16", **options},
            "model": {"preset": "tiny"}, "preprocess": {"resolution": 256}, "qa": {"samples": 0}}


def _manifest_blob(root: str, inputs: str, so: dict | None) -> bytes:
    """The manifest that job writes (the tiny model, 256 px: latents [8, 32, 32])."""
    from latentae import AutoencoderKL
    from pipeline.config import config_from_dict
    from pipeline.manifest import build_manifest

    manifest = build_manifest(config_from_dict(_job_config(root, inputs, so)), AutoencoderKL.from_preset("tiny"))
    assert manifest.shapes == [[CHANNELS, 32, 32]], manifest.shapes
    return manifest.to_json().encode()


def _finish_like_a_run(
    root: str, so: dict | None, blobs: dict[str, bytes], listing: dict[str, tuple[int, str]] | None = None
) -> None:
    """Write the index (from the records at hand and one LIST, or the `listing` of the commits,
    `{name: (size, ETag)}`, where the caller knows it) and release the lease naming it."""
    from pipeline.commit import CommitRecord
    from pipeline.index import ShardIndex, list_commits, write_index
    from pipeline.lease import Lease

    lease = Lease(root, so, settle=0).acquire()
    records = {n: CommitRecord.from_json(b, n) for n, b in sorted(blobs.items())}
    index = ShardIndex.from_records(records, listing if listing is not None else list_commits(root, so))
    lease.release(write_index(root, index, so))


def build_local(folder: Path, n: int) -> tuple[str, str]:
    """A finished local output of n shards: (OUTPUT, input URL pattern)."""
    root = folder / f"out-{n}"
    (root / "_commits").mkdir(parents=True)
    (folder / "in").mkdir(exist_ok=True)
    for i in range(n):  # the inputs exist (the job checks that before planning), empty: never read
        (folder / "in" / f"{i:06d}.tar").touch()
    blobs = _commit_blobs(str(folder / "in"), n)
    for name, blob in blobs.items():
        (root / "_commits" / f"{name}.json").write_bytes(blob)
    inputs = _urls(str(folder / "in"), n)
    (root / "manifest.json").write_bytes(_manifest_blob(str(root), inputs, None))
    _finish_like_a_run(str(root), None, blobs)
    return str(root), inputs


class CountingS3:
    """A moto S3 server in this process that counts the requests it serves."""

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        app = DomainDispatcherApplication(create_backend_app)
        self.requests = 0
        self._lock = threading.Lock()

        def counted(environ, start_response):
            with self._lock:
                self.requests += 1
            return app(environ, start_response)

        self._httpd = make_server("127.0.0.1", 0, counted, threaded=True, request_handler=MotoRequestHandler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_port}"
        self.options = {"key": "testing", "secret": "testing",
                        "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}

    def build(self, n: int) -> tuple[str, str]:
        """A finished output of n shards on this server: (OUTPUT, input URL pattern)."""
        from moto.s3.models import s3_backends

        backend = s3_backends["123456789012"]["global"]
        bucket = f"scale-{n}"
        backend.create_bucket(bucket, "us-east-1")
        backend.create_bucket(f"inputs-{n}", "us-east-1")
        for i in range(n):
            backend.put_object(f"inputs-{n}", f"{i:06d}.tar", b"")
        blobs = _commit_blobs(f"s3://inputs-{n}", n)
        listing = {}  # what a LIST of _commits/ returns, without moto's LIST (minutes at 10^5 keys)
        for name, blob in blobs.items():
            listing[name] = (len(blob), backend.put_object(bucket, f"out/_commits/{name}.json", blob).etag)
        root, inputs = f"s3://{bucket}/out", _urls(f"s3://inputs-{n}", n)
        backend.put_object(bucket, "out/manifest.json", _manifest_blob(root, inputs, self.options))
        _finish_like_a_run(root, self.options, blobs, listing)
        return root, inputs


# ---------------------------------------------------------------------------------------------
# one operation, in a child process


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the forking parent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def child(op: str, root: str, inputs: str, so: dict | None, ranks: int, workdir: str) -> dict:
    if op == "noop":
        from pipeline.plan import expand_urls  # noqa: F401  (imports made before the clock starts)

        path = Path(workdir) / "noop.json"
        path.write_text(json.dumps(_job_config(root, inputs, so)))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipeline", "encode", str(path)], capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        if proc.returncode != 0:
            raise SystemExit(f"the no-op rerun exited {proc.returncode}:\n{proc.stderr[-2000:]}")
        return {"seconds": seconds, "rss": peak}
    from pipeline.dataset import LatentDataset
    from pipeline.index import load_index
    from pipeline.inspect import inspect_output
    from pipeline.lease import Lease
    from pipeline.plan import make_plan

    if op == "stale":
        Lease(root, so, settle=0).acquire(force=True)  # a job is running: the index may be behind
    base = _rss()
    t0 = time.perf_counter()
    if op in ("resume", "stale"):
        plan = make_plan(inputs, root, so, so)
        assert not plan.todo, f"{len(plan.todo)} shards planned"
    elif op == "scan":
        assert len(load_index(root, so, use_index=False)) > 0
    elif op == "dataset":
        LatentDataset(root, storage_options=so, rank=0, world_size=ranks)
    elif op == "inspect":
        inspect_output(root, so)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rss": max(0, _peak_rss() - base)}


def run_child(op: str, root: str, inputs: str, so: dict | None, ranks: int, workdir: str) -> dict:
    args = [sys.executable, "-m", "benchmarks.bench_scale", "--child", op, "--root", root, "--inputs", inputs,
            "--ranks", str(ranks), "--workdir", workdir, "--so", json.dumps(so or {})]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------


def fit_exponent(sizes: list[int], values: list[float]) -> float | None:
    """b of the least-squares fit values = a * sizes^b (on logs); None below two usable points."""
    pts = [(math.log(n), math.log(v)) for n, v in zip(sizes, values) if v and v > 0]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--where", default="local,s3")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--ranks", type=int, default=1000, help="world size of the LatentDataset measured (rank 0)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    p.add_argument("--so", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        result = child(args.child, args.root, args.inputs, json.loads(args.so) or None, args.ranks, args.workdir)
        print(json.dumps(result))
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    ops = [o for o in args.ops.split(",") if o]
    s3 = CountingS3() if "s3" in args.where else None
    rows = []
    series: dict[tuple[str, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for where in args.where.split(","):
            for n in sizes:
                t0 = time.perf_counter()
                if where == "local":
                    (root, inputs), so = build_local(Path(tmp), n), None
                else:
                    (root, inputs), so = s3.build(n), s3.options
                print(f"built {where} output of {n:,} shards in {time.perf_counter() - t0:.1f}s", flush=True)
                for op in ops:
                    if op == "scan" and n > SCAN_LIMIT[where]:
                        continue
                    before = s3.requests if s3 and where == "s3" else 0
                    got = run_child(op, root, inputs, so, args.ranks, tmp)
                    requests = (s3.requests - before) if s3 and where == "s3" else None
                    if "error" in got:
                        rows.append([where, f"{n:,}", op, "error", "", "", got["error"][:80]])
                        continue
                    mb = got["rss"] / 2**20
                    rows.append([where, f"{n:,}", op, f"{got['seconds']:.2f}", "" if requests is None else requests,
                                 f"{mb:.0f}", ""])
                    for what, value in (("s", got["seconds"]), ("requests", requests), ("MB", mb)):
                        if value is not None:
                            series.setdefault((where, op, what), []).append(value)
                    series.setdefault((where, op, "n"), []).append(n)
                    print(f"  {op:<8} {got['seconds']:.2f}s {'' if requests is None else requests} req {mb:.0f} MB",
                          flush=True)
    print(table("Metadata cost by shard count", ["where", "shards", "operation", "seconds", "S3 requests",
                                                  "peak MB", "note"], rows))
    print("growth (fitted exponent b of a * N^b; 0 = constant, 1 = linear):")
    for (where, op, what), values in sorted(series.items()):
        if what == "n":
            continue
        b = fit_exponent(series[(where, op, "n")], values)
        if b is not None:
            print(f"  {where:<6} {op:<8} {what:<9} b = {b:+.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
