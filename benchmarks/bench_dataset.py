"""The training reader: `LatentDataset` against MosaicML `StreamingDataset` and plain pyarrow.

    python -m benchmarks.bench_dataset [--shards 8 --per-shard 2048 --repeats 3 --no-s3]

The same latents (4x32x32 fp16, key, caption, metadata, micro-conditioning sizes) are written
once by this project's writer (Parquet) and once as MDS with `streaming.MDSWriter`, on local disk
and on a local S3-compatible server (moto, on 127.0.0.1, as the tests start it). Every reader
hands out the same item: the latent as a scaled float32 tensor, the sizes as int64 tensors, the
strings as they are. Each figure comes from a fresh process (imports done before the clock):

* samples/s per DataLoader worker: one worker, batches of 64, the whole epoch, timed from the
  first batch to the last (steady state);
* first sample: seconds from constructing the dataset to its first item (no workers);
* resume at 90%: seconds from constructing the dataset and loading a state 90% into the epoch to
  its first item, next to a whole epoch (no workers).

`plain pyarrow` reads the shard files in order, row group by row group: the simplest Parquet
reader (no shuffle, no equal ranks, no resume, no checks).

mosaicml-streaming is not in the dev extra: its requirements (torchvision, numpy<2.2) would
replace the installed CPU torch. To include it: `pip install --no-deps mosaicml-streaming==0.13.0
xxhash zstd brotli python-snappy catalogue` (transformers comes with the dev extra); without it
the StreamingDataset rows are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.common import median, table

SHAPE = (4, 32, 32)
BATCH = 64
BUCKET = "bench-dataset"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

# One measurement in a fresh process: argv[1] is JSON {"reader", "what", "source", ...}; prints
# one JSON line.
CHILD = r'''
import json, os, sys, time
args = json.loads(sys.argv[1])
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

SCALE, SHIFT = 0.18215, 0.0
SIZES = ("original_size", "crop_top_left", "target_size")


def item(latent, key, caption, meta, sizes):
    out = {"latent": (torch.from_numpy(np.asarray(latent, np.float32)) - SHIFT) * SCALE, "key": key,
           "caption": caption or "", "meta": meta}
    for col, v in zip(SIZES, sizes):
        out[col] = torch.as_tensor(np.asarray(v, np.int64))
    return out


def latentdataset():
    from pipeline.dataset import LatentDataset
    return LatentDataset(args["url"], storage_options=args.get("so"), rank=0, world_size=1)


def mosaic():
    from streaming import StreamingDataset

    class Latents(StreamingDataset):
        def __getitem__(self, i):
            s = super().__getitem__(i)
            return item(s["latent"], s["key"], s["caption"], s["meta"], [s[c] for c in SIZES])

    kw = {"local": args["mds_local"], "remote": args.get("mds_remote")}
    return Latents(**kw, shuffle=True, batch_size=args["batch"], shuffle_seed=0)


class PlainPyarrow(IterableDataset):
    def __init__(self):
        from pipeline import storage
        self.files = sorted(f for f in storage.list_files(args["url"] + "/shards", args.get("so")))

    def __iter__(self):
        import pyarrow.parquet as pq
        from pipeline import storage
        from pipeline.schema import from_storage
        info = get_worker_info()
        mine = self.files[info.id::info.num_workers] if info else self.files
        for name in mine:
            with storage.open_input(args["url"] + "/shards/" + name, args.get("so")) as f:
                pf = pq.ParquetFile(f)
                for g in range(pf.metadata.num_row_groups):
                    t = pf.read_row_group(g, columns=["key", "latent", "caption", "meta", *SIZES])
                    lat = from_storage(t.column("latent").combine_chunks().flatten().to_numpy(), "fp16")
                    lat = lat.reshape(t.num_rows, *args["shape"])
                    cols = [t.column(c).to_pylist() for c in ("key", "caption", "meta")]
                    sizes = [t.column(c).combine_chunks().flatten().to_numpy().reshape(-1, 2) for c in SIZES]
                    for i in range(t.num_rows):
                        yield item(lat[i], cols[0][i], cols[1][i], cols[2][i], [s[i] for s in sizes])


# Everything a reader imports is imported before any clock starts (pandas: pyarrow imports it on
# first use of some table builders).
import boto3  # noqa: E402,F401  (StreamingDataset's S3 client)
import pandas  # noqa: E402,F401
import pyarrow.parquet  # noqa: E402,F401
import s3fs  # noqa: E402,F401  (this project's and pyarrow's S3 access, through fsspec)
import pipeline.dataset  # noqa: E402,F401
if args["reader"] == "streaming":
    from benchmarks.bench_dataset import import_streaming
    import_streaming()
    import streaming  # noqa: F401
make = {"latentdataset": latentdataset, "streaming": mosaic, "pyarrow": PlainPyarrow}[args["reader"]]
out = {}
if args["what"] == "throughput":
    ds = make()
    loader = DataLoader(ds, batch_size=args["batch"], num_workers=1, persistent_workers=False)
    n, t_first = 0, None
    for batch in loader:
        if t_first is None:
            t_first, n = time.perf_counter(), 0
            continue
        n += len(batch["key"])
    out["per_worker"] = n / (time.perf_counter() - t_first)
elif args["what"] == "first":
    t0 = time.perf_counter()
    it = iter(make())
    next(it)
    out["first"] = time.perf_counter() - t0  # before `it` goes: closing it is not the first sample
elif args["what"] == "resume":
    ds = make()
    t0 = time.perf_counter()
    total = sum(1 for _ in ds)
    out["epoch"] = time.perf_counter() - t0
    at = int(total * 0.9)
    if args["reader"] == "latentdataset":
        state = dict(ds.state_dict(), position=at)
        t0 = time.perf_counter()
        ds = make()
        ds.load_state_dict(state)
    else:
        state = ds.state_dict(at, False)
        t0 = time.perf_counter()
        ds = make()
        ds.load_state_dict(state)
    it = iter(ds)
    next(it)
    out["resume_first"] = time.perf_counter() - t0
    out["rest"] = 1 + sum(1 for _ in it)
print(json.dumps(out))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_s3() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, **S3_KEYS))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            return proc, url
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the S3 server did not start") from None
            time.sleep(0.2)


def _rows(shard: int, n: int):
    import numpy as np

    from pipeline.rows import LatentRow

    rng = np.random.default_rng(shard)
    for i in range(n):
        yield LatentRow(key=f"{shard:05d}-{i:06d}", source=f"in/{shard:05d}.tar", index=i,
                        latent=rng.standard_normal(SHAPE).astype(np.float32), caption=f"a photo {i}",
                        meta=json.dumps({"i": i}), original_size=(512, 512), crop_top_left=(0, 0),
                        target_size=(256, 256))


def _write(folder: Path, shards: int, per_shard: int, so: dict | None, url: str) -> None:
    """The latents as `pipeline encode` leaves them: shards, commits, and a current index (the
    lease released naming it)."""
    from pipeline.index import refresh_index
    from pipeline.lease import Lease
    from pipeline.manifest import Manifest, check_or_write_manifest
    from pipeline.writer import ShardWriter

    manifest = Manifest(format="parquet", dtype="fp16", store="mean", flip=False, scaling_factor=0.18215,
                        latent_channels=SHAPE[0], shapes=[list(SHAPE)])
    lease = Lease(url, so, settle=0).acquire()
    check_or_write_manifest(url, manifest, so)
    for s in range(shards):
        with ShardWriter(url, f"{s:05d}", "parquet", "fp16", so, manifest) as w:
            w.write(_rows(s, per_shard))
            w.commit()
    lease.release(refresh_index(url, so).generation)


def _write_mds(folder: Path, shards: int, per_shard: int) -> str:
    import numpy as np

    out = folder / "mds"
    columns = {"key": "str", "latent": "ndarray:float16", "caption": "str", "meta": "str",
               "original_size": "ndarray:int32", "crop_top_left": "ndarray:int32", "target_size": "ndarray:int32"}
    import_streaming()
    from streaming import MDSWriter

    # Shards of about what the Parquet files hold per input shard, as a user would choose.
    with MDSWriter(out=str(out), columns=columns, size_limit=per_shard * (2 * int(np.prod(SHAPE)) + 200)) as w:
        for s in range(shards):
            for r in _rows(s, per_shard):
                w.write({"key": r.key, "latent": r.latent.astype(np.float16), "caption": r.caption, "meta": r.meta,
                         "original_size": np.asarray(r.original_size, np.int32),
                         "crop_top_left": np.asarray(r.crop_top_left, np.int32),
                         "target_size": np.asarray(r.target_size, np.int32)})
    return str(out)


def import_streaming() -> None:
    """Import `streaming`, standing in for torchvision where it cannot load: streaming imports it
    for its image datasets only, and CPU-only torch builds have no torchvision wheel on PyPI."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        import types

        # transformers (which streaming imports too) must look for torchvision before the stand-in
        # exists, and find none.
        import transformers.feature_extraction_utils  # noqa: F401
        import transformers.tokenization_utils_base  # noqa: F401

        tv = types.ModuleType("torchvision")
        tv.datasets = types.ModuleType("torchvision.datasets")
        tv.datasets.VisionDataset = object
        tv.transforms = types.ModuleType("torchvision.transforms")
        tv.transforms.functional = types.ModuleType("torchvision.transforms.functional")
        tv.transforms.functional.to_tensor = None
        for name, mod in (("torchvision", tv), ("torchvision.datasets", tv.datasets),
                          ("torchvision.transforms", tv.transforms),
                          ("torchvision.transforms.functional", tv.transforms.functional)):
            sys.modules[name] = mod


