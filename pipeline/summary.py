"""OUTPUT/summary.json: the outcome of the last encode run, written by the driver, read by QA and inspect.

`EncodeSummary` is the one definition of that file: `to_dict` is what is written (every field,
plus the derived `shards_failed` and `exit_code`), `from_dict` reads it back. Readers take the
typed object from `read_summary` and never look up keys themselves. The fields are described
in the README ("What a run prints and writes").
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from . import storage
from .jsonutil import parse_object
from .layout import summary_url
from .progress import format_duration

__all__ = ["EncodeSummary", "FailedShard", "SummaryError", "SHARD_STAGES", "read_summary", "write_summary"]

#: Where a shard's thread spends its time (the keys of `stage_seconds`, timed by the encode
#: worker), as the printed summary names them; the rest of a shard's time is "other".
SHARD_STAGES: dict[str, str] = {
    "decode_wait": "waiting for decoded images",
    "encode": "encoding",
    "write_wait": "waiting for the writer",
    "commit": "committing",
}
_OTHER = "reading and batching"

class SummaryError(ValueError):
    """A summary.json that is not a run summary; the message names the field."""


@dataclass
class FailedShard:
    """A shard that did not commit, with its last error."""

    name: str
    url: str
    attempts: int
    error: str

    @classmethod
    def from_dict(cls, data: Any) -> FailedShard:
        if not isinstance(data, Mapping):
            raise SummaryError(f"field 'failed': expected objects, got {type(data).__name__}")
        return cls(
            name=_get(data, "name", str, "", "failed[].name"),
            url=_get(data, "url", str, "", "failed[].url"),
            attempts=_get(data, "attempts", int, 0, "failed[].attempts"),
            error=_get(data, "error", str, "", "failed[].error"),
        )


@dataclass
class EncodeSummary:
    """The outcome of one `encode` run (also written to OUTPUT/summary.json)."""

    output: str
    status: str = "ok"  # ok | failed | interrupted
    shards_total: int = 0
    shards_skipped: int = 0
    shards_committed: int = 0
    failed: list[FailedShard] = field(default_factory=list)
    images: int = 0
    errors: int = 0
    #: Bad samples by reason, keyed ``stage/error`` (see `pipeline.reasons`).
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    workers: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    started: str = ""
    finished: str = ""
    #: Seconds the committed shards took, summed over shards, and how they split (`SHARD_STAGES`).
    shard_seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    #: Images per encoder call the workers used (`ray.batch_size`, "auto" resolved).
    batch_sizes: list[int] = field(default_factory=list)
    #: Samples whose fp16/bf16 posterior held NaN or Inf and were encoded again in fp32, and how
    #: many of those were finite then and stored; the rest are ledger rows `encode/non_finite`.
    fp32_retries: int = 0
    fp32_recovered: int = 0
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0 when every shard is committed, 130 when interrupted, 1 otherwise."""
        if self.status == "interrupted":
            return 130
        if self.failed or self.shards_skipped + self.shards_committed < self.shards_total:
            return 1
        return 0

    # -- the file ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The summary.json document."""
        d = asdict(self)
        d["shards_failed"] = len(self.failed)
        d["exit_code"] = self.exit_code
        return d

    @classmethod
    def from_dict(cls, data: Any) -> EncodeSummary:
        """Read a summary.json document; absent fields take their defaults, unknown ones are ignored.

        Raises SummaryError naming the first field of the wrong type.
        """
        if not isinstance(data, Mapping):
            raise SummaryError(f"expected a JSON object, got {type(data).__name__}")
        d = cls(output="")
        return cls(
            output=_get(data, "output", str, d.output),
            status=_get(data, "status", str, d.status),
            shards_total=_get(data, "shards_total", int, d.shards_total),
            shards_skipped=_get(data, "shards_skipped", int, d.shards_skipped),
            shards_committed=_get(data, "shards_committed", int, d.shards_committed),
            failed=[FailedShard.from_dict(item) for item in _get(data, "failed", list, [])],
            images=_get(data, "images", int, d.images),
            errors=_get(data, "errors", int, d.errors),
            errors_by_reason={str(k): _number(v, int, f"errors_by_reason.{k}")
                              for k, v in _get(data, "errors_by_reason", dict, {}).items()},
            retries=_get(data, "retries", int, d.retries),
            workers=_get(data, "workers", int, d.workers),
            seconds=_get(data, "seconds", float, d.seconds),
            images_per_second=_get(data, "images_per_second", float, d.images_per_second),
            started=_get(data, "started", str, d.started),
            finished=_get(data, "finished", str, d.finished),
            shard_seconds=_get(data, "shard_seconds", float, d.shard_seconds),
            stage_seconds={str(k): _number(v, float, f"stage_seconds.{k}")
                           for k, v in _get(data, "stage_seconds", dict, {}).items()},
            batch_sizes=[_number(v, int, "batch_sizes") for v in _get(data, "batch_sizes", list, [])],
            fp32_retries=_get(data, "fp32_retries", int, d.fp32_retries),
            fp32_recovered=_get(data, "fp32_recovered", int, d.fp32_recovered),
            config=dict(_get(data, "config", dict, {})),
        )

    # -- reading it -------------------------------------------------------------------------------

    def stage_breakdown(self) -> dict[str, float]:
        """Shares of the shards' time: each of `SHARD_STAGES`, then "other" (reading, batching, rows)."""
        if self.shard_seconds <= 0:
            return {}
        shares = {k: self.stage_seconds.get(k, 0.0) / self.shard_seconds for k in SHARD_STAGES}
        shares["other"] = max(0.0, 1.0 - sum(shares.values()))
        return shares

    def bottleneck(self) -> str:
        """A one-line reading of `stage_breakdown`: which stage held the workers back."""
        shares = self.stage_breakdown()
        if not shares:
            return ""
        if shares["decode_wait"] >= 0.25:
            return ("bottleneck: decoding (the encoder waited for images): give workers more CPUs "
                    "(ray.num_cpus_per_worker) or, on GPUs, decode processes (ray.decode_mode)")
        if shares["write_wait"] + shares["commit"] >= 0.25:
            return "bottleneck: writing and uploading (the encoder waited for the writer): check the output storage"
        if shares["encode"] >= 0.6:
            return "bottleneck: the encoder (the device was busy): this is the pipeline's limit"
        return ""

    def finite_line(self) -> str:
        """What the finite-latent check did (`pipeline.finite`), or "" when every posterior was finite."""
        rejected = self.errors_by_reason.get("encode/non_finite", 0)
        if not self.fp32_retries and not rejected:
            return ""
        text = "finite latents: "
        if self.fp32_retries:
            text += (f"{self.fp32_retries:,} sample(s) with NaN/Inf in reduced precision encoded again in fp32, "
                     f"{self.fp32_recovered:,} of them stored; ")
        return text + f"{rejected:,} rejected as encode/non_finite"

    def render(self) -> str:
        """The summary as printed at the end of a run."""
        lines = [f"Encode summary for {self.output}: {self.status.upper()}"]
        lines.append(
            f"  shards: {self.shards_total} total, {self.shards_committed} committed now, "
            f"{self.shards_skipped} already committed, {len(self.failed)} failed"
        )
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.errors_by_reason.items(), key=lambda kv: -kv[1]))
        lines.append(f"  images: {self.images:,} encoded, {self.errors:,} bad samples" + (f" ({reasons})" if reasons else ""))
        lines.append(
            f"  time: {format_duration(self.seconds)}, {self.images_per_second:.1f} images/s on {self.workers} "
            f"worker(s), {self.retries} retr{'y' if self.retries == 1 else 'ies'}"
            + (f", batch {'/'.join(map(str, self.batch_sizes))}" if self.batch_sizes else "")
        )
        finite = self.finite_line()
        if finite:
            lines.append(f"  {finite}")
        stages = self.stage_breakdown()
        if stages:
            names = {**SHARD_STAGES, "other": _OTHER}
            lines.append("  shard time: " + ", ".join(f"{names[k]} {v:.0%}" for k, v in stages.items() if v >= 0.005))
            hint = self.bottleneck()
            if hint:
                lines.append(f"  {hint}")
        if self.failed:
            lines.append("  failed shards:")
            for f in self.failed:
                lines.append(f"    {f.name} ({f.url}) after {f.attempts} attempt(s): {f.error}")
            lines.append("  rerun the same command to retry them; committed shards are kept")
        return "\n".join(lines)


