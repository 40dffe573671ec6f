"""dataset.py integrity: damaged bytes raise an error naming the shard and row group (or are skipped
and counted on request), never come back as wrong latents; broken and uncommitted shards are
reported; outputs without checksums stay readable."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from output_builders import make_manifest, write_output

from pipeline import storage
from pipeline.commit import read_commit, write_commit
from pipeline.dataset import CHECKSUM_SUFFIX, DatasetError, DatasetWarning, LatentDataset, ShardError
from pipeline.index import refresh_index
from pipeline.layout import commit_url

ROWS = {"a": 8, "b": 6, "c": 7}


def _recommit(root: str, name: str) -> None:
    """Update shard `name`'s commit record to the shard file as it now is."""
    record = read_commit(root, name)
    path = os.path.join(root, record.shard_file)
    data = open(path, "rb").read()
    record.files[record.shard_file] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write_commit(root, record)


def _without_checksums(root: str) -> None:
    """Rewrite every shard as outputs written before checksums were: Parquet pages without CRCs
    (same options and row groups), tar samples without their checksum member; commits updated."""
    for name in ROWS:
        record = read_commit(root, name)
        path = os.path.join(root, record.shard_file)
        if record.format == "parquet":
            pf = pq.ParquetFile(path)
            latent_cols = [c for c in pf.schema_arrow.names if c.startswith(("latent", "logvar")) and c != "latent_shape"]
            groups = [pf.read_row_group(i) for i in range(pf.metadata.num_row_groups)]
            with pq.ParquetWriter(path + ".new", pf.schema_arrow, compression="zstd", use_dictionary=["source"],
                                  use_byte_stream_split=[f"{c}.list.element" for c in latent_cols],
                                  write_statistics=["key", "source", "index"], store_schema=True,
                                  write_page_checksum=False) as w:
                for table in groups:
                    w.write_table(table, row_group_size=table.num_rows)
        else:
            with tarfile.open(path) as src, tarfile.open(path + ".new", "w", format=tarfile.USTAR_FORMAT) as dst:
                for info in src.getmembers():
                    if not info.name.endswith(CHECKSUM_SUFFIX):
                        dst.addfile(info, io.BytesIO(src.extractfile(info).read()))
        os.replace(path + ".new", path)
        _recommit(root, name)


def _has_checksums(root: str, name: str) -> bool:
    """Whether shard `name` carries checksums: a crc32 member per tar sample, or Parquet pages whose
    damage the page-checksum check alone catches (pyarrow does not expose the CRC field)."""
    record = read_commit(root, name)
    path = os.path.join(root, record.shard_file)
    if record.format == "wds":
        with tarfile.open(path) as tar:
            return any(m.name.endswith(CHECKSUM_SUFFIX) for m in tar.getmembers())
    col = pq.ParquetFile(path).metadata.row_group(0).column(3)
    clean = open(path, "rb").read()
    for pos in range(col.data_page_offset + col.total_compressed_size - 1, col.data_page_offset, -7):
        data = bytearray(clean)
        data[pos] ^= 0x10
        try:  # a flip that an unverified read does not notice...
            pq.ParquetFile(pa.BufferReader(bytes(data))).read()
        except (OSError, ValueError):
            continue
        try:  # ... is caught by the page checksums, when the file has them
            pq.ParquetFile(pa.BufferReader(bytes(data)), page_checksum_verification=True).read()
        except OSError:
            return True
        return False
    raise AssertionError(f"no byte of {path} can be flipped unnoticed")


def _read_all(root: str, **kw) -> dict[str, np.ndarray]:
    return {key: row[0] for key, row in _rows(root, **kw).items()}


def _rows(root: str, **kw) -> dict[str, tuple]:
    """Every field of every item, by key, in stored order."""
    ds = LatentDataset(root, rank=0, world_size=1, shuffle=False, scale=False, sample=False, flip=False, **kw)
    return {x["key"]: _fields(x) for x in ds}


