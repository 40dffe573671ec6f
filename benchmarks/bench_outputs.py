"""Several outputs from one read (`outputs:`) against one separate run per output.

    python -m benchmarks.bench_outputs --case decode    # large JPEGs, small targets: decoding dominates
    python -m benchmarks.bench_outputs --case encoder   # small JPEGs, 128 px: the encoder dominates

The N outputs (`--resolutions`, one per output; the first stores fp16, the others bf16, so they are
different outputs even at one resolution) run two ways on the same shards:

* separately: one single-output config per output, each `python -m pipeline encode` in a process of
  its own, one after the other (the time is the sum);
* in one pass: the config with `outputs:` listing them all, in one process.

Every run is timed as the other benchmarks time whole jobs (`common.ENCODE_JOB`): in a fresh process
that first starts a local Ray instance, from after `ray.init` to the end of the encode run, so
starting the actor and loading the model count. The variants alternate, the one that goes first
alternating too; the table shows medians over `--repeats` and the ratio of medians. In the decode
case the default targets (32 and 48 px from JPEGs of 3072 px, about 1.3 MB) get the same JPEG draft
reduction (1/8), so the outputs share one decode per image; on two CPU cores that is the case
where decoding dominates, as it does next to a GPU encoder with web-sized images.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from benchmarks import common

CASES = {
    "decode": {"source_side": 3072, "resolutions": "32,48", "shards": 2, "per_shard": 96},
    "encoder": {"source_side": 160, "resolutions": "128,128", "shards": 2, "per_shard": 96},
}


def _configs(work: Path, shards: list[str], args: argparse.Namespace) -> tuple[Path, list[Path]]:
    """The one-pass config and one single-output config per output, written as YAML."""
    resolutions = [int(r) for r in args.resolutions.split(",")]
    top = {
        "input": {"urls": shards},
        "output": {"format": "parquet"},
        "model": {"preset": args.preset, "dtype": args.dtype},
        "ray": {"workers": 1, "num_gpus_per_worker": 0, "num_cpus_per_worker": args.cpus,
                "batch_size": args.batch},
        "qa": {"samples": 8},
    }
    entries = [{"output": {"path": str(work / f"out-{i}"), "dtype": "fp16" if i == 0 else "bf16"},
                "preprocess": {"resolution": r}} for i, r in enumerate(resolutions)]
    multi = work / "multi.yaml"
    multi.write_text(yaml.safe_dump({**top, "outputs": entries}))
    singles = []
    for i, entry in enumerate(entries):
        path = work / f"single-{i}.yaml"
        path.write_text(yaml.safe_dump({**top, "output": {**top["output"], **entry["output"]},
                                        "preprocess": entry["preprocess"]}))
        singles.append(path)
    return multi, singles


def _clear(work: Path, outputs: int) -> None:
    for i in range(outputs):
        shutil.rmtree(work / f"out-{i}", ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=sorted(CASES), default="decode")
    p.add_argument("--resolutions", default=None, help="target size of each output, comma separated")
    p.add_argument("--source-side", type=int, default=None, help="shorter side of the JPEGs in the shards")
    p.add_argument("--shards", type=int, default=None)
    p.add_argument("--per-shard", type=int, default=None)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="compute dtype of the encoder")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    for key, value in CASES[args.case].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-outputs-"))
    shards = common.make_bench_shards(work / f"shards-{args.source_side}", args.shards, args.per_shard, args.source_side)
    multi, singles = _configs(work, shards, args)
    n = len(singles)
    payload = {"cpus": args.cpus, "gpus": 0}
    separate: list[float] = []
    one_pass: list[float] = []
    images = 0
    for r in range(args.repeats):
        for variant in (("separate", "one pass") if r % 2 == 0 else ("one pass", "separate")):
            _clear(work, n)
            if variant == "separate":
                runs = [common.run_script(common.ENCODE_JOB, {**payload, "config": str(c)}) for c in singles]
                separate.append(sum(run["seconds"] for run in runs))
                images = sum(run["images"] for run in runs)
            else:
                run = common.run_script(common.ENCODE_JOB, {**payload, "config": str(multi)})
                one_pass.append(run["seconds"])
                assert run["images"] == images or not images, (run["images"], images)
            print(f"repeat {r + 1}: {variant}: {(separate if variant == 'separate' else one_pass)[-1]:.2f} s",
                  flush=True)
    rows = [
        [f"{n} separate runs", images, common.median(separate), f"{min(separate):.2f}-{max(separate):.2f}"],
        [f"one pass, {n} outputs", images, common.median(one_pass), f"{min(one_pass):.2f}-{max(one_pass):.2f}"],
    ]
    ratio = common.median(one_pass) / common.median(separate)
    print(common.table(f"{args.case}: {args.shards} x {args.per_shard} JPEGs of {args.source_side} px -> "
                       f"{args.resolutions} px, {args.preset} {args.dtype}, {args.cpus} CPUs",
                       ["variant", "images written", "seconds (median)", "range"], rows))
    print(common.table("ratio", ["", "value"], [["one pass / separate runs", f"{ratio:.2f}"]]))
    if args.json:
        Path(args.json).write_text(json.dumps({"case": args.case, "args": vars(args), "separate": separate,
                                               "one_pass": one_pass, "ratio": ratio}, indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