def read_summary(root: str, storage_options: Mapping[str, Any] | None = None) -> EncodeSummary | None:
    """OUTPUT/summary.json, or None when no run has written one.

    Raises SummaryError when the file is not a run summary (not JSON, or a field of the wrong
    type); other read errors (OSError) pass through.
    """
    try:
        data = storage.read_bytes(summary_url(root), storage_options)
    except FileNotFoundError:
        return None
    return EncodeSummary.from_dict(parse_object(data, "summary.json", SummaryError))


def write_summary(summary: EncodeSummary, root: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write OUTPUT/summary.json (sorted keys, indented)."""
    text = json.dumps(summary.to_dict(), indent=2, sort_keys=True) + "\n"
    storage.put_bytes(summary_url(root), text.encode(), storage_options)


def _number(value: Any, kind: type, name: str) -> Any:
    """An int or float field; JSON bools are not numbers, and an int field takes no fraction."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise SummaryError(f"field {name!r}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _get(data: Mapping[str, Any], key: str, kind: type, default: Any, name: str | None = None) -> Any:
    """data[key] checked against `kind` (`default` when absent); errors call the field `name` or `key`."""
    name = name or key
    if key not in data:
        return default
    value = data[key]
    if kind in (int, float):
        return _number(value, kind, name)
    if not isinstance(value, kind):
        raise SummaryError(f"field {name!r}: expected {kind.__name__}, got {type(value).__name__}")
    return value
