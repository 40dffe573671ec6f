"""index.py: the consolidated index of committed shards, its "current" rule and its completion
from a LIST of _commits/, against real Parquet, DuckDB and a request-counting S3 server."""

from __future__ import annotations

import io
import logging

import numpy as np
import pyarrow.parquet as pq
from output_builders import write_output

from pipeline import storage
from pipeline.commit import committed_records, pooled_stats, read_commit
from pipeline.index import READER_COLUMNS, ShardIndex, WrittenCommits, load_index, refresh_index, write_index
from pipeline.layout import commit_url, index_url
from pipeline.lease import Lease


def _lease(root, so=None) -> Lease:
    return Lease(root, so, settle=0.0)


def _publish(root, so=None) -> ShardIndex:
    """What a job does at its end: take the lease, write the index, release naming its generation."""
    lease = _lease(root, so).acquire()
    index = load_index(root, so, lease=lease.previous)
    generation = write_index(root, index, so)
    lease.release(generation)
    return index


def test_index_holds_every_commit_and_plain_readers_read_it(tmp_path):
    root = str(tmp_path / "out")
    write_output(root, {"00000": 7, "00001": 5, "00002": 1})
    index = _publish(root)
    records = committed_records(root)
    assert list(index) == ["00000", "00001", "00002"] and not index.current
    assert index.records() == records  # every field round-trips, statistics included
    assert index["00001"].to_dict() == read_commit(root, "00001").to_dict()
    assert index.total_rows == 13

    pooled, _ = pooled_stats(records.values())
    merged = index.channel_stats()
    for key in ("count", "sum", "sumsq", "min", "max", "nan", "inf"):
        np.testing.assert_allclose(getattr(merged, key), getattr(pooled, key))

    again = load_index(root)
    assert again.current and list(again) == list(index) and again.records() == records
    table = pq.read_table(index_url(root))
    assert table.column("name").to_pylist() == ["00000", "00001", "00002"]
    assert table.column("shard_file").to_pylist()[0] == "shards/00000.parquet"
    import duckdb

    got = duckdb.sql(f"SELECT name, rows, len(row_groups) AS g FROM read_parquet('{index_url(root)}') ORDER BY name")
    assert got.fetchall() == [("00000", 7, 3), ("00001", 5, 2), ("00002", 1, 1)]


def test_output_without_index_is_scanned(tmp_path):
    root = str(tmp_path / "out")
    write_output(root, {"a": 2, "b": 3})
    index = load_index(root)
    assert list(index) == ["a", "b"] and not index.current and index.generation is None
    storage.put_bytes(index_url(root), b"not parquet")  # an unreadable index is a scan, with a warning
    assert list(load_index(root)) == ["a", "b"]


def test_stale_index_is_completed_from_the_listing(tmp_path, caplog):
    root = str(tmp_path / "out")
    write_output(root, {"a": 2, "b": 3, "c": 4})
    _publish(root)
    # A job takes the lease: from now on the index may be behind. It adds d, rewrites b and loses c.
    lease = _lease(root).acquire()
    write_output(root, {"d": 1, "b": 6})
    storage.remove(commit_url(root, "c"))
    with caplog.at_level(logging.WARNING, logger="pipeline.index"):
        index = load_index(root)
    assert not index.current and index.dropped == ["c"]
    assert "no commit record" in caplog.text and "c" in caplog.text
    assert list(index) == ["a", "b", "d"]
    assert index["b"].rows == 6 and index["d"].rows == 1
    assert index.records() == committed_records(root)
    # The job ends: the new index is current again.
    generation = write_index(root, index)
    lease.release(generation)
    assert load_index(root).current


def test_broken_commit_is_reported_not_indexed(tmp_path):
    root = str(tmp_path / "out")
    write_output(root, {"a": 2})
    storage.put_bytes(commit_url(root, "z"), b"{not json")
    index = load_index(root)
    assert list(index) == ["a"] and "not valid JSON" in index.broken["z"]


