"""The job configuration: one YAML file, typed and validated before any work starts.

A config has six sections (`input`, `output`, `model`, `preprocess`, `ray`, `qa`), an optional
`text` list of caption encoders and an optional `outputs` list (several OUTPUTs from one read, see
`OUTPUT_ENTRY_SECTIONS`); each section is a
dataclass below, and every field's type annotation is the validation rule. `load_config` reads
the YAML, applies `key.sub=value` overrides from the command line, expands `${ENV_VAR}`
references in strings and checks every key and value. Anything wrong raises `ConfigError`
naming the key, e.g. ``output.dtype: expected one of fp32|fp16|bf16|fp8_e4m3, got 'fp64'``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

__all__ = [
    "ConfigError",
    "IMAGE_EXTS",
    "InputConfig",
    "OutputConfig",
    "ModelConfig",
    "PreprocessConfig",
    "RayConfig",
    "QAConfig",
    "TextEncoderConfig",
    "TEXT_OUTPUTS",
    "JobConfig",
    "load_config",
    "config_from_dict",
    "apply_overrides",
]

DType = Literal["fp32", "fp16", "bf16"]
#: Stored latent dtypes: the compute dtypes, and one byte per value with a per-channel scale.
StorageDType = Literal["fp32", "fp16", "bf16", "fp8_e4m3"]

#: Extensions of the image formats the job decodes by default: the default `input.image_exts`
#: (tar member extensions, in order of preference) and the image files `make-shards` takes.
IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")


class ConfigError(ValueError):
    """An invalid configuration; the message starts with the dotted key at fault."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


@dataclass
class InputConfig:
    """Where the WebDataset shards are and how samples are read from them."""

    #: A brace pattern (``s3://b/{00000..00099}.tar``), a glob, or a list of those.
    urls: str | list[str]
    #: fsspec options for the input filesystem (endpoint_url, anon, client_kwargs, ...).
    storage_options: dict[str, Any] = field(default_factory=dict)
    #: Member extensions that hold the image, in order of preference.
    image_exts: list[str] = field(default_factory=lambda: list(IMAGE_EXTS))
    #: Caption source: a member extension (``txt``) or ``json:FIELD`` for a field of the sample's JSON.
    caption_key: str = "txt"


@dataclass
class OutputConfig:
    """Where latents go and what is stored."""

    #: Any fsspec URL (local path, s3://bucket/prefix, ...).
    path: str
    format: Literal["parquet", "wds"] = "parquet"
    #: Storage dtype of latents (the encoder always computes an fp32 posterior); fp8_e4m3 stores
    #: one byte per value with a per-sample, per-channel scale (see `pipeline.schema`).
    dtype: StorageDType = "fp16"
    #: What to store: the posterior mean, mean plus log-variance, or one seeded sample.
    store: Literal["mean", "mean+logvar", "sample"] = "mean"
    #: Also store the latent of the horizontally flipped image.
    flip: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)
    #: Allow writing into an OUTPUT whose manifest differs (the old shards are redone).
    overwrite: bool = False


@dataclass
class ModelConfig:
    """Which autoencoder encodes, and how it computes."""

    #: A `latentae` preset name (sd, sdxl, sd3, flux, kl-f4, kl-f16, kl-f32, seed-f16c16, tiny).
    preset: str | None = "tiny"
    #: Weights: a diffusers folder or a .safetensors/.ckpt file, local or any fsspec URL.
    weights: str | None = None
    #: fsspec options for a remote `weights` URL (e.g. an S3-compatible endpoint).
    storage_options: dict[str, Any] = field(default_factory=dict)
    #: Compute dtype on the device (autocast); the posterior is returned in fp32.
    dtype: DType = "fp32"
    #: Channels-last memory format; "auto": on CPU (measured faster there), off on CUDA (slower
    #: on the H200 for the SD encoder).
    channels_last: bool | Literal["auto"] = "auto"
    compile: bool = False
    #: On CUDA, replay the encoder as a captured CUDA graph per batch shape (ignored with `compile`).
    cuda_graphs: bool = True

    def channels_last_on(self, device_type: str) -> bool:
        """`channels_last` resolved for a device type ("cpu", "cuda", ...)."""
        if self.channels_last == "auto":
            return device_type == "cpu"
        return bool(self.channels_last)


