"""The demo with input and output on object storage: ``python -m pipeline.demo_s3`` (``make demo-s3``).

Starts a local S3-compatible server (moto's server mode) on 127.0.0.1, writes the sample shards into a
bucket, runs ``python -m pipeline run configs/demo.yaml`` with input and output on that bucket, copies
the QA report back to a local folder (the server keeps objects in memory only), and stops the server.
Credentials reach the job through the environment, the way a real deployment passes them; the config
overrides carry only the endpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from . import make_shards, storage

BUCKET = "demo"
# moto accepts any credentials; these exist only for the lifetime of the local server.
DEMO_ENV = {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo-secret", "AWS_DEFAULT_REGION": "us-east-1"}


class DemoError(RuntimeError):
    """The demo could not run (the message says which step)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server(port: int = 0, timeout: float = 60.0) -> Iterator[str]:
    """Run a moto S3 server on 127.0.0.1 for the duration of the block; yields its endpoint URL."""
    port = port or _free_port()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **DEMO_ENV},
        )
    except OSError as exc:
        raise DemoError(f"cannot start the S3 server: {exc}") from exc
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise DemoError(
                    f"the S3 server on port {port} exited with code {proc.returncode}; "
                    "is moto installed (`pip install 'moto[server]'`) and the port free?"
                )
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise DemoError(f"the S3 server did not answer on {endpoint} within {timeout:.0f}s") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.demo_s3", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo.yaml", help="job config (default: %(default)s)")
    p.add_argument("--shards", type=int, default=4, help="sample shards to make (default: %(default)s)")
    p.add_argument("--per-shard", type=int, default=64, help="samples per shard (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=0, help="S3 server port (default: a free one)")
    p.add_argument("--report-dir", default="demo-output-s3",
                   help="local folder that receives the QA report and summaries (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="more config overrides for the job")
    return p


def _copy_back(output: str, so: dict, dest: Path) -> list[Path]:
    """Copy the small files of the output (manifest, summary, QA report) to `dest`."""
    copied = []
    for rel in ("manifest.json", "summary.json", "qa/report.html", "qa/metrics.json"):
        url = storage.join(output, rel)
        if not storage.exists(url, so):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(url, so))
        copied.append(target)
    return copied


def main(argv: Sequence[str] | None = None) -> int:
    """Run the S3 demo; returns the job's exit code (2 when the demo itself could not run)."""
    args = _parser().parse_args(argv)
    os.environ.update(DEMO_ENV)  # s3fs in this process and the job's Ray workers read these
    try:
        with s3_server(args.port) as endpoint:
            so = {"client_kwargs": {"endpoint_url": endpoint}}
            fs, _ = storage.filesystem(f"s3://{BUCKET}", so)
            fs.mkdir(BUCKET)
            shards, output = f"s3://{BUCKET}/shards", f"s3://{BUCKET}/output"
            print(f"S3 server on {endpoint}; writing sample shards to {shards}", flush=True)
            rc = make_shards.main([
                "--sample", "--out", shards, "--shards", str(args.shards), "--per-shard", str(args.per_shard),
                "--seed", str(args.seed), "--storage-options", json.dumps(so),
            ])
            if rc != 0:
                return rc
            so_yaml = json.dumps(so)  # JSON is YAML: the override parser reads it as a mapping
            cmd = [
                sys.executable, "-m", "pipeline", "run", args.config,
                f"input.urls={shards}/*.tar", f"input.storage_options={so_yaml}",
                f"output.path={output}", f"output.storage_options={so_yaml}", *args.overrides,
            ]
            print("running: " + " ".join(cmd[1:]), flush=True)
            rc = subprocess.call(cmd, env=os.environ.copy())
            listing = storage.list_files(storage.join(output, "shards"), so)
            print(f"{output}/shards: {len(listing)} objects, {sum(listing.values()) / 1e6:.1f} MB", flush=True)
            copied = _copy_back(output, so, Path(args.report_dir))
            for path in copied:
                print(f"copied {path}")
            report = Path(args.report_dir) / "qa" / "report.html"
            if report.exists():
                print(f"QA report: {report}")
            return rc
    except DemoError as exc:
        print(f"demo-s3: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