def _fields(x: dict) -> tuple:
    return (x["latent"].numpy(), x["source"], x["index"], x["caption"], x["meta"],
            *(x[c].tolist() for c in ("original_size", "crop_top_left", "target_size")))


@pytest.fixture(params=["parquet", "wds"])
def checked(request, tmp_path):
    root = str(tmp_path / request.param)
    write_output(root, ROWS, manifest=make_manifest(request.param, "bf16"), row_group_rows=3)
    assert all(_has_checksums(root, name) for name in ROWS)  # the writer adds them
    reference = _read_all(root)
    return request.param, root, reference


def test_outputs_written_before_checksums_stay_readable(checked):
    fmt, root, reference = checked
    _without_checksums(root)
    assert not any(_has_checksums(root, name) for name in ROWS)
    got = _read_all(root)
    assert got.keys() == reference.keys()
    for key, latent in got.items():
        np.testing.assert_array_equal(latent, reference[key])


def _flip(path: str, pos: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x10]))


def _latent_offset(root: str, name: str, fmt: str) -> tuple[str, int]:
    """The shard file of `name` and an offset inside its second row group's latent data."""
    path = os.path.join(root, read_commit(root, name).shard_file)
    if fmt == "parquet":
        col = pq.ParquetFile(path).metadata.row_group(1).column(3)  # latent
        return path, col.data_page_offset + col.total_compressed_size - 8
    data = open(path, "rb").read()
    return path, data.index(b"\x93NUMPY", 512 * 10) + 200  # inside a later sample's .npy


def test_flipped_byte_raises_naming_shard_and_row_group(checked):
    fmt, root, _ = checked
    path, pos = _latent_offset(root, "b", fmt)
    _flip(path, pos)
    _recommit(root, "b")  # the commit agrees with the file: only the content checks can tell
    with pytest.raises(ShardError) as e:
        _read_all(root)
    assert e.value.shard == "b" and "shard 'b'" in str(e.value)
    if fmt == "parquet":
        assert e.value.row_group == 1 and "row group 1" in str(e.value)
    else:
        assert e.value.key is not None and "crc32" in str(e.value)