@dataclass
class PreprocessConfig:
    """Resize and crop policy: a fixed resolution or aspect-ratio buckets."""

    #: Square side (256) or [height, width]; ignored when `buckets` is set.
    resolution: int | list[int] | None = 256
    #: Aspect-ratio buckets: a list of [height, width] of about equal area.
    buckets: list[list[int]] | None = None
    crop: Literal["center", "random"] = "center"
    #: Seed of the per-key random crop (and of `output.store: sample`).
    seed: int = 0
    #: Images whose shorter side is below this many pixels are skipped (ledger: too_small).
    min_size: int = 0
    #: Colour that transparent pixels are composited onto: [r, g, b].
    background: list[int] = field(default_factory=lambda: [255, 255, 255])
    #: Decompression-bomb limit: images with more pixels are skipped (ledger: too_large).
    max_pixels: int = 89_478_485
    #: Largest factor an image may be enlarged by to cover its target; smaller images are skipped
    #: (ledger: preprocess/too_small). null: no limit.
    max_upscale: float | None = 4.0

    def target_sizes(self) -> list[tuple[int, int]]:
        """All output (height, width) sizes: the buckets, or the one resolution."""
        if self.buckets:
            return [(int(h), int(w)) for h, w in self.buckets]
        res = self.resolution
        if isinstance(res, int):
            return [(res, res)]
        assert res is not None  # validated
        return [(int(res[0]), int(res[1]))]


@dataclass
class RayConfig:
    """Cluster and worker settings."""

    #: Ray address ("auto", "ray://host:10001", ...); unset: RAY_ADDRESS or a new local instance.
    address: str | None = None
    #: Seconds to wait for a "host:port" address to answer before giving up.
    connect_timeout: float = 30.0
    #: Number of encode actors; unset: one per GPU, or CPUs / num_cpus_per_worker without GPUs.
    workers: int | None = None
    #: GPUs per actor (fractions share a GPU); unset: 1 when the cluster has GPUs, else 0.
    num_gpus_per_worker: float | None = None
    #: CPUs reserved per actor; they run the decode threads (and the encoder on CPU).
    num_cpus_per_worker: float = 1.0
    #: Images per encoder call (per bucket shape); "auto": about 4 megapixels on a GPU (64 images
    #: at 256 px, at most 128), about 1 on a CPU (16 at 256 px, at most 16); see batch_size.py.
    batch_size: int | Literal["auto"] = "auto"
    #: Attempts per shard before it is recorded as failed.
    max_attempts: int = 3
    #: Shards one actor encodes at the same time; unset: 2 on GPU actors (the next shard's reading
    #: and decoding overlap the last batches and the commit of the previous one), 1 on CPU actors
    #: (where two shards would only split the same cores).
    max_in_flight_per_worker: int | None = None
    #: Decoders per actor (threads or processes, see decode_mode); unset: num_cpus_per_worker
    #: (two fewer on GPU actors with 4 or more CPUs).
    decode_threads: int | None = None
    #: Where decoding runs: "threads" of the actor's process, or "processes" of its own (no GIL
    #: shared with the encoder's thread); "auto": processes on GPU actors with 8 or more decoders,
    #: else threads.
    decode_mode: Literal["auto", "threads", "processes"] = "auto"
    #: Seconds one image may take to decode in a decode process before the process is ended and
    #: the image recorded as a timeout (processes only: a thread cannot be stopped).
    decode_timeout: float = 120.0

    def shards_in_flight(self, *, gpu: bool) -> int:
        """`max_in_flight_per_worker`, or its default for an actor with (or without) a GPU."""
        if self.max_in_flight_per_worker is not None:
            return self.max_in_flight_per_worker
        return 2 if gpu else 1


@dataclass
class QAConfig:
    """Reconstruction QA settings (read by the QA stage)."""

    #: Images kept during encoding and decoded by QA, over the whole run.
    samples: int = 64
    min_psnr: float = 20.0
    max_nan: int = 0
    #: Allowed relative disagreement between measured and configured scaling/shift.
    stats_tolerance: float = 0.5
    #: Local path of LPIPS backbone weights; unset: LPIPS is off.
    lpips_weights: str | None = None
    batch_size: int = 8
    workers: int = 1


#: What a text encoder can store per caption: the last hidden state, the hidden state of the
#: layer before it (what SDXL conditions on), the pooled output, the projected pooled output.
TEXT_OUTPUTS = ("last", "penultimate", "pooled", "projected")


