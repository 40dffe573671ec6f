"""Stable shard names (layout.shard_name): a shard's NAME depends on its own URL only, so growing,
shrinking or reordering the inputs never renames, re-encodes or duplicates a committed shard."""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter

import pytest

from pipeline import layout, storage
from pipeline.plan import PlanError, make_plan


def test_name_is_the_file_name_and_a_hash_of_the_canonical_url():
    url = "s3://bucket/train/00042.tar"
    digest = hashlib.sha256(url.encode()).hexdigest()[:10]
    assert layout.shard_name(url) == f"00042-{digest}"
    # credentials, query, fragment, scheme case, repeated slashes and fsspec chains do not count
    for same in ("S3://user:secret@bucket//train/00042.tar?X-Amz-Signature=abc#frag",
                 "simplecache::s3://bucket/train/00042.tar"):
        assert layout.canonical_url(same) == url and layout.shard_name(same) == layout.shard_name(url)
    assert layout.shard_name("/data/x.tar.gz").startswith("x-")
    assert layout.shard_name("file:///data/x.tar.gz") == layout.shard_name("/data/x.tar.gz")
    assert layout.shard_name("https://h/p/we ird&name.tar?sig=1").startswith("we_ird_name-")


def test_names_do_not_depend_on_the_other_inputs(tmp_path):
    a = ["s3://b/A/00000.tar", "s3://b/A/00001.tar"]
    grown = ["s3://b/B/00000.tar", *reversed(a), "s3://c/A/00000.tar"]
    out = str(tmp_path / "out")
    names = {s.url: s.name for s in make_plan(a, out).shards}
    grown_names = {s.url: s.name for s in make_plan(grown, out).shards}
    assert names == {u: layout.shard_name(u) for u in a} and {u: grown_names[u] for u in a} == names
    assert len(set(grown_names.values())) == 4  # the same file name in other folders: other names


def test_two_inputs_with_one_name_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(layout, "NAME_HASH_DIGITS", 0)  # force a collision of the hash
    with pytest.raises(PlanError, match="both get the shard name"):
        make_plan(["s3://b/A/00000.tar", "s3://b/B/00000.tar"], str(tmp_path / "out"))


# -- end to end: the encode job on real shards ---------------------------------------------------


def _config(tiny_weights, urls, out, so=None, **ray):
    from pipeline.config import config_from_dict

    output = {"path": str(out), **({"storage_options": so} if so else {})}
    return config_from_dict({
        "input": {"urls": urls}, "output": output,
        "model": {"preset": "tiny", "weights": tiny_weights}, "preprocess": {"resolution": 64},
        "ray": {"workers": 1, "num_gpus_per_worker": 0, "num_cpus_per_worker": 1, "batch_size": 4, **ray},
        "qa": {"samples": 0},
    })


def _keys(out) -> Counter:
    from pipeline import LatentDataset

    return Counter(item["key"] for item in LatentDataset(str(out), rank=0, world_size=1, shuffle=False))


