"""Planning: brace and glob expansion, shard names, skipping committed shards."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.plan import PlanError, expand_braces, expand_urls, make_plan
from pipeline.writer import LatentRow, ShardWriter


def test_brace_ranges_and_alternatives():
    assert expand_braces("s3://b/{00000..00002}.tar") == ["s3://b/00000.tar", "s3://b/00001.tar", "s3://b/00002.tar"]
    assert expand_braces("x{8..10}") == ["x8", "x9", "x10"]
    assert expand_braces("x{08..10}") == ["x08", "x09", "x10"]
    assert expand_braces("{0..6..3}") == ["0", "3", "6"]
    assert expand_braces("{train,val}/{0..1}.tar") == ["train/0.tar", "train/1.tar", "val/0.tar", "val/1.tar"]
    assert expand_braces("{a,b{1..2}}c") == ["ac", "b1c", "b2c"]
    assert expand_braces("lit{x}") == ["lit{x}"]
    with pytest.raises(PlanError, match="unbalanced"):
        expand_braces("a{0..2")


def test_globs_lists_and_duplicates(tmp_path):
    for name in ("b.tar", "a.tar", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.tar").write_bytes(b"")
    urls = expand_urls([str(tmp_path / "*.tar"), str(tmp_path / "a.tar"), str(tmp_path / "sub/{a,b}.tar")])
    assert urls == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar"), str(tmp_path / "sub/a.tar"),
                    str(tmp_path / "sub/b.tar")]
    with pytest.raises(PlanError, match="matches no files"):
        expand_urls(str(tmp_path / "*.tgz"))


def test_plan_names_and_skips_committed(tmp_path):
    shards = tmp_path / "in"
    (shards / "x").mkdir(parents=True)
    for rel in ("00000.tar", "00001.tar", "x/00001.tar"):
        (shards / rel).write_bytes(b"")
    out = str(tmp_path / "out")
    plan = make_plan([str(shards / "*.tar"), str(shards / "x/00001.tar")], out)
    names = [s.name for s in plan.shards]
    assert names[0] == "00000" and len(set(names)) == 3  # colliding base names made unique
    assert [s.name for s in plan.todo] == names and not plan.done

    with ShardWriter(out, "00000", dtype="fp32") as w:
        w.write([LatentRow(key="k", source="s", index=0, latent=np.zeros((4, 2, 2), np.float32))])
        w.commit()
    plan = make_plan([str(shards / "*.tar"), str(shards / "x/00001.tar")], out)
    assert [s.name for s in plan.done] == ["00000"]
    assert "00000" not in [s.name for s in plan.todo] and len(plan.todo) == 2