def test_skip_policy_counts_and_keeps_lengths(checked):
    fmt, root, reference = checked
    path, pos = _latent_offset(root, "b", fmt)
    _flip(path, pos)
    _recommit(root, "b")
    for world in (1, 2):
        lengths, damaged = [], []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for rank in range(world):
                ds = LatentDataset(root, rank=rank, world_size=world, on_error="skip", scale=False, sample=False,
                                   flip=False)
                items = list(ds)
                lengths.append(len(items))
                damaged += ds.damaged
                for x in items:  # repeats stand in for the damaged samples; every latent is right
                    np.testing.assert_array_equal(x["latent"].numpy(), reference[x["key"]])
        assert lengths == [-(-21 // world)] * world
        assert len(damaged) == 1 and "shard 'b'" in damaged[0]
        skipped = [w for w in caught if issubclass(w.category, DatasetWarning)]
        assert len(skipped) == 1 and "skipped (1 so far in this process)" in str(skipped[0].message)


def test_flipped_bytes_never_give_wrong_latents(checked):
    """Flip bytes all over a checksummed shard: each read raises ShardError or gives back exactly
    what was written (footer bytes that only hold statistics change nothing)."""
    fmt, root, _ = checked
    reference = {k: v for k, v in _rows(root).items() if k.startswith("c-")}
    path = os.path.join(root, read_commit(root, "c").shard_file)
    size = os.path.getsize(path)
    ds = LatentDataset(root, rank=0, world_size=1, shuffle=False, scale=False, sample=False, flip=False,
                       shards=["c"])
    # The footer has no checksum of its own: a denser sample of it than of the pages.
    footer = int.from_bytes(open(path, "rb").read()[-8:-4], "little") + 8 if fmt == "parquet" else 0
    positions = sorted(set(range(0, size - footer, 13)) | set(range(size - footer, size, 5)))
    errors = 0
    for pos in positions:
        _flip(path, pos)
        try:
            got = {x["key"]: _fields(x) for x in ds}
        except ShardError:
            errors += 1
        else:
            assert got.keys() == reference.keys(), pos
            for key, fields in got.items():
                np.testing.assert_array_equal(fields[0], reference[key][0], err_msg=f"byte {pos}")
                assert fields[1:] == reference[key][1:], pos
        _flip(path, pos)
    assert errors > 50


def test_verify_checks_sha256_of_old_outputs(tmp_path):
    """Without page checksums (outputs written before them) verify=True still catches damage."""
    root = str(tmp_path / "old")
    write_output(root, ROWS, manifest=make_manifest("parquet", "fp32"), row_group_rows=3)
    _without_checksums(root)
    path, pos = _latent_offset(root, "a", "parquet")
    _flip(path, pos)  # the commit keeps the original sha256
    with pytest.raises(ShardError, match=r"shard 'a': sha256 .* differs from its commit"):
        _read_all(root, verify=True)


@pytest.mark.parametrize("indexed", [False, True])
def test_truncated_shard_and_deleted_commit_are_reported(tmp_path, indexed):
    root = str(tmp_path / "out")
    write_output(root, ROWS, manifest=make_manifest("parquet", "fp16"), row_group_rows=3)
    if indexed:
        refresh_index(root)
    path = os.path.join(root, read_commit(root, "a").shard_file)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    storage.remove(commit_url(root, "c"))
    why = "broken: its commit record is gone" if indexed else "uncommitted: a shard file without a commit record"
    with pytest.warns(DatasetWarning, match=r"1 shard\(s\) present but not read \(c: " + why):
        ds = LatentDataset(root, rank=0, world_size=1)
    assert list(ds.excluded) == ["c"] and ds.shards == ["a", "b"]
    # The truncated shard is listed (its commit holds): reading it is an error naming it...
    with pytest.raises(ShardError, match=r"shard 'a': has \d+ bytes, its commit says \d+"):
        list(ds)
    # ... or, on request, skipped and counted, the rank keeping its length.
    ds = LatentDataset(root, rank=0, world_size=1, on_error="skip")
    with pytest.warns(DatasetWarning, match="shard 'a'"):
        assert len(list(ds)) == len(ds) == 14
    assert ds.damaged and all("shard 'a'" in d for d in ds.damaged)
    with pytest.raises(DatasetError, match=r"not committed: c \(" + why):
        LatentDataset(root, rank=0, world_size=1, shards=["b", "c"])


def test_shard_damaged_after_listing_raises(tmp_path):
    """Truncated between the listing and the read: an error naming the shard, not fewer rows."""
    for fmt in ("parquet", "wds"):
        root = str(tmp_path / fmt)
        write_output(root, ROWS, manifest=make_manifest(fmt, "fp16"), row_group_rows=3)
        ds = LatentDataset(root, rank=0, world_size=1, shuffle=False)
        path = os.path.join(root, read_commit(root, "b").shard_file)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 1500)  # a tar's end padding only: its rows are intact
        with pytest.raises(ShardError, match=r"shard 'b': has \d+ bytes, its commit says \d+"):
            list(ds)


def test_footer_that_disagrees_with_the_manifest(tmp_path):
    """A footer has no checksum: its schema is checked against the manifest."""
    root = str(tmp_path / "out")
    write_output(root, {"a": 4}, manifest=make_manifest("parquet", "fp16"), row_group_rows=2)
    path = os.path.join(root, read_commit(root, "a").shard_file)
    table = pq.read_table(path)
    table = table.set_column(table.schema.get_field_index("key"), "key", table.column("key").cast(pa.binary()))
    pq.write_table(table, path, row_group_size=2)
    _recommit(root, "a")
    with pytest.raises(ShardError, match="column 'key' has type binary, expected string"):
        _read_all(root)
