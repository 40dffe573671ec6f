"""writer.py with its formats, ledger, QA table and writer thread; commit.py, manifest.py.

Round trips, plain readers, crash safety, redaction, fingerprint guard.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from output_builders import make_manifest, make_rows, write_output

from pipeline import commit as commit_mod
from pipeline import storage, writer
from pipeline.commit import ChannelStats, committed_names, is_committed, read_commit, scan_output
from pipeline.dataset import iter_shard_rows
from pipeline.format_parquet import ParquetShardFormat
from pipeline.format_wds import WdsShardFormat
from pipeline.layout import commit_url, errors_url, qa_sample_url, shard_ext, shard_url
from pipeline.manifest import ManifestMismatch, check_or_write_manifest, read_manifest
from pipeline.rows import ErrorRow, QARow, WriterError
from pipeline.schema import from_storage
from pipeline.writer import ShardWriter, WriterThread

TOL = {"fp32": 0.0, "fp16": 1e-3, "bf16": 8e-3}


def _check_roundtrip(root, so, fmt, dtype, shapes=((4, 4, 4),)):
    manifest, written = write_output(root, {"00000": 7}, manifest=make_manifest(fmt, dtype, shapes=shapes),
                                     storage_options=so)
    assert read_manifest(root, so).to_dict() == manifest.to_dict()
    record = read_commit(root, "00000", so)
    assert is_committed(root, "00000", so) and committed_names(root, so) == ["00000"]
    assert record.rows == 7 and record.errors == 1 and record.row_groups == [3, 3, 1]
    assert record.errors_by_reason == {"decode/UnidentifiedImageError": 1}
    assert set(record.files) == {f"shards/00000.{'parquet' if fmt == 'parquet' else 'tar'}", "errors/00000.parquet"}
    got = list(iter_shard_rows(root, record, so, fixed_shape=manifest.fixed_shape))
    assert [r["key"] for r in got] == [r.key for r in written["00000"]]
    stats = ChannelStats(4)
    for row, exp in zip(got, written["00000"]):
        for col in ("latent", "logvar", "latent_flip", "logvar_flip"):
            assert row[col].dtype == np.float32 and row[col].shape == exp.latent.shape
            np.testing.assert_allclose(row[col], getattr(exp, col), rtol=TOL[dtype], atol=TOL[dtype] * 4)
        stats.update(row["latent"])
        assert row["caption"] == exp.caption
        assert json.loads(row["meta"]) == json.loads(exp.meta)
        assert row["source"] == "s3://***@bucket/in/00000.tar"  # credentials never stored
        assert tuple(row["original_size"]) == exp.original_size
        assert tuple(row["crop_top_left"]) == exp.crop_top_left
        assert tuple(row["target_size"]) == exp.target_size
        assert row["index"] == exp.index
    # Commit statistics are exact over the stored (rounded) values.
    want = stats.to_dict()
    for k in ChannelStats.KEYS:
        np.testing.assert_allclose(record.stats[k], want[k], rtol=1e-9)
    ledger = pq.read_table(storage.open_input(errors_url(root, "00000"), so)).to_pylist()
    assert ledger == [{"key": "00000-bad0", "source": "in/00000.tar", "stage": "decode",
                       "error": "UnidentifiedImageError", "message": "not an image"}]


@pytest.mark.parametrize("fmt", ["parquet", "wds"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_roundtrip_local(tmp_path, fmt, dtype):
    _check_roundtrip(str(tmp_path / "out"), None, fmt, dtype)


@pytest.mark.parametrize("fmt,dtype", [("parquet", "bf16"), ("wds", "fp16"), ("parquet", "fp32")])
def test_roundtrip_s3(s3_server, fmt, dtype):
    so = s3_server.storage_options
    root = storage.join(s3_server.bucket("writer-test"), f"{fmt}-{dtype}")
    _check_roundtrip(root, so, fmt, dtype)


def test_roundtrip_aspect_buckets(tmp_path):
    shapes = ((4, 4, 6), (4, 6, 4), (4, 4, 4))
    root = str(tmp_path / "out")
    _check_roundtrip(root, None, "parquet", "fp16", shapes=shapes)
    schema = pq.read_schema(os.path.join(root, "shards", "00000.parquet"))
    assert str(schema.field("latent").type) == "list<element: halffloat>"
    assert "latent_shape" in schema.names
    assert read_commit(root, "00000").shapes == {"4x4x4": 2, "4x4x6": 3, "4x6x4": 2}


def test_parquet_encodings_and_metadata(tmp_path):
    for dtype in ("fp32", "fp16", "bf16"):
        root = str(tmp_path / dtype)
        write_output(root, {"a": 5}, manifest=make_manifest(dtype=dtype, store="mean", flip=False),
                     row_group_rows=None)
        pf = pq.ParquetFile(os.path.join(root, "shards", "a.parquet"))
        field = pf.schema_arrow.field("latent")
        assert field.metadata[b"dtype"] == dtype.encode() and json.loads(field.metadata[b"shape"]) == [4, 4, 4]
        assert field.type.list_size == 64
        info = json.loads(pf.schema_arrow.metadata[b"latent_precompute"])
        assert info["dtype"] == dtype and info["shape"] == [4, 4, 4] and info["scaling_factor"] == 0.5
        col = pf.metadata.row_group(0).column(3)
        assert col.path_in_schema == "latent.list.element"
        assert col.compression == "ZSTD"
        assert not any("DICTIONARY" in e for e in col.encodings)
        # DuckDB cannot decode byte-stream-split float16, so fp16 stays PLAIN.
        assert ("BYTE_STREAM_SPLIT" in col.encodings) == (dtype != "fp16")
        assert pf.metadata.num_row_groups == 1


def test_plain_readers(tmp_path):
    """The Parquet output loads without this project's code: pyarrow, pandas, DuckDB, datasets."""
    import duckdb
    import pandas as pd
    from datasets import load_dataset

    cases = {
        "fixed_bf16": make_manifest(dtype="bf16"),
        "fixed_fp16": make_manifest(dtype="fp16", store="mean", flip=False),
        "buckets_fp32": make_manifest(dtype="fp32", shapes=((4, 4, 6), (4, 6, 4))),
    }
    for label, manifest in cases.items():
        root = str(tmp_path / label)
        _, written = write_output(root, {"s0": 4, "s1": 3}, manifest=manifest)
        files = sorted(str(p) for p in (tmp_path / label / "shards").glob("*.parquet"))
        rows = [r for name in ("s0", "s1") for r in written[name]]
        first = rows[0]

        def check_latent(values, shape, *, dtype=manifest.dtype, first=first):
            arr = np.asarray(values)
            z = from_storage(arr.astype(np.uint16), "bf16") if dtype == "bf16" else arr.astype(np.float32)
            np.testing.assert_allclose(z.reshape(shape), first.latent, atol=0.05)

        table = pq.read_table(files)
        assert table.num_rows == 7
        check_latent(table.column("latent")[0].values.to_numpy(), first.latent.shape)

        df = pd.read_parquet(files[0])
        assert list(df["key"][:2]) == ["s0-00000", "s0-00001"]
        check_latent(df["latent"][0], first.latent.shape)

        pattern = str(tmp_path / label / "shards" / "*.parquet")
        con = duckdb.connect()
        key, latent, osize = con.execute(
            f"SELECT key, latent, original_size FROM read_parquet('{pattern}') ORDER BY key LIMIT 1").fetchone()
        assert key == "s0-00000" and list(osize) == [100, 200]
        check_latent(latent, first.latent.shape)
        n = con.execute(f"SELECT count(*) FROM read_parquet('{pattern}') WHERE caption IS NULL").fetchone()[0]
        assert n == sum(r.caption is None for r in rows)

        ds = load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf-cache"))
        assert len(ds) == 7
        item = ds[0]
        assert item["key"] == "s0-00000" and item["original_size"] == [100, 200]
        check_latent(item["latent"], first.latent.shape)