def test_requests_on_s3_current_and_stale(counting_s3):
    so = counting_s3.storage_options
    root = storage.join(counting_s3.bucket("index-requests"), "out")
    write_output(root, {f"{i:05d}": 2 for i in range(30)}, storage_options=so, row_group_rows=None, errors=0)
    _publish(root, so)

    counting_s3.reset()
    index = load_index(root, so)
    assert index.current and len(index) == 30
    assert counting_s3.count() <= 3, counting_s3.requests  # the index and the lease, whatever the shard count
    assert counting_s3.count("GET", "list-type") == 0

    # A job holds the lease and commits one more shard: readers list and read only the new commit.
    lease = _lease(root, so).acquire()
    write_output(root, {"00030": 2}, storage_options=so, errors=0)
    counting_s3.reset()
    index = load_index(root, so)
    assert not index.current and len(index) == 31
    assert counting_s3.count("GET", "/_commits/") == 1, counting_s3.requests
    assert counting_s3.count() <= 5, counting_s3.requests
    lease.release(None)


def test_a_few_columns_are_read_as_byte_ranges(counting_s3, monkeypatch):
    """A reader asking for a few columns GETs the footer, then one byte range per row group of
    those columns, not the whole index; it gets what a whole read gives."""
    from pipeline import index as index_module

    so = counting_s3.storage_options
    root = storage.join(counting_s3.bucket("ranged-reads"), "out")
    write_output(root, {f"{i:05d}": 2 for i in range(30)}, storage_options=so, row_group_rows=None, errors=0)
    _publish(root, so)
    # The same index in row groups of 8 shards (one of 10^5 shards has 7 row groups of 16,384).
    url = index_url(root)
    table = pq.read_table(io.BytesIO(storage.read_bytes(url, so)))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=8)
    storage.put_bytes(url, buf.getvalue(), so)
    # Scaled down with the index: less than the footer (a second GET), less than a row group's
    # other columns (the statistics), more than the columns between wanted ones.
    monkeypatch.setattr(index_module, "_TAIL", 1024)
    monkeypatch.setattr(index_module, "_GAP", 512)
    ranges = index_module._chunk_ranges(pq.read_metadata(io.BytesIO(buf.getvalue())), READER_COLUMNS)
    assert len(ranges) == 4  # the wanted columns of a row group are one range

    counting_s3.reset()
    index = load_index(root, so, columns=READER_COLUMNS)
    assert index.current and index.table.equals(table.select(list(READER_COLUMNS)).replace_schema_metadata(None))
    assert counting_s3.count("GET", "/out/index") == 2 + 4, counting_s3.requests
    assert index["00007"].files == {"shards/00007.parquet": {"size": storage.size(f"{root}/shards/00007.parquet", so),
                                                             "sha256": None}}


def test_refresh_takes_written_commits_without_reading_them(tmp_path, monkeypatch):
    root = str(tmp_path / "out")
    write_output(root, {"a": 2})
    base = _publish(root)
    written = WrittenCommits()
    write_output(root, {"b": 3, "c": 1})
    for name in ("b", "c"):
        written.add(read_commit(root, name))
    reads = []
    real = storage.read_many
    monkeypatch.setattr(storage, "read_many", lambda urls, so=None: reads.extend(urls) or real(urls, so))
    index = refresh_index(root, None, base, written)
    assert reads == [] and index.records() == committed_records(root)
    assert load_index(root, lease=None).current  # the file written lists exactly what is committed


def test_inspect_reindex_rebuilds_the_index_under_the_lease(tmp_path, capsys):
    from pipeline.inspect import main

    root = str(tmp_path / "out")
    write_output(root, {"a": 2, "b": 1})
    assert main([root, "--reindex"]) == 0
    assert load_index(root).current and list(load_index(root)) == ["a", "b"]
    storage.remove(index_url(root))
    held = Lease(root, holder="encode job on node7", settle=0).acquire()
    assert main([root, "--reindex"]) == 1
    assert "encode job on node7" in capsys.readouterr().err
    assert main([root, "--reindex", "--force"]) == 0 and list(load_index(root)) == ["a", "b"]
    assert not held.renew()  # the job that lost its lease notices at its next heartbeat
