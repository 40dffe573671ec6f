"""summary.py: the summary.json document written by the encode driver and read by QA and inspect."""

from __future__ import annotations

import json

import pytest

from pipeline import storage
from pipeline.layout import summary_url
from pipeline.summary import (
    SHARD_STAGES,
    EncodeSummary,
    FailedShard,
    SummaryError,
    read_summary,
    write_summary,
)


def _failed_run() -> EncodeSummary:
    return EncodeSummary(
        output="out", status="failed", shards_total=4, shards_skipped=1, shards_committed=2,
        failed=[FailedShard("00003", "in/00003.tar", 3, "ShardReadError: truncated")], images=20, errors=2,
        errors_by_reason={"decode/not_an_image": 2}, retries=2, workers=2, seconds=4.5, images_per_second=4.4,
        started="2024-01-01T00:00:00+00:00", finished="2024-01-01T00:00:05+00:00", shard_seconds=6.0,
        stage_seconds={"encode": 3.0, "commit": 1.5}, batch_sizes=[2, 4], config={"ray": {"workers": 2}},
    )


def test_written_and_read_back(tmp_path):
    summary = _failed_run()
    write_summary(summary, str(tmp_path))
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    # Every field, plus the two derived ones.
    assert on_disk["shards_failed"] == 1 and on_disk["exit_code"] == 1
    assert on_disk["failed"] == [{"name": "00003", "url": "in/00003.tar", "attempts": 3, "error": "ShardReadError: truncated"}]
    assert read_summary(str(tmp_path)) == summary
    assert read_summary(str(tmp_path / "elsewhere")) is None


def test_from_dict_defaults_and_errors_name_the_field(tmp_path):
    # A summary of an older version lacks newer fields: they take their defaults.
    old = EncodeSummary.from_dict({"output": "o", "status": "ok", "images": 3, "shards_failed": 0, "exit_code": 0})
    assert old == EncodeSummary(output="o", images=3)
    with pytest.raises(SummaryError, match="'images': expected an integer"):
        EncodeSummary.from_dict({"images": "3"})
    with pytest.raises(SummaryError, match=r"'failed\[\].attempts'"):
        EncodeSummary.from_dict({"failed": [{"name": "a", "attempts": 1.5}]})
    with pytest.raises(SummaryError, match="expected a JSON object"):
        EncodeSummary.from_dict([])
    storage.put_bytes(summary_url(str(tmp_path)), b"{not json")
    with pytest.raises(SummaryError, match="not valid JSON"):
        read_summary(str(tmp_path))


def test_exit_codes():
    assert EncodeSummary(output="o", shards_total=2, shards_skipped=1, shards_committed=1).exit_code == 0
    assert EncodeSummary(output="o", shards_total=2, shards_committed=1).exit_code == 1
    assert _failed_run().exit_code == 1
    assert EncodeSummary(output="o", status="interrupted").exit_code == 130


def test_shard_stages_are_the_workers():
    from pipeline.worker import STAGES

    assert tuple(SHARD_STAGES) == STAGES


def test_render_names_failed_shards():
    text = _failed_run().render()
    assert text.splitlines()[0] == "Encode summary for out: FAILED"
    assert "  shards: 4 total, 2 committed now, 1 already committed, 1 failed" in text
    assert "  images: 20 encoded, 2 bad samples (decode/not_an_image: 2)" in text
    assert ", 2 retries, batch 2/4" in text
    assert "    00003 (in/00003.tar) after 3 attempt(s): ShardReadError: truncated" in text


def test_summary_names_the_bottleneck():
    def summary(**stages):
        return EncodeSummary(output="out", shard_seconds=100.0, stage_seconds=stages)

    decode_bound = summary(decode_wait=60.0, encode=30.0, write_wait=1.0, commit=2.0)
    shares = decode_bound.stage_breakdown()
    assert shares["decode_wait"] == 0.6 and abs(shares["other"] - 0.07) < 1e-9
    text = decode_bound.render()
    assert "shard time: waiting for decoded images 60%, encoding 30%, waiting for the writer 1%" in text
    assert "bottleneck: decoding" in text and "ray.decode_mode" in text
    assert "bottleneck: the encoder" in summary(decode_wait=2.0, encode=90.0).render()
    assert "bottleneck: writing" in summary(encode=50.0, write_wait=20.0, commit=10.0).render()
    assert summary(decode_wait=20.0, encode=40.0).bottleneck() == ""  # no stage stands out
    assert "shard time" not in EncodeSummary(output="out").render()  # nothing committed: no line
