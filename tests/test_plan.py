"""Planning: brace and glob expansion, shard names, skipping committed shards."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.layout import shard_name
from pipeline.plan import PlanError, expand_braces, expand_urls, make_plan, qa_quotas
from pipeline.rows import LatentRow, QARow
from pipeline.writer import ShardWriter


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


def _commit(out: str, name: str, source: str, rows: int = 1, qa: int = 0) -> None:
    """A real committed shard `name` whose rows come from input `source`."""
    with ShardWriter(out, name, dtype="fp32") as w:
        w.write([LatentRow(key=f"{name}-{i}", source=source, index=i, latent=np.zeros((4, 2, 2), np.float32))
                 for i in range(rows)])
        w.add_qa_rows([QARow(key=f"{name}-{i}", source=source, bucket="2x2", pixels=np.zeros((2, 2, 3), np.uint8),
                             latent=np.zeros((4, 1, 1), np.float32)) for i in range(qa)])
        w.commit()


def test_plan_names_and_skips_committed(tmp_path):
    shards = tmp_path / "in"
    (shards / "x").mkdir(parents=True)
    for rel in ("00000.tar", "00001.tar", "x/00001.tar"):
        (shards / rel).write_bytes(b"")
    out = str(tmp_path / "out")
    urls = [str(shards / "*.tar"), str(shards / "x/00001.tar")]
    plan = make_plan(urls, out)
    names = [s.name for s in plan.shards]
    assert names == [shard_name(str(shards / rel)) for rel in ("00000.tar", "00001.tar", "x/00001.tar")]
    assert names[0].startswith("00000-") and len(set(names)) == 3  # same file name, different URLs
    assert [s.name for s in plan.todo] == names and not plan.done

    _commit(out, names[0], str(shards / "00000.tar"))
    plan = make_plan(urls, out)
    assert [s.name for s in plan.done] == [names[0]] and [s.name for s in plan.todo] == names[1:]


def test_plan_recognises_committed_shards_by_source_url(tmp_path):
    out = str(tmp_path / "out")
    a, b = str(tmp_path / "A" / "00000.tar"), str(tmp_path / "B" / "00000.tar")
    _commit(out, "00000", a)  # named by an older rule: it keeps its name
    plan = make_plan([b, a], out)
    assert [s.name for s in plan.done] == ["00000"] and [s.name for s in plan.todo] == [shard_name(b)]
    assert plan.done[0].url == a

    _commit(out, shard_name(b), "s3://elsewhere/00000.tar")  # B's name, held by another source
    with pytest.raises(PlanError, match="holds already from s3://elsewhere/00000.tar"):
        make_plan([b], out)


def test_plan_drops_the_same_shard_reached_by_two_urls(tmp_path):
    url = str(tmp_path / "00000.tar")
    plan = make_plan([url, "file://" + url], str(tmp_path / "out"))
    assert [s.url for s in plan.shards] == [url]


def test_qa_quotas_are_bounded_and_deterministic():
    names = [f"{i:05d}-x" for i in range(5000)]
    quotas = qa_quotas(names, 64)
    assert len(quotas) == 64 and set(quotas.values()) == {1}
    assert qa_quotas(list(reversed(names)), 64) == quotas  # the names decide, not their order
    few = qa_quotas(names[:3], 64)
    assert few == dict.fromkeys(names[:3], 22)  # ceil(64 / 3): fewer than 2 x 64 in all
    assert qa_quotas(names, 64, committed_qa_rows=60) == {n: 1 for n in list(quotas)[:4]}
    assert qa_quotas(names, 64, committed_qa_rows=64) == {} and qa_quotas(names, 0) == {}


def test_plan_gives_qa_quotas_to_todo_shards_only(tmp_path):
    out = str(tmp_path / "out")
    urls = [str(tmp_path / f"{i:05d}.tar") for i in range(40)]
    plan = make_plan(urls, out, qa_samples=8)
    carriers = {s.name: s.qa_rows for s in plan.todo if s.qa_rows}
    assert sum(carriers.values()) == 8 and len(carriers) == 8
    first = next(s for s in plan.todo if s.qa_rows)
    _commit(out, first.name, first.url, rows=1, qa=1)
    again = make_plan(urls, out, qa_samples=8)
    assert sum(s.qa_rows for s in again.todo) == 7 and first.name not in {s.name for s in again.todo}