def _child(payload: dict, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(payload)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{payload['reader']} {payload['what']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--per-shard", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-s3", action="store_true", help="local disk only")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-dataset-"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    readers = ["latentdataset", "streaming", "pyarrow"]
    try:
        import_streaming()
        import streaming  # noqa: F401
    except ImportError as e:
        # Not in the dev extra: its requirements would replace the installed torch (see README).
        print(f"mosaicml-streaming cannot be imported ({e}); StreamingDataset is left out", file=sys.stderr)
        readers.remove("streaming")
    local = str(work / "latents")
    _write(work, args.shards, args.per_shard, None, local)
    mds = _write_mds(work, args.shards, args.per_shard) if "streaming" in readers else ""
    sources = {"local": ({"url": local, "mds_local": mds}, env)}
    server = None
    try:
        if not args.no_s3:
            import s3fs

            server, endpoint = _start_s3()
            env_s3 = dict(env, S3_ENDPOINT_URL=endpoint, **S3_KEYS)
            os.environ.update(S3_KEYS)
            so = {"key": "testing", "secret": "testing",
                  "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
            fs = s3fs.S3FileSystem(**so)
            fs.call_s3("create_bucket", Bucket=BUCKET)
            url = f"s3://{BUCKET}/latents"
            _write(work, args.shards, args.per_shard, so, url)
            if mds:
                fs.put(mds, f"{BUCKET}/mds", recursive=True)
            sources["s3"] = ({"url": url, "so": so, "mds_remote": f"s3://{BUCKET}/mds"}, env_s3)

        results: dict[tuple[str, str, str], list[dict]] = {}
        for rep in range(args.repeats):
            for source, (where, source_env) in sources.items():
                order = readers if rep % 2 == 0 else readers[::-1]
                for reader in order:
                    for what in ("throughput", "first") + (("resume",) if reader != "pyarrow" and source == "local"
                                                           else ()):
                        payload = {"reader": reader, "what": what, "batch": BATCH, "shape": list(SHAPE), **where}
                        if reader == "streaming":
                            # A fresh cache per run: the first sample includes the download.
                            payload["mds_local"] = (where["mds_local"] if "mds_remote" not in where
                                                    else str(work / f"cache-{source}-{what}-{rep}"))
                        results.setdefault((source, reader, what), []).append(_child(payload, source_env))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)

    n = args.shards * args.per_shard
    rows = []
    names = {"latentdataset": "LatentDataset", "streaming": "StreamingDataset (MDS)", "pyarrow": "plain pyarrow"}
    for source in sources:
        for reader in readers:
            tp = median(r["per_worker"] for r in results[(source, reader, "throughput")])
            first = median(r["first"] for r in results[(source, reader, "first")])
            res = results.get((source, reader, "resume"))
            resume = (f"{median(r['resume_first'] for r in res):.3f} s of a {median(r['epoch'] for r in res):.2f} s epoch"
                      if res else "-")
            rows.append([source, names[reader], f"{tp:,.0f}", f"{first:.3f}", resume])
    print(table(f"Training readers, {n} samples of {'x'.join(map(str, SHAPE))} fp16, medians of {args.repeats}",
                ["storage", "reader", "samples/s per worker", "first sample (s)", "resume at 90%: first sample"], rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"/".join(k): v for k, v in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