def _killed_before_commit(monkeypatch, root, name, manifest, so=None, rows=5):
    """Write shard `name` and die between its data upload and its commit record."""

    def crash(*a, **k):
        raise KeyboardInterrupt("killed between data and commit")

    monkeypatch.setattr(writer, "write_commit", crash)
    w = ShardWriter(root, name, "parquet", "fp32", so, manifest)
    w.write(make_rows(name, rows))
    with pytest.raises(KeyboardInterrupt):
        w.commit()
    monkeypatch.undo()


def test_crash_between_data_and_commit_leaves_shard_uncommitted(tmp_path, monkeypatch):
    root = str(tmp_path / "out")
    manifest = make_manifest()
    check_or_write_manifest(root, manifest)
    _killed_before_commit(monkeypatch, root, "s", manifest)
    assert os.path.exists(shard_url(root, "s", "parquet"))  # data landed
    assert not is_committed(root, "s") and committed_names(root) == []
    assert scan_output(root).uncommitted == ["s"]
    # The retry replaces the leftovers and commits.
    w = ShardWriter(root, "s", "parquet", "fp32", None, manifest)
    w.write(make_rows("s", 4))
    assert w.commit().rows == 4
    assert is_committed(root, "s")


def test_recommit_never_pairs_new_data_with_old_commit(tmp_path, monkeypatch):
    root = str(tmp_path / "out")
    manifest, _ = write_output(root, {"s": 5})
    assert is_committed(root, "s")
    def crash_on_upload(*a, **k):
        raise OSError("connection reset")

    monkeypatch.setattr(storage, "put_file", crash_on_upload)
    with ShardWriter(root, "s", "parquet", "fp32", None, manifest) as w:
        w.write(make_rows("s", 2))
        with pytest.raises(OSError):
            w.commit()
    assert not is_committed(root, "s")
    assert not os.path.exists(commit_url(root, "s"))


