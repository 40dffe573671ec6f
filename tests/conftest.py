"""Shared fixtures: a real S3-compatible server and a local Ray instance, both on 127.0.0.1."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (loopback unless a test needs the host's own address)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def test_credentials():
    """AWS credentials of the test S3 servers in this process's environment, restored afterwards."""
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class S3Server:
    """A moto S3 server process on loopback, reached through s3fs like any S3 endpoint."""

    endpoint_url: str
    process: subprocess.Popen
    buckets: set[str] = field(default_factory=set)

    @property
    def storage_options(self) -> dict:
        return {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": "us-east-1"},
        }

    def bucket(self, name: str) -> str:
        """Create bucket `name` (once) and return its s3:// URL."""
        if name not in self.buckets:
            import s3fs

            fs = s3fs.S3FileSystem(**self.storage_options)
            # Not fs.mkdir: s3fs sends LocationConstraint=us-east-1, which S3 (and moto) reject.
            fs.call_s3("create_bucket", Bucket=name)
            fs.invalidate_cache()
            self.buckets.add(name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server():
    port = free_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the S3 test server did not start") from None
            time.sleep(0.2)
    server = S3Server(endpoint_url=url, process=proc)
    try:
        with test_credentials():
            yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass
class CountingS3Server(S3Server):
    """An in-process moto S3 server that records every request it serves, to count real requests."""

    requests: list[tuple[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        self.requests.clear()

    def count(self, method: str | None = None, contains: str = "") -> int:
        """Requests served since `reset`, of `method` (any when None) whose path holds `contains`."""
        return sum(1 for m, path in list(self.requests) if (method is None or m == method) and contains in path)


@pytest.fixture(scope="session")
def counting_s3():
    """A moto S3 server in this process behind a WSGI wrapper that counts every request."""
    import threading

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    served: list[tuple[str, str]] = []

    def counted(environ, start_response):
        if not environ.get("PATH_INFO", "").startswith("/moto-api"):
            served.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", "") + "?" + environ.get("QUERY_STRING", "")))
        return app(environ, start_response)

    httpd = make_server("127.0.0.1", 0, counted, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        with test_credentials():
            yield CountingS3Server(endpoint_url=f"http://127.0.0.1:{httpd.server_port}", process=None, requests=served)
    finally:
        httpd.shutdown()
        thread.join()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        )
    yield ray
    ray.shutdown()


def sample_photos(size: int = 96, count: int = 6):
    """Real photos from scikit-image's bundled data, resized small for fast tests (RGB uint8)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
             "motorcycle_left", "colorwheel"]
    photos = []
    for name in names:
        try:
            arr = getattr(data, name)()
        except Exception:
            continue
        if isinstance(arr, tuple):
            arr = arr[0]
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        img = Image.fromarray(arr[..., :3].astype("uint8"))
        photos.append((name, img))
        if len(photos) == count:
            break
    return photos


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """Write a WebDataset tar: samples are (key, {ext: bytes})."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
    return path


def write_photo_shards(folder: Path, shards: int, per_shard: int, *, photos: int, size: tuple[int, int],
                       step: int = 8) -> list[str]:
    """`shards` tars `00000.tar`... of `per_shard` JPEGs each (keys SSSIII), the bundled photos in
    turn, sample i resized to (width + step * i, height); returns every key written."""
    images = [p.convert("RGB") for _, p in sample_photos(count=photos)]
    keys = []
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                buf = io.BytesIO()
                images[(s + i) % len(images)].resize((size[0] + step * i, size[1])).save(buf, "JPEG")
                key = f"{s:03d}{i:03d}"
                keys.append(key)
                info = tarfile.TarInfo(f"{key}.jpg")
                info.size = len(buf.getvalue())
                tar.addfile(info, io.BytesIO(buf.getvalue()))
    return keys


@pytest.fixture
def sample_shards(tmp_path):
    """Three small WebDataset shards of real JPEG photos with captions and JSON metadata."""
    import json

    photos = sample_photos()
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    paths = []
    for s in range(3):
        samples = []
        for i in range(4):
            name, img = photos[(s * 4 + i) % len(photos)]
            w, h = img.size
            crop = img.resize((64 + 16 * (i % 3), 64 + 16 * ((i + 1) % 3)))
            buf = io.BytesIO()
            crop.save(buf, format="JPEG", quality=90)
            key = f"{s:03d}{i:04d}"
            samples.append((key, {"jpg": buf.getvalue(), "txt": f"a photo of {name}".encode(),
                                  "json": json.dumps({"name": name, "orig": [h, w]}).encode()}))
        paths.append(write_shard(shard_dir / f"{s:05d}.tar", samples))
    return paths


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A diffusers folder holding fixed weights of the `tiny` architecture.

    Runs that must agree bit for bit across processes (worker counts, resume) load these, so they
    do not depend on whether the shipped tiny weights are present (random init differs per process).
    """
    from latentae import AutoencoderKL

    folder = tmp_path_factory.mktemp("tiny-weights")
    AutoencoderKL.from_preset("tiny").save_pretrained(folder)
    return str(folder)
