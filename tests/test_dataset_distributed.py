"""dataset.py in a real torch.distributed job: gloo ranks with an all_reduce per batch over uneven
shards finish every epoch with equal step counts (before, ranks got [32, 14] samples and the
collective hung)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import free_port
from output_builders import make_manifest, write_output

ROOT = Path(__file__).resolve().parent.parent

# One rank of the job: for each loader layout, two epochs, one all_reduce per batch. A rank with
# fewer batches than the others would leave them waiting in all_reduce until the timeout.
RANK_SCRIPT = r"""
import json, sys
from datetime import timedelta
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from pipeline.dataset import LatentDataset

root, buckets, out = sys.argv[1:4]
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank = dist.get_rank()
log = []
for name, url, workers, batched in (("plain-0", root, 0, False), ("plain-2", root, 2, False),
                                     ("buckets-2", buckets, 2, True)):
    ds = LatentDataset(url, shuffle_buffer=4)  # rank and world size from torch.distributed
    loader = (DataLoader(ds.batched(3), batch_size=None, num_workers=workers) if batched
              else DataLoader(ds, batch_size=4, num_workers=workers))
    for epoch in range(2):
        ds.set_epoch(epoch)
        steps, keys = 0, []
        for batch in loader:
            total = torch.tensor([len(batch["key"])])
            dist.all_reduce(total)
            steps += 1
            keys += batch["key"]
        log.append({"layout": name, "epoch": epoch, "steps": steps, "keys": keys, "len": len(ds)})
dist.barrier()
dist.destroy_process_group()
json.dump(log, open(f"{out}/rank{rank}.json", "w"))
"""


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    base = tmp_path_factory.mktemp("uneven")
    root, buckets = str(base / "plain"), str(base / "buckets")
    _, written = write_output(root, {"a": 23, "b": 9, "c": 14}, manifest=make_manifest("parquet", "fp16"),
                              row_group_rows=4)
    shapes = ((4, 4, 6), (4, 6, 4), (4, 4, 4))
    write_output(buckets, {"a": 23, "b": 9, "c": 14}, manifest=make_manifest("wds", "fp16", shapes=shapes))
    return root, buckets, {r.key for rows in written.values() for r in rows}


@pytest.mark.parametrize("world", [2, 3, 4])
def test_gloo_ranks_finish_with_equal_steps(uneven, tmp_path, world):
    root, buckets, keys = uneven
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, root, buckets, str(tmp_path)],
                         env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for r in range(world)
    ]
    try:
        outputs = [p.communicate(timeout=180)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:  # a hang fails the test instead of blocking the suite
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for entries in zip(*logs):
        layout, epoch = entries[0]["layout"], entries[0]["epoch"]
        assert len({e["steps"] for e in entries}) == 1, (layout, epoch, [e["steps"] for e in entries])
        seen = Counter(k for e in entries for k in e["keys"])
        assert len(seen) == 46, (layout, epoch)  # every sample of the epoch, padding repeats only
        if layout.startswith("plain"):
            assert set(seen) == keys
            assert [len(e["keys"]) for e in entries] == [-(-46 // world)] * world
            assert all(e["len"] == -(-46 // world) for e in entries)
            assert sum(seen.values()) - 46 < world