def test_commit_requires_matching_files(tmp_path):
    root = str(tmp_path / "out")
    write_output(root, {"a": 3, "b": 3})
    path = os.path.join(root, "shards", "a.parquet")
    with open(path, "ab") as f:
        f.write(b"junk")
    assert not is_committed(root, "a") and is_committed(root, "b")
    scan = scan_output(root)
    assert list(scan.committed) == ["b"] and "has" in scan.broken["a"]
    os.remove(os.path.join(root, "errors", "b.parquet"))
    assert not is_committed(root, "b")
    assert "errors/b.parquet is missing" in scan_output(root).broken["b"]


def test_writer_with_qa_and_empty_shard(tmp_path):
    root = str(tmp_path / "out")
    manifest = make_manifest(store="mean", flip=False)
    check_or_write_manifest(root, manifest)
    rows = make_rows("q", 3, logvar=False, flip=False)
    with ShardWriter(root, "q", "parquet", "fp16", None, manifest) as w:
        w.write(rows)
        w.add_qa_rows([QARow("q-00001", "in/q.tar", np.full((32, 32, 3), 7, np.uint8), rows[1].latent, "32x32")])
        record = w.commit()
    assert record.qa_rows == 1 and "qa/samples/q.parquet" in record.files
    qa = pq.read_table(os.path.join(root, "qa", "samples", "q.parquet")).to_pylist()[0]
    assert qa["key"] == "q-00001" and qa["pixels_shape"] == [32, 32, 3] and qa["bucket"] == "32x32"
    np.testing.assert_array_equal(np.asarray(qa["latent"], np.float32).reshape(4, 4, 4), rows[1].latent)
    with ShardWriter(root, "empty", "parquet", "fp16", None, manifest) as w:
        w.add_error(ErrorRow("k", "s3://u:p@b/x.tar", "decode", "OSError", "bad"))
        record = w.commit()
    assert record.rows == 0 and record.errors == 1 and is_committed(root, "empty")
    assert pq.read_table(os.path.join(root, "shards", "empty.parquet")).num_rows == 0
    assert pq.read_table(os.path.join(root, "errors", "empty.parquet")).column("source").to_pylist() == ["s3://***@b/x.tar"]


def test_writer_rejects_rows_that_do_not_fit(tmp_path):
    manifest = make_manifest(store="mean+logvar", flip=False)
    with ShardWriter(str(tmp_path), "s", "parquet", "fp32", None, manifest) as w:
        rows = make_rows("s", 2, logvar=True, flip=False)
        with pytest.raises(WriterError, match="'s-00000'.*logvar"):
            w.write([make_rows("s", 1, logvar=False, flip=False)[0]])
        with pytest.raises(WriterError, match="fixed shape"):
            w.write([make_rows("s", 1, shapes=((4, 8, 8),), flip=False)[0]])
        w.write(rows[:1])
        with pytest.raises(WriterError, match="duplicate key 's-00000'"):
            w.write(rows[:1])
    assert not os.path.exists(tmp_path / "shards")  # nothing published without commit()
    with pytest.raises(WriterError, match="dtype"):
        ShardWriter(str(tmp_path), "s", "parquet", "fp8")


def test_fingerprint_guard(tmp_path):
    root = str(tmp_path / "out")
    manifest, _ = write_output(root, {"a": 2})
    assert check_or_write_manifest(root, make_manifest()).created == manifest.created
    other = make_manifest()
    other.model["weights_sha256"] = "cd" * 32
    other.preprocess["resolution"] = 64
    with pytest.raises(ManifestMismatch) as err:
        check_or_write_manifest(root, other)
    msg = str(err.value)
    assert "model.weights_sha256" in msg and "preprocess.resolution" in msg and "32 != new 64" in msg
    assert is_committed(root, "a")
    check_or_write_manifest(root, other, overwrite=True)
    assert read_manifest(root).preprocess["resolution"] == 64
    assert committed_names(root) == []  # the old run's shards no longer count as done