@dataclass
class TextEncoderConfig:
    """One caption encoder of the `text` section: a transformers model and its tokenizer.

    Its outputs are stored beside the latents as columns `<name>_<output>`, plus `<name>_length`
    (the caption's tokens, special tokens included; see `pipeline.text`).
    """

    #: Column prefix: lowercase letters, digits and underscores, starting with a letter.
    name: str
    #: clip (CLIPTextModel, or CLIPTextModelWithProjection when `projected` is stored), t5
    #: (T5EncoderModel), or the name of another transformers model class (UMT5EncoderModel, ...).
    kind: str
    #: A transformers model folder (config.json + weights), or a diffusers-style folder holding
    #: text_encoder/ and tokenizer/; local or any fsspec URL (copied once per machine).
    path: str
    #: Tokens per caption; longer captions are truncated as the tokenizer truncates them.
    max_length: int
    #: Which outputs to store, of TEXT_OUTPUTS.
    outputs: list[Literal["last", "penultimate", "pooled", "projected"]]
    #: Tokenizer folder; unset: `path` itself when it holds tokenizer files, else the diffusers
    #: sibling of the model folder (text_encoder_2/ -> tokenizer_2/).
    tokenizer: str | None = None
    #: max_length: the model sees the caption padded to max_length without an attention mask, as
    #: the SD/SDXL/FLUX pipelines feed CLIP, and every position is stored. none: the model sees the
    #: real tokens only (attention mask) and only those are stored, with their count. auto: max_length
    #: for clip, none for every other kind.
    padding: Literal["auto", "max_length", "none"] = "auto"
    #: Compute dtype of the model on the device.
    dtype: DType = "fp32"
    #: Storage dtype of the stored outputs.
    storage_dtype: DType = "fp16"
    #: fsspec options for a remote `path` or `tokenizer`.
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobConfig:
    """A whole validated job configuration."""

    input: InputConfig
    output: OutputConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    qa: QAConfig = field(default_factory=QAConfig)
    #: Caption encoders whose outputs are stored beside the latents; empty: images only.
    text: list[TextEncoderConfig] = field(default_factory=list)
    #: With an `outputs:` list, each entry's whole config (the top-level sections with the entry's
    #: overrides merged in, key by key); the top-level `output.path` is then empty. Empty: the job
    #: writes `output` alone.
    outputs: list[JobConfig] = field(default_factory=list)
    #: The YAML file this came from (not a config key).
    source: str | None = field(default=None, metadata={"internal": True})

    def output_jobs(self) -> list[JobConfig]:
        """One config per OUTPUT the job writes: the `outputs` entries, or this config alone."""
        return list(self.outputs) or [self]

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        """Plain-dict form; with `redact`, secret storage options and URL credentials are masked."""
        out = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("internal") or f.name == "outputs":
                continue
            value = getattr(self, f.name)
            out[f.name] = [dataclasses.asdict(v) for v in value] if isinstance(value, list) else dataclasses.asdict(value)
        if redact:
            from .storage import redact as redact_url
            from .storage import redact_options

            for section in ("input", "output", "model"):
                out[section]["storage_options"] = redact_options(out[section]["storage_options"])
            urls = out["input"]["urls"]
            out["input"]["urls"] = [redact_url(u) for u in urls] if isinstance(urls, list) else redact_url(urls)
            out["output"]["path"] = redact_url(out["output"]["path"])
            if out["model"]["weights"]:
                out["model"]["weights"] = redact_url(out["model"]["weights"])
            for encoder in out["text"]:
                encoder["storage_options"] = redact_options(encoder["storage_options"])
                encoder["path"] = redact_url(encoder["path"])
                if encoder["tokenizer"]:
                    encoder["tokenizer"] = redact_url(encoder["tokenizer"])
        if self.outputs:
            out["outputs"] = [job.to_dict(redact) for job in self.outputs]
        return out


SECTIONS: dict[str, type] = {
    "input": InputConfig,
    "output": OutputConfig,
    "model": ModelConfig,
    "preprocess": PreprocessConfig,
    "ray": RayConfig,
    "qa": QAConfig,
}
#: The sections an `outputs:` entry may override; the others are shared by every output.
OUTPUT_ENTRY_SECTIONS = ("output", "model", "preprocess")


