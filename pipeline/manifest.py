"""OUTPUT/manifest.json: what the latents are and how they were made.

The manifest makes an output self-describing (model, factors, dtype, shapes, preprocessing) and
guards resumption: writing into an OUTPUT whose manifest has another fingerprint is refused.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from . import storage
from .layout import COMMITS_DIR, manifest_url

__all__ = [
    "FORMAT_VERSION",
    "DTYPES",
    "STORE_MODES",
    "Manifest",
    "ManifestError",
    "ManifestMismatch",
    "read_manifest",
    "write_manifest",
    "check_or_write_manifest",
    "code_version",
]

FORMAT_VERSION = 1
DTYPES = ("fp32", "fp16", "bf16")
STORE_MODES = ("mean", "mean+logvar", "sample")

# Fields whose difference makes two runs' shards incompatible in one OUTPUT.
FINGERPRINT_FIELDS = (
    "format",
    "dtype",
    "store",
    "flip",
    "model",
    "scaling_factor",
    "shift_factor",
    "latent_channels",
    "downsample_factor",
    "shapes",
    "preprocess",
)


class ManifestError(ValueError):
    """The manifest is missing, malformed or of an unsupported format version."""


class ManifestMismatch(ManifestError):
    """OUTPUT already holds a manifest whose fingerprint differs from the one being written."""

    def __init__(self, url: str, differences: list[str]):
        self.url = url
        self.differences = differences
        listing = "\n  ".join(differences)
        super().__init__(
            f"refusing to write into {url}: its manifest was made with a different fingerprint:\n  {listing}\n"
            "Use a new output path, or overwrite (output.overwrite=true) to discard the existing commits."
        )


def code_version() -> str:
    """Installed version of this package (recorded in manifests for provenance)."""
    try:
        from importlib.metadata import version

        v = version("latent-precompute")
    except Exception:
        v = "0+unknown"
    return v


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class Manifest:
    """Contents of OUTPUT/manifest.json.

    `model` is the model fingerprint (`{"preset", "config", "weights_sha256"}` as returned by
    `AutoencoderKL.fingerprint()`); `shapes` lists every latent shape `[C, h, w]` the output may
    contain (one for a fixed resolution, one per aspect bucket otherwise); `store` says what the
    `latent` column holds: the posterior mean ("mean"), the mean plus a `logvar` column
    ("mean+logvar"), or one posterior sample ("sample"); `flip` says whether the latents of the
    horizontally flipped images are stored too.
    """

    format: str = "parquet"
    dtype: str = "fp32"
    store: str = "mean"
    flip: bool = False
    model: dict[str, Any] = field(default_factory=dict)
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    latent_channels: int = 4
    downsample_factor: int = 8
    shapes: list[list[int]] = field(default_factory=list)
    preprocess: dict[str, Any] = field(default_factory=dict)
    code_version: str = field(default_factory=code_version)
    created: str = field(default_factory=_now)
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.format not in ("parquet", "wds"):
            raise ManifestError(f"manifest field 'format': {self.format!r} is not one of parquet, wds")
        if self.dtype not in DTYPES:
            raise ManifestError(f"manifest field 'dtype': {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.store not in STORE_MODES:
            raise ManifestError(f"manifest field 'store': {self.store!r} is not one of {', '.join(STORE_MODES)}")
        self.shapes = [[int(v) for v in s] for s in self.shapes]
        for s in self.shapes:
            if len(s) != 3:
                raise ManifestError(f"manifest field 'shapes': {s} is not [C, h, w]")

    @property
    def has_logvar(self) -> bool:
        return self.store == "mean+logvar"

    @property
    def fixed_shape(self) -> tuple[int, int, int] | None:
        """The single latent shape when every row has it, else None (aspect buckets)."""
        return tuple(self.shapes[0]) if len(self.shapes) == 1 else None  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        version = int(data.get("format_version", 1))
        if version > FORMAT_VERSION:
            raise ManifestError(
                f"manifest format_version {version} is newer than this code supports ({FORMAT_VERSION}); upgrade"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        # Unknown keys from a newer minor writer are kept rather than dropped.
        extra = dict(kwargs.get("extra") or {})
        extra.update({k: v for k, v in data.items() if k not in known})
        kwargs["extra"] = extra
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str | bytes, url: str = "manifest.json") -> Manifest:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ManifestError(f"{url} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ManifestError(f"{url} does not hold a JSON object")
        return cls.from_dict(data)

    def fingerprint(self) -> dict[str, Any]:
        """The fields two runs must agree on to share an OUTPUT."""
        d = self.to_dict()
        return {k: d[k] for k in FINGERPRINT_FIELDS}

    def differences(self, other: Manifest) -> list[str]:
        """Human-readable list of fingerprint differences, `path: existing -> new`."""
        out: list[str] = []
        _diff(self.fingerprint(), other.fingerprint(), "", out)
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


def _short(v: Any) -> str:
    text = json.dumps(v, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _diff(a: Any, b: Any, path: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            sub = f"{path}.{k}" if path else k
            if k not in a:
                out.append(f"{sub}: absent in existing manifest, new value {_short(b[k])}")
            elif k not in b:
                out.append(f"{sub}: existing value {_short(a[k])}, absent in new manifest")
            else:
                _diff(a[k], b[k], sub, out)
        return
    if isinstance(a, float) or isinstance(b, float):
        try:
            if float(a) == float(b):
                return
        except (TypeError, ValueError):
            pass
    if a != b:
        out.append(f"{path}: existing {_short(a)} != new {_short(b)}")


def read_manifest(root: str, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Read OUTPUT/manifest.json. Raises ManifestError when it is missing or malformed."""
    url = manifest_url(root)
    try:
        text = storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        raise ManifestError(f"no manifest at {storage.redact(url)}: not a latent output (or nothing written yet)") from None
    return Manifest.from_json(text, storage.redact(url))


def write_manifest(root: str, manifest: Manifest, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write OUTPUT/manifest.json as one whole object."""
    storage.put_bytes(manifest_url(root), manifest.to_json().encode(), storage_options)


def check_or_write_manifest(
    root: str,
    manifest: Manifest,
    storage_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Make sure OUTPUT's manifest matches `manifest`, writing it when OUTPUT has none.

    Returns the manifest in effect (the existing one when fingerprints agree, so its creation time
    is kept). A differing fingerprint raises `ManifestMismatch` naming each difference; with
    `overwrite=True` the existing commit records are deleted first (so no shard of the old run
    counts as done) and the new manifest replaces the old one.
    """
    url = manifest_url(root)
    try:
        text = storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        text = None
    if text is None:
        write_manifest(root, manifest, storage_options)
        return manifest
    try:
        existing = Manifest.from_json(text, storage.redact(url))
    except ManifestError:
        if not overwrite:
            raise
        existing = None
    if existing is not None:
        diffs = existing.differences(manifest)
        if not diffs:
            return existing
        if not overwrite:
            raise ManifestMismatch(storage.redact(root), diffs)
    _drop_commits(root, storage_options)
    write_manifest(root, manifest, storage_options)
    return manifest


def _drop_commits(root: str, storage_options: Mapping[str, Any] | None) -> None:
    commits = storage.join(root, COMMITS_DIR)
    for name in storage.list_files(commits, storage_options):
        storage.remove(storage.join(commits, name), storage_options)