def test_s3_crash_and_fingerprint_guard(s3_server, monkeypatch):
    so = s3_server.storage_options
    root = storage.join(s3_server.bucket("writer-test"), "crash")
    manifest, _ = write_output(root, {"ok": 3}, storage_options=so)
    _killed_before_commit(monkeypatch, root, "bad", manifest, so, rows=3)
    assert storage.exists(shard_url(root, "bad", "parquet"), so)
    assert committed_names(root, so) == ["ok"] and not is_committed(root, "bad", so)
    other = make_manifest(dtype="bf16")
    with pytest.raises(ManifestMismatch, match="dtype"):
        check_or_write_manifest(root, other, so)
    assert commit_mod.read_commit(root, "ok", so).rows == 3


def test_format_suffixes_follow_the_layout():
    assert ParquetShardFormat.suffix == shard_ext("parquet") and WdsShardFormat.suffix == shard_ext("wds")


@pytest.mark.parametrize("fmt", ["parquet", "wds"])
def test_credentials_never_stored(tmp_path, fmt):
    root = str(tmp_path / "out")
    manifest = make_manifest(fmt, store="mean", flip=False)
    rows = make_rows("c", 2, logvar=False, flip=False, source="https://u:pw@h/in/c.tar?X-Amz-Signature=SIG")
    with ShardWriter(root, "c", fmt, "fp32", None, manifest) as w:
        w.write(rows)
        w.add_error(ErrorRow("c-bad", "s3://k:s@b/c.tar", "read", "OSError", "cannot open https://u:pw@h/x?token=T"))
        w.add_qa_rows([QARow("c-00000", "s3://k:s@b/c.tar", np.zeros((8, 8, 3), np.uint8), rows[0].latent, "8x8")])
        record = w.commit()
    assert record.source == "https://***@h/in/c.tar?X-Amz-Signature=***"
    assert rows[0].source.startswith("https://u:pw@")  # the caller's rows are left as they were
    ledger = pq.read_table(errors_url(root, "c")).to_pylist()[0]
    assert ledger["source"] == "s3://***@b/c.tar" and ledger["message"] == "cannot open https://***@h/x?token=***"
    assert pq.read_table(qa_sample_url(root, "c")).column("source").to_pylist() == ["s3://***@b/c.tar"]
    for path in (tmp_path / "out").rglob("*.*"):
        assert b"pw@" not in path.read_bytes() and b"SIG" not in path.read_bytes(), path


def test_writer_thread_writes_rows_and_errors_in_order(tmp_path):
    manifest = make_manifest(store="mean", flip=False)
    rows = make_rows("t", 5, logvar=False, flip=False)
    clock = {"write_wait": 0.0}
    with ShardWriter(str(tmp_path), "t", "parquet", "fp32", None, manifest) as w:
        sink = WriterThread(w, clock, depth=1)
        sink.put(("rows", rows[:3]))
        sink.put(("error", ErrorRow("t-bad", "in/t.tar", "decode", "OSError", "bad")))
        sink.put(("rows", rows[3:]))
        sink.close()
        assert sink.error is None and not sink.thread.is_alive()
        record = w.commit()
    assert record.rows == 5 and record.errors == 1 and clock["write_wait"] >= 0.0
    got = [r["key"] for r in iter_shard_rows(str(tmp_path), record, None, fixed_shape=manifest.fixed_shape)]
    assert got == [r.key for r in rows]


def test_writer_thread_reraises_a_write_error_and_aborts(tmp_path):
    manifest = make_manifest(store="mean", flip=False)
    rows = make_rows("t", 2, logvar=False, flip=False)
    clock = {"write_wait": 0.0}
    with ShardWriter(str(tmp_path), "t", "parquet", "fp32", None, manifest) as w:
        sink = WriterThread(w, clock)
        sink.put(("rows", rows[:1]))
        sink.put(("rows", rows[:1]))
        with pytest.raises(WriterError, match="duplicate key 't-00000'"):
            sink.close()
        with pytest.raises(WriterError, match="duplicate key"):
            sink.put(("rows", rows[1:]))
    with ShardWriter(str(tmp_path), "u", "parquet", "fp32", None, manifest) as w:
        sink = WriterThread(w, clock)
        sink.put(("rows", rows))
        sink.abort()
        assert not sink.thread.is_alive()
    assert not (tmp_path / "shards").exists()
