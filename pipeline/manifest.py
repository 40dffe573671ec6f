"""OUTPUT/manifest.json: what the latents are and how they were made.

The manifest makes an output self-describing (model, factors, dtype, shapes, preprocessing) and
guards resumption: writing into an OUTPUT whose manifest has another fingerprint is refused.
`build_manifest` makes it from a job config and the loaded model; `check_sizes` refuses target
sizes that the model cannot encode.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import storage
from .config import ConfigError, JobConfig, TextEncoderConfig
from .jsonutil import jsonable, parse_object, utc_now
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
    "build_manifest",
    "check_sizes",
]

FORMAT_VERSION = 1
#: Stored latent dtypes (`output.dtype`); fp8_e4m3 has a per-sample, per-channel scale (`schema.fp8_scale`).
DTYPES = ("fp32", "fp16", "bf16", "fp8_e4m3")
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
    "text",
)

# What a text encoder's manifest entry holds only once the encoder is loaded (weights and
# tokenizer digests, output shapes); see `Manifest.differences`.
_TEXT_LOADED = ("model", "shapes")


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


@dataclass
class Manifest:
    """Contents of OUTPUT/manifest.json.

    `model` is the model fingerprint (`{"preset", "config", "weights_sha256"}` as returned by
    `AutoencoderKL.fingerprint()`); `shapes` lists every latent shape `[C, h, w]` the output may
    contain (one for a fixed resolution, one per aspect bucket otherwise); `store` says what the
    `latent` column holds: the posterior mean ("mean"), the mean plus a `logvar` column
    ("mean+logvar"), or one posterior sample ("sample"); `flip` says whether the latents of the
    horizontally flipped images are stored too. `text` maps each caption encoder's name to how
    its outputs were made and stored (config, model class and digests, output shapes; see
    `pipeline.text`); empty when only latents are stored.
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
    text: dict[str, Any] = field(default_factory=dict)
    code_version: str = field(default_factory=code_version)
    created: str = field(default_factory=utc_now)
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
        return jsonable(dataclasses.asdict(self))

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
        return cls.from_dict(parse_object(text, url, ManifestError))

    def fingerprint(self) -> dict[str, Any]:
        """The fields two runs must agree on to share an OUTPUT."""
        d = self.to_dict()
        return {k: d[k] for k in FINGERPRINT_FIELDS}

    def differences(self, other: Manifest) -> list[str]:
        """Human-readable list of fingerprint differences, `path: existing -> new`.

        A text encoder entry of `other` without the loaded facts (a manifest built from the config
        alone, by a rerun with nothing to do) is compared on its configuration only.
        """
        mine, theirs = self.fingerprint(), other.fingerprint()
        for name, entry in theirs["text"].items():
            if name in mine["text"] and not any(k in entry for k in _TEXT_LOADED):
                mine["text"][name] = {k: v for k, v in mine["text"][name].items() if k not in _TEXT_LOADED}
        out: list[str] = []
        _diff(mine, theirs, "", out)
        return out


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


def check_sizes(config: JobConfig, factor: int) -> None:
    """Every target size must be divisible by the model's downsampling factor."""
    p = config.preprocess
    key = "preprocess.buckets" if p.buckets else "preprocess.resolution"
    for i, (h, w) in enumerate(p.target_sizes()):
        if h % factor or w % factor:
            where = f"{key}[{i}]" if p.buckets else key
            raise ConfigError(where, f"{h}x{w} is not divisible by the model's downsampling factor {factor}")


def build_manifest(config: JobConfig, model: Any, text: Mapping[str, Mapping[str, Any]] | None = None) -> Manifest:
    """The output manifest for this config and loaded model (an `AutoencoderKL`).

    `text` holds the loaded facts of the config's text encoders (`TextEncoders.facts()`); without
    it their entries hold their configuration only (see `Manifest.differences`).
    """
    factor = int(model.downsample_factor)
    channels = int(model.latent_channels)
    sizes = config.preprocess.target_sizes()
    fingerprint = dict(model.fingerprint())
    # The compute dtype changes the latents' low bits: runs sharing an OUTPUT must agree on it.
    fingerprint["compute_dtype"] = config.model.dtype
    p = config.preprocess
    return Manifest(
        format=config.output.format,
        dtype=config.output.dtype,
        store=config.output.store,
        flip=config.output.flip,
        model=fingerprint,
        scaling_factor=float(model.scaling_factor),
        shift_factor=float(model.shift_factor),
        latent_channels=channels,
        downsample_factor=factor,
        shapes=[[channels, h // factor, w // factor] for h, w in sizes],
        preprocess={
            "sizes": [[h, w] for h, w in sizes],
            "buckets": p.buckets is not None,
            "crop": p.crop,
            "seed": p.seed,
            "background": list(p.background),
            "resize": "shorter side to cover the target, Lanczos over the crop box; JPEG draft decoding",
            "min_size": p.min_size,
            "max_pixels": p.max_pixels,
            # Absent means no limit, as in outputs made before the limit existed (they resume).
            **({"max_upscale": p.max_upscale} if p.max_upscale is not None else {}),
            "image_exts": list(config.input.image_exts),
            "caption_key": config.input.caption_key,
        },
        text={t.name: _text_entry(t, (text or {}).get(t.name)) for t in config.text},
    )


def _text_entry(t: TextEncoderConfig, loaded: Mapping[str, Any] | None) -> dict[str, Any]:
    """The manifest entry of text encoder `t`, with its loaded facts when given."""
    entry = {
        "kind": t.kind,
        "max_length": t.max_length,
        "padding": t.padding,
        "outputs": list(t.outputs),
        "compute_dtype": t.dtype,
        "storage_dtype": t.storage_dtype,
    }
    entry.update(loaded or {})
    return entry
