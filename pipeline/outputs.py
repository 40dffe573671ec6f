"""Several OUTPUTs from one read: what the outputs of a config with `outputs:` share.

Each entry of `outputs:` is a complete job config of its own (`JobConfig.output_jobs`) and is
written as a complete OUTPUT: manifest, commits, ledger, index, summary, QA report. One pass over
the inputs (`pipeline.multi_driver`, `pipeline.fanout`) reads each input shard once and

* decodes each image once per distinct decode limits and JPEG draft reduction: the reduction
  follows the target size, so outputs whose targets ask for the same one share one decode, and
  the others decode again (their pixels would differ from their single runs' otherwise;
  `pipeline.decodepool.prepare_all`);
* preprocesses once per distinct preprocessing (`OutputParts.preparation_of`);
* encodes with each output's model, loaded once per distinct model section
  (`OutputParts.model_of`): outputs differing only in what they store share the weights;
* batches, encodes, writes and commits each output as its single run would, so each output's
  rows equal those of a single-output run of its config, row for row.

Device memory: a worker holds every distinct model on its device and the outputs encode side by
side, so each output's batch size is checked against 1/N of the worker's memory share (N
outputs). A batch that does not fit is logged as a warning naming `ray.batch_size` and a batch
that fits, as for one output; then lower the batch size, or write the outputs in separate runs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .config import JobConfig, ModelConfig

__all__ = ["OutputParts", "model_key", "preparation_key"]


def model_key(model: ModelConfig) -> str:
    """Identity of a `model` section: outputs with equal keys share one loaded model."""
    return json.dumps(dataclasses.asdict(model), sort_keys=True)


def preparation_key(job: JobConfig) -> str:
    """Identity of an output's image preparation (decode limits, target sizes, crop): outputs
    with equal keys get the same pixels and share them."""
    p = job.preprocess
    return json.dumps({
        "sizes": p.target_sizes(), "crop": p.crop, "seed": p.seed, "min_size": p.min_size,
        "background": list(p.background), "max_pixels": p.max_pixels,
    }, sort_keys=True)


@dataclass(frozen=True)
class OutputParts:
    """The outputs of a config and the parts they share.

    jobs: one config per output, in config order.
    models: the distinct `model` sections; `model_of[i]` is output i's.
    preparation_of: output i's index among the distinct preparations (in order of first use).
    """

    jobs: list[JobConfig]
    models: list[ModelConfig]
    model_of: list[int]
    preparation_of: list[int]

    @property
    def preparations(self) -> int:
        """How many distinct preparations the outputs need."""
        return max(self.preparation_of) + 1

    @classmethod
    def of(cls, config: JobConfig) -> OutputParts:
        jobs = config.output_jobs()
        models: dict[str, int] = {}
        preparations: dict[str, int] = {}
        model_of, preparation_of = [], []
        distinct: list[ModelConfig] = []
        for job in jobs:
            key = model_key(job.model)
            if key not in models:
                models[key] = len(distinct)
                distinct.append(job.model)
            model_of.append(models[key])
            preparation_of.append(preparations.setdefault(preparation_key(job), len(preparations)))
        return cls(jobs=jobs, models=distinct, model_of=model_of, preparation_of=preparation_of)
