"""make-shards: folders of images and the bundled sample photos -> WebDataset tar shards."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentae.sample_photos import HELDOUT_PHOTOS, SAMPLE_PHOTOS
from pipeline import make_shards

needs_photos = pytest.mark.skipif(importlib.util.find_spec("skimage") is None,
                                  reason="the sample photos ship with scikit-image")


def read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of a tar, checking that members come grouped by key (streaming readers need it)."""
    out: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            if not order or order[-1] != key:
                assert key not in out, f"members of {key} are not contiguous in {path}"
                order.append(key)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


@needs_photos
def test_sample_shards(tmp_path):
    out = tmp_path / "shards"
    assert make_shards.main(["--sample", "--out", str(out), "--shards", "2", "--per-shard", "10", "--seed", "3"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar"]
    keys, photos = [], set()
    for shard in sorted(out.iterdir()):
        samples = read_shard(shard)
        assert len(samples) == 10
        for key, members in samples.items():
            assert set(members) == {"jpg", "txt", "json"}
            meta = json.loads(members["json"])
            img = Image.open(io.BytesIO(members["jpg"]))
            assert img.mode == "RGB"
            assert min(img.size) >= 128 and max(img.size) <= 384
            assert (meta["width"], meta["height"]) == img.size
            assert members["txt"].decode() == SAMPLE_PHOTOS[meta["photo"]]
            assert meta["split"] == ("heldout" if meta["photo"] in HELDOUT_PHOTOS else "train")
            keys.append(key)
            photos.add(meta["photo"])
    assert len(set(keys)) == 20
    # Every photo comes up once before any repeats.
    assert len(photos) == min(20, len(SAMPLE_PHOTOS))


@needs_photos
def test_sample_shards_are_deterministic(tmp_path):
    args = ["--sample", "--shards", "1", "--per-shard", "4"]
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert make_shards.main([*args, "--out", str(tmp_path / name), "--seed", seed]) == 0
    a, b, c = ((tmp_path / n / "00000.tar").read_bytes() for n in "abc")
    assert a == b
    assert a != c


@needs_photos
def test_sample_heldout_split(tmp_path):
    out = tmp_path / "heldout"
    assert make_shards.main(["--sample", "--split", "heldout", "--out", str(out), "--shards", "1",
                             "--per-shard", "6"]) == 0
    metas = [json.loads(m["json"]) for m in read_shard(out / "00000.tar").values()]
    assert {m["photo"] for m in metas} == set(HELDOUT_PHOTOS)


def _image(path: Path, size: tuple[int, int], fmt: str, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path.read_bytes()


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "photos"
    files = {
        "a_red-car.jpg": _image(root / "a_red-car.jpg", (160, 140), "JPEG", 0),
        "b.png": _image(root / "b.png", (200, 130), "PNG", 1),
        "nested/c.webp": _image(root / "nested" / "c.webp", (130, 190), "WEBP", 2),
        "nested/d.JPEG": _image(root / "nested" / "d.JPEG", (150, 150), "JPEG", 3),
    }
    (root / "b.txt").write_text("a blue bird\n")  # sidecar caption
    _image(root / "tiny.png", (40, 300), "PNG", 4)  # below --min-size
    (root / "broken.jpg").write_bytes(b"not an image")
    (root / "notes.md").write_text("ignored: not an image extension")
    return root, files


def test_folder_shards(tmp_path, image_folder, capsys):
    root, files = image_folder
    out = tmp_path / "out"
    assert make_shards.main([str(root), "--out", str(out), "--per-shard", "3"]) == 0
    assert "4 samples, 2 skipped" in capsys.readouterr().out
    shards = sorted(out.iterdir())
    assert [p.name for p in shards] == ["00000.tar", "00001.tar"]
    samples = {}
    for shard in shards:
        samples.update(read_shard(shard))
    assert len(samples) == 4
    by_source = {json.loads(m["json"])["source"]: m for m in samples.values()}
    assert set(by_source) == set(files)
    for rel, data in files.items():
        members = by_source[rel]
        image_ext = next(ext for ext in members if ext not in ("txt", "json"))
        assert members[image_ext] == data  # stored as they are, no re-encoding
    assert by_source["b.png"]["txt"] == b"a blue bird"
    assert by_source["a_red-car.jpg"]["txt"] == b"a red car"
    assert "jpg" in by_source["nested/d.JPEG"]
    assert json.loads(by_source["b.png"]["json"])["width"] == 200


def test_folder_even_split_and_max_size(tmp_path, image_folder):
    root, _ = image_folder
    out = tmp_path / "out"
    assert make_shards.main([str(root), "--out", str(out), "--shards", "2", "--max-size", "140",
                             "--min-size", "100"]) == 0
    counts = [len(read_shard(p)) for p in sorted(out.iterdir())]
    assert sum(counts) == 4 and len(counts) == 2
    for shard in out.iterdir():
        for members in read_shard(shard).values():
            ext = next(e for e in members if e not in ("txt", "json"))
            assert max(Image.open(io.BytesIO(members[ext])).size) <= 140


@needs_photos
def test_refuses_stale_shards(tmp_path):
    out = tmp_path / "out"
    assert make_shards.main(["--sample", "--out", str(out), "--shards", "2", "--per-shard", "2"]) == 0
    assert make_shards.main(["--sample", "--out", str(out), "--shards", "1", "--per-shard", "2"]) == 2
    assert make_shards.main(["--sample", "--out", str(out), "--shards", "2", "--per-shard", "2"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["{missing}", "--out", "{out}"], "does not exist"),
    (["{empty}", "--out", "{out}"], "no image files"),
    (["--sample", "--out", "{out}", "--per-shard", "0"], "--per-shard must be positive"),
    pytest.param(["--sample", "--out", "{out}", "--min-size", "5000"], "--min-size 5000", marks=needs_photos),
])
def test_bad_input_names_the_problem(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "out": tmp_path / "out"}
    assert make_shards.main([a.format(**paths) for a in argv]) == 2
    assert message in capsys.readouterr().err


def test_sample_without_scikit_image(tmp_path, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "skimage" else real_find_spec(name, *a))
    assert make_shards.main(["--sample", "--out", str(tmp_path / "out")]) == 2
    assert "pip install scikit-image" in capsys.readouterr().err


@needs_photos
def test_shards_readable_by_webdataset_and_reader(tmp_path):
    wds = pytest.importorskip("webdataset")
    from pipeline.reader import ShardReader

    out = tmp_path / "out"
    assert make_shards.main(["--sample", "--out", str(out), "--shards", "1", "--per-shard", "3"]) == 0
    url = str(out / "00000.tar")
    rows = list(wds.WebDataset(url, shardshuffle=False).decode("pil"))
    assert len(rows) == 3 and all(isinstance(r["jpg"], Image.Image) for r in rows)
    assert sum(1 for _ in ShardReader(url)) == 3


@needs_photos
def test_sample_shards_to_s3(s3_server):
    bucket = s3_server.bucket("make-shards")
    opts = json.dumps({"client_kwargs": s3_server.storage_options["client_kwargs"]})
    assert make_shards.main(["--sample", "--out", f"{bucket}/shards", "--shards", "2", "--per-shard", "2",
                             "--storage-options", opts]) == 0
    from pipeline import storage

    listing = storage.list_files(f"{bucket}/shards", s3_server.storage_options)
    assert sorted(listing) == ["00000.tar", "00001.tar"] and all(listing.values())