# ---------------------------------------------------------------------------------------------
# loading


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> JobConfig:
    """Read the YAML file at `path`, apply `key.sub=value` overrides and validate everything."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError("", f"config file not found: {p}") from None
    except OSError as e:
        raise ConfigError("", f"cannot read config file {p}: {e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError("", f"{p} is not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("", f"{p}: the top level must be a mapping of sections, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    config = config_from_dict(raw)
    config.source = str(p)
    return config


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each ``key.sub=value`` set; the value is parsed as YAML."""
    out = _deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like key.sub=value")
        key, _, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(key, "an override key must name a section and a field, e.g. ray.workers=4")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(key, f"cannot parse override value {text!r}: {e}") from None
        node: Any = out
        for i, part in enumerate(parts[:-1]):
            where = ".".join(parts[: i + 1])
            # A list (`outputs`, `text`) is addressed by entry number: outputs.1.preprocess.resolution=512.
            nxt = _list_entry(node, part, where) if isinstance(node, list) else node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, (dict, list)):
                raise ConfigError(where, "is not a section; cannot set a sub-key")
            node = nxt
        if isinstance(node, list):
            raise ConfigError(key, "names a list entry, not a key: set the entry's keys, e.g. outputs.0.output.dtype=bf16")
        node[parts[-1]] = value
    return out


def _list_entry(items: list[Any], part: str, where: str) -> Any:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(where, f"no such entry: the list has {len(items)} (numbered from 0)")
    return items[int(part)]


def _deepcopy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deepcopy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deepcopy(v) for v in value]
    return value


def config_from_dict(raw: Mapping[str, Any]) -> JobConfig:
    """Validate a plain mapping (parsed YAML) into a `JobConfig`."""
    if not isinstance(raw, Mapping):
        raise ConfigError("", f"expected a mapping of sections, got {type(raw).__name__}")
    _check_unknown("", raw, [*SECTIONS, "text", "outputs"])
    if raw.get("outputs") is not None:
        return _config_with_outputs(raw, raw["outputs"])
    for name in ("input", "output"):
        if name not in raw or raw[name] is None:
            raise ConfigError(name, "required section is missing")
    sections = {}
    for name, cls in SECTIONS.items():
        value = raw.get(name)
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(name, f"expected a mapping, got {_show(value)}")
        sections[name] = _build(cls, value, name)
    config = JobConfig(**sections, text=_build_text(raw.get("text")))
    _check_semantics(config)
    return config


def _config_with_outputs(raw: Mapping[str, Any], entries: Any) -> JobConfig:
    """A config with an `outputs:` list: each entry's sections are the top-level ones with the
    entry's keys merged in (one level deep: `output: {dtype: bf16}` changes only the dtype), and
    each entry sets its own `output.path`. Errors in an entry are named `outputs.N.section.key`,
    as overrides address it."""
    if not isinstance(entries, list) or not entries:
        raise ConfigError("outputs", f"expected a non-empty list of output entries, got {_show(entries)}")
    if (raw.get("output") or {}).get("path") is not None:
        raise ConfigError("output.path", "with outputs: set each entry's own output.path instead")
    shared = {k: v for k, v in raw.items() if k != "outputs"}
    # The top-level sections must hold on their own (with a stand-in path), so their errors name
    # the top-level key; the entries only override them.
    first = entries[0].get("output") if isinstance(entries[0], Mapping) else None
    stand_in = first.get("path") if isinstance(first, Mapping) and isinstance(first.get("path"), str) else "-"
    top = config_from_dict({**shared, "output": {**(shared.get("output") or {}), "path": stand_in}})
    jobs: list[JobConfig] = []
    paths: dict[str, int] = {}
    for i, entry in enumerate(entries):
        where = f"outputs.{i}"
        if not isinstance(entry, Mapping):
            raise ConfigError(where, f"expected a mapping of {', '.join(OUTPUT_ENTRY_SECTIONS)}, got {_show(entry)}")
        _check_unknown(where, entry, list(OUTPUT_ENTRY_SECTIONS))
        merged = dict(shared)
        for name in OUTPUT_ENTRY_SECTIONS:
            section, override = shared.get(name) or {}, entry.get(name) or {}
            for key, value in ((name, section), (f"{where}.{name}", override)):
                if not isinstance(value, Mapping):
                    raise ConfigError(key, f"expected a mapping, got {_show(value)}")
            merged[name] = {**section, **override}
        if "path" not in (entry.get("output") or {}):
            raise ConfigError(f"{where}.output.path", "required key is missing: each output has its own path")
        try:
            job = config_from_dict(merged)
        except ConfigError as e:
            raise ConfigError(f"{where}.{e.key}", str(e)[len(e.key) + 2 :] if e.key else str(e)) from None
        path = job.output.path.rstrip("/")
        if path in paths:
            raise ConfigError(f"{where}.output.path", f"is also the path of outputs.{paths[path]}")
        paths[path] = i
        jobs.append(job)
    top.output.path = ""
    top.outputs = jobs
    return top