def test_growing_reordering_and_shrinking_inputs_never_duplicate(ray_local, sample_shards, tmp_path, tiny_weights,
                                                                 monkeypatch):
    from pipeline import driver

    a, b = tmp_path / "A" / "00000.tar", tmp_path / "B" / "00000.tar"  # same file name, other folders
    for path, src in ((a, sample_shards[0]), (b, sample_shards[1])):
        path.parent.mkdir()
        shutil.copy(src, path)
    out = tmp_path / "out"
    assert driver.run_encode(_config(tiny_weights, [str(a)], out)).exit_code == 0
    a_file = out / "shards" / f"{layout.shard_name(str(a))}.parquet"
    a_state = (a_file.read_bytes(), a_file.stat().st_mtime_ns)

    grown = driver.run_encode(_config(tiny_weights, [str(b), str(a)], out))  # added B, and put it first
    assert (grown.exit_code, grown.shards_total, grown.shards_skipped, grown.shards_committed) == (0, 2, 1, 1)
    assert (a_file.read_bytes(), a_file.stat().st_mtime_ns) == a_state  # A's shard untouched
    keys = _keys(out)
    assert len(keys) == 8 and set(keys.values()) == {1}  # every key exactly once

    # Removing A from the inputs, or reordering again, has nothing to do: decided before Ray or a model.
    def no_ray(*a, **k):
        raise AssertionError("a rerun with nothing to do started Ray")

    monkeypatch.setattr(driver, "connect_ray", no_ray)
    for urls in ([str(b)], [str(a), str(b)]):
        again = driver.run_encode(_config(tiny_weights, urls, out))
        assert (again.exit_code, again.shards_committed, again.shards_skipped) == (0, 0, len(urls))
    assert _keys(out) == keys and (a_file.read_bytes(), a_file.stat().st_mtime_ns) == a_state

    # Inputs already committed are not checked again (their folders are not listed); a new input
    # that does not exist is refused before anything is written, leaving the index as it was.
    from pipeline.preflight import InputError

    index = (out / layout.INDEX).read_bytes()
    a.unlink()
    assert driver.run_encode(_config(tiny_weights, [str(a), str(b)], out)).exit_code == 0
    missing = tmp_path / "C" / "00000.tar"
    with pytest.raises(InputError, match="1 input shard.s. do not exist: .*C/00000.tar"):
        driver.run_encode(_config(tiny_weights, [str(a), str(b), str(missing)], out))
    assert (out / layout.INDEX).read_bytes() == index


def test_requests_per_shard_and_per_rerun_on_s3(ray_local, counting_s3, sample_shards, tiny_weights):
    from pipeline import driver

    so = counting_s3.storage_options
    out = storage.join(counting_s3.bucket("scale-requests"), "latents")
    urls = [str(p) for p in sample_shards]
    counting_s3.reset()
    first = driver.run_encode(_config(tiny_weights, urls, out, so))
    assert first.exit_code == 0 and first.shards_committed == 3
    # Per shard written: its data and its commit, one PUT each (no ledger without bad samples, no QA
    # table without QA samples, no DELETE of a commit that cannot exist).
    assert counting_s3.count("PUT", "/shards/") == 3 and counting_s3.count("PUT", "/_commits/") == 3
    assert counting_s3.count("DELETE") == 0 and counting_s3.count(contains="/errors/") == 0
    assert counting_s3.count("GET", "/_commits/") == 0  # the index takes the commits as the workers wrote them
    assert counting_s3.count() - 6 <= 16, counting_s3.requests  # lease, manifest, listings, index, summary

    counting_s3.reset()
    again = driver.run_encode(_config(tiny_weights, urls, out, so))
    assert again.exit_code == 0 and again.shards_skipped == 3
    assert counting_s3.count(contains="/_commits/") == 0  # no commit is read: the index and one LIST
    assert counting_s3.count() <= 12, counting_s3.requests


def test_qa_tables_stay_bounded_with_many_small_shards(ray_local, tmp_path, tiny_weights):
    import io

    from conftest import sample_photos, write_shard

    from pipeline import driver
    from pipeline.config import config_from_dict
    from pipeline.index import load_index

    photos = sample_photos(count=2)
    (tmp_path / "in").mkdir()
    for s in range(10):
        buf = io.BytesIO()
        photos[s % 2][1].resize((64, 64)).save(buf, format="JPEG")
        write_shard(tmp_path / "in" / f"{s:05d}.tar", [(f"{s:03d}", {"jpg": buf.getvalue()})])
    out = tmp_path / "out"
    config = _config(tiny_weights, str(tmp_path / "in" / "*.tar"), out).to_dict()
    config["qa"]["samples"] = 3
    assert driver.run_encode(config_from_dict(config)).exit_code == 0
    tables = list((out / "qa" / "samples").glob("*.parquet"))
    index = load_index(str(out))
    assert len(tables) == 3 and sum(index.column("qa_rows")) == 3  # qa.samples, not one per shard
    assert {p.stem for p in tables} == {n for n, q in zip(index.names, index.column("qa_rows")) if q}