def _build_text(raw: Any) -> list[TextEncoderConfig]:
    """The `text` section: a list of encoder mappings (null or absent: no text encoders)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError("text", f"expected a list of text encoders, got {_show(raw)}")
    encoders = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise ConfigError(f"text[{i}]", f"expected a mapping, got {_show(item)}")
        encoders.append(_build(TextEncoderConfig, item, f"text[{i}]"))
    return encoders


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_unknown(prefix, raw, list(fields))
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}"
        if name in raw:
            kwargs[name] = _coerce(_expand_env(raw[name], key), hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(key, "required key is missing")
    return cls(**kwargs)


def _check_unknown(prefix: str, raw: Mapping[str, Any], known: list[str]) -> None:
    for k in raw:
        if k not in known:
            key = f"{prefix}.{k}" if prefix else str(k)
            close = difflib.get_close_matches(str(k), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(key, f"unknown key{hint}; known keys: {', '.join(known)}")


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, key: str) -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in strings (so secrets stay out of YAML files)."""
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            var, default = m.group(1), m.group(2)
            if var in os.environ:
                return os.environ[var]
            if default is not None:
                return default
            raise ConfigError(key, f"environment variable {var} is not set (referenced as ${{{var}}})")

        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def _show(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return f"a {type(value).__name__}"
    return repr(value)


def _type_name(tp: Any, plural: bool = False) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a, plural) for a in typing.get_args(tp))
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"{'lists' if plural else 'a list'} of {_type_name(arg, plural=True)}"
    if origin is dict:
        return "mappings" if plural else "a mapping"
    if tp is Any:
        return "any values" if plural else "any value"
    names = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("true or false", "booleans"),
             str: ("a string", "strings")}
    if tp in names:
        return names[tp][plural]
    return str(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widened to float where typed so)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(key, f"expected null, got {_show(value)}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(key, f"expected {_type_name(tp)}, got null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(key, f"expected {_type_name(tp)}, got {_show(value)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) is type(allowed[allowed.index(value)]):
            return value
        raise ConfigError(key, f"expected one of {'|'.join(str(a) for a in allowed)}, got {_show(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {_show(value)}")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {_show(value)}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - every annotation above is handled
        raise TypeError(f"unsupported annotation {tp} for {key}")
    raise ConfigError(key, f"expected {_type_name(tp)}, got {_show(value)}")


# ---------------------------------------------------------------------------------------------
# cross-field rules


def _check_semantics(c: JobConfig) -> None:
    urls = c.input.urls
    if isinstance(urls, str):
        if not urls.strip():
            raise ConfigError("input.urls", "must not be empty")
    elif not urls:
        raise ConfigError("input.urls", "must list at least one URL or pattern")
    if not c.input.image_exts:
        raise ConfigError("input.image_exts", "must list at least one extension")
    c.input.image_exts = [e.lower().lstrip(".") for e in c.input.image_exts]
    if c.input.caption_key.startswith("json:") and not c.input.caption_key[5:]:
        raise ConfigError("input.caption_key", "json: must be followed by a field name, e.g. json:caption")
    if not c.output.path.strip():
        raise ConfigError("output.path", "must not be empty")

    p = c.preprocess
    if p.buckets is not None:
        if not p.buckets:
            raise ConfigError("preprocess.buckets", "must list at least one [height, width]")
        for i, b in enumerate(p.buckets):
            _check_size(b, f"preprocess.buckets[{i}]")
        if len({tuple(b) for b in p.buckets}) != len(p.buckets):
            raise ConfigError("preprocess.buckets", "has duplicate entries")
    else:
        if p.resolution is None:
            raise ConfigError("preprocess.resolution", "set a resolution or preprocess.buckets")
        if isinstance(p.resolution, int):
            _check_size([p.resolution, p.resolution], "preprocess.resolution")
        else:
            _check_size(p.resolution, "preprocess.resolution")
    if len(p.background) != 3 or not all(0 <= v <= 255 for v in p.background):
        raise ConfigError("preprocess.background", f"expected [r, g, b] with values 0..255, got {p.background}")
    if p.min_size < 0:
        raise ConfigError("preprocess.min_size", f"must be >= 0, got {p.min_size}")
    if p.max_pixels <= 0:
        raise ConfigError("preprocess.max_pixels", f"must be > 0, got {p.max_pixels}")
    if p.max_upscale is not None and p.max_upscale < 1:
        raise ConfigError("preprocess.max_upscale", f"must be >= 1 (1: never enlarge) or null (no limit), got {p.max_upscale}")

    m = c.model
    if not m.preset and not m.weights:
        raise ConfigError("model.preset", "set a preset, a weights path, or both")
    if m.preset:
        # Imported here: `latentae` brings torch, which the rest of config loading does not need.
        from latentae import list_presets

        if m.preset not in list_presets():
            raise ConfigError("model.preset", f"expected one of {'|'.join(list_presets())}, got {m.preset!r}")

    r = c.ray
    _positive(r.workers, "ray.workers", allow_none=True)
    if r.connect_timeout < 0:
        raise ConfigError("ray.connect_timeout", f"must be >= 0, got {r.connect_timeout}")
    if r.num_gpus_per_worker is not None and r.num_gpus_per_worker < 0:
        raise ConfigError("ray.num_gpus_per_worker", f"must be >= 0, got {r.num_gpus_per_worker}")
    if r.num_gpus_per_worker is not None and r.num_gpus_per_worker > 1 and r.num_gpus_per_worker % 1:
        raise ConfigError("ray.num_gpus_per_worker", "above 1 it must be a whole number")
    if r.num_cpus_per_worker < 0:
        raise ConfigError("ray.num_cpus_per_worker", f"must be >= 0, got {r.num_cpus_per_worker}")
    if r.batch_size != "auto":
        _positive(r.batch_size, "ray.batch_size")  # type: ignore[arg-type]
    _positive(r.max_attempts, "ray.max_attempts")
    _positive(r.max_in_flight_per_worker, "ray.max_in_flight_per_worker", allow_none=True)
    _positive(r.decode_threads, "ray.decode_threads", allow_none=True)
    if r.decode_timeout <= 0:
        raise ConfigError("ray.decode_timeout", f"must be > 0, got {r.decode_timeout}")

    q = c.qa
    if q.samples < 0:
        raise ConfigError("qa.samples", f"must be >= 0, got {q.samples}")
    if q.max_nan < 0:
        raise ConfigError("qa.max_nan", f"must be >= 0, got {q.max_nan}")
    if q.stats_tolerance < 0:
        raise ConfigError("qa.stats_tolerance", f"must be >= 0, got {q.stats_tolerance}")
    _positive(q.batch_size, "qa.batch_size")
    _positive(q.workers, "qa.workers")
    _check_text(c.text)


_TEXT_NAME = re.compile(r"[a-z][a-z0-9_]*")
# "clip", "t5", or a transformers class name such as UMT5EncoderModel.
_TEXT_CLASS = re.compile(r"[A-Z][A-Za-z0-9]*")


def _check_text(encoders: list[TextEncoderConfig]) -> None:
    """Names, kinds and outputs of the text encoders; resolves `padding: auto`."""
    seen: set[str] = set()
    for i, t in enumerate(encoders):
        key = f"text[{i}]"
        if not _TEXT_NAME.fullmatch(t.name):
            raise ConfigError(f"{key}.name", f"expected lowercase letters, digits and underscores starting with a "
                                             f"letter (it prefixes column names), got {t.name!r}")
        if t.name in seen:
            raise ConfigError(f"{key}.name", f"{t.name!r} is used by another text encoder")
        seen.add(t.name)
        if t.kind not in ("clip", "t5") and not _TEXT_CLASS.fullmatch(t.kind):
            raise ConfigError(f"{key}.kind", f"expected clip, t5 or a transformers model class name, got {t.kind!r}")
        if not t.path.strip():
            raise ConfigError(f"{key}.path", "must not be empty")
        _positive(t.max_length, f"{key}.max_length")
        if not t.outputs:
            raise ConfigError(f"{key}.outputs", f"list at least one of {'|'.join(TEXT_OUTPUTS)}")
        if len(set(t.outputs)) != len(t.outputs):
            raise ConfigError(f"{key}.outputs", f"has duplicate entries: {t.outputs}")
        if t.kind == "t5" and {"pooled", "projected"} & set(t.outputs):
            raise ConfigError(f"{key}.outputs", "a T5 encoder has no pooled or projected output; use last or penultimate")
        if t.padding == "auto":
            t.padding = "max_length" if t.kind == "clip" else "none"


def _check_size(value: list[int], key: str) -> None:
    if len(value) != 2:
        raise ConfigError(key, f"expected [height, width], got {value}")
    if any(v <= 0 for v in value):
        raise ConfigError(key, f"sizes must be positive, got {value}")


def _positive(value: int | None, key: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < 1:
        raise ConfigError(key, f"must be >= 1, got {value}")
