"""The caption encoders of a job's `text:` section, on the encode worker's device.

`TextEncoder` holds one transformers model and its tokenizer; `TextEncoders` runs all of a job's
encoders over a batch's captions. The encode worker tokenizes each image batch's captions on
its CPU and runs the models on its own device right after launching the batch's images, so a
sample's embeddings and latents are written to the same shard and committed together. On CUDA
the outputs come back asynchronously (pinned buffers and an event, as the images' posteriors do):
`launch` returns a `PendingText` that `get()` turns into numpy arrays per row. (Not in actors of
their own: the embeddings would cross Ray's object store to reach the shard's writer, need GPUs
of their own, and every commit would wait on two actors; the README's "Caption embeddings" has
the measurements.)

transformers (and tokenizers) are the optional `text` extra: this module imports them only when
an encoder is built, so an image-only job never does.

Folders: `path` is a transformers model folder (config.json + weights), or a diffusers-style
folder holding text_encoder/ and tokenizer/. The tokenizer is `tokenizer` when set, else `path`
itself when it holds tokenizer files, else the diffusers sibling of the model folder
(text_encoder_2/ -> tokenizer_2/). Remote folders are copied once per machine, as autoencoder
weights are (`models.local_weights`). Nothing is ever downloaded from a model hub.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import storage
from .config import ConfigError, TextEncoderConfig
from .models import local_weights
from .text import SEQUENCE_OUTPUTS, TextColumn, length_column

__all__ = ["TextEncoderError", "TextEncoder", "TextEncoders", "PendingText", "resolve_folders"]

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "vocab.txt")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".index.json")
_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class TextEncoderError(ConfigError):
    """A text encoder cannot be used as configured; the message starts with its config key."""


def resolve_folders(cfg: TextEncoderConfig, key: str) -> tuple[str, str]:
    """(model folder URL, tokenizer folder URL) of encoder `cfg` (see the module docstring)."""
    so = cfg.storage_options
    path = cfg.path.rstrip("/")
    files = storage.list_files(path, so)
    diffusers_root = False
    if "config.json" in files:
        model = path
    elif "config.json" in storage.list_files(storage.join(path, "text_encoder"), so):
        model, diffusers_root = storage.join(path, "text_encoder"), True
    else:
        raise TextEncoderError(f"{key}.path", f"no config.json in {storage.redact(path)} nor in its text_encoder/ "
                                              "(expected a transformers model folder or a diffusers-style folder)")
    if cfg.tokenizer:
        tokenizer = cfg.tokenizer.rstrip("/")
        if not set(_TOKENIZER_FILES) & set(storage.list_files(tokenizer, so)):
            raise TextEncoderError(f"{key}.tokenizer", f"no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in "
                                                       f"{storage.redact(tokenizer)}")
        return model, tokenizer
    if diffusers_root:
        return model, storage.join(path, "tokenizer")
    if set(_TOKENIZER_FILES) & set(files):
        return model, model
    parent, _, base = model.rpartition("/")
    if base.startswith("text_encoder"):
        sibling = f"{parent}/tokenizer{base[len('text_encoder'):]}"
        if set(_TOKENIZER_FILES) & set(storage.list_files(sibling, so)):
            return model, sibling
    raise TextEncoderError(f"{key}.tokenizer", f"no tokenizer files next to {storage.redact(model)}; set the "
                                               "tokenizer folder")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in storage.iter_chunks(f):
            h.update(chunk)
    return h.hexdigest()


def _digests(folder: str, weights: bool) -> dict[str, str]:
    """sha256 of the weight files of `folder` (or, `weights=False`, of every other file but
    hidden ones and read-me's), by file name."""
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isfile(path) or name.lower().startswith("readme"):
            continue
        if name.endswith(_WEIGHT_SUFFIXES) == weights:
            out[name] = _sha256(path)
    return out


class PendingText:
    """The text outputs of one batch of captions, on their way back to the host.

    `get()` waits for the device (CUDA: for this batch only) and returns, per caption, a dict of
    float32 arrays by column name plus each encoder's token count (see `pipeline.text`).
    """

    def __init__(self, parts: list[tuple[TextEncoder, dict[str, Any], np.ndarray]], event: Any = None):
        self._parts = parts
        self._event = event

    def get(self) -> list[dict[str, Any]]:
        if self._event is not None:
            self._event.synchronize()
        rows: list[dict[str, Any]] = []
        for encoder, outputs, lengths in self._parts:
            arrays = {col: t.numpy() for col, t in outputs.items()}
            if not rows:
                rows = [{} for _ in range(len(lengths))]
            for i, row in enumerate(rows):
                n = int(lengths[i])
                row[length_column(encoder.name)] = n
                for col in encoder.columns:
                    value = arrays[col.name][i]
                    row[col.name] = value[:n] if col.variable else value
        return rows


class TextEncoder:
    """One caption encoder: a tokenizer and a transformers model on `device` (a `torch.device`).

    `key` is its place in the config (`text[0]`), named by every error. `columns` are the text
    columns it fills (shapes measured on an empty caption at load); `facts()` is what the
    manifest records of it: the model class, the sha256 of its weights, config and tokenizer
    files, and the output shapes.
    """

    def __init__(self, cfg: TextEncoderConfig, key: str, device: Any):
        import torch

        try:
            import transformers
        except ImportError as e:
            raise TextEncoderError("text", "text encoders need the optional dependencies transformers and "
                                           "tokenizers: pip install 'latent-precompute[text]'") from e
        self.cfg = cfg
        self.key = key
        self.name = cfg.name
        self.device = device
        self.fixed = cfg.padding == "max_length"
        model_url, tokenizer_url = resolve_folders(cfg, key)
        model_dir = local_weights(model_url, cfg.storage_options, key=f"{key}.path")
        tokenizer_dir = local_weights(tokenizer_url, cfg.storage_options, key=f"{key}.tokenizer")
        # Weight-loading progress bars would fill every worker's log once per actor.
        transformers.utils.logging.disable_progress_bar()
        cls = self._model_class(transformers, model_dir)
        model, info = cls.from_pretrained(model_dir, dtype=getattr(torch, _TORCH_DTYPES[cfg.dtype]),
                                          local_files_only=True, output_loading_info=True)
        if info.get("missing_keys"):
            # e.g. a projection asked of a CLIPTextModel checkpoint: it would be randomly initialised.
            missing = sorted(info["missing_keys"])
            raise TextEncoderError(f"{key}.path", f"{cls.__name__} weights in {storage.redact(model_url)} lack "
                                                  f"{len(missing)} tensor(s), e.g. {missing[:3]}")
        self.model = model.eval().to(device)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        if self.tokenizer.pad_token is None:
            raise TextEncoderError(f"{key}.tokenizer", f"the tokenizer in {storage.redact(tokenizer_url)} has no pad token")
        limit = getattr(model.config, "max_position_embeddings", None)
        if self.fixed and limit is not None and cfg.max_length > int(limit):
            raise TextEncoderError(f"{key}.max_length", f"{cfg.max_length} exceeds the model's {limit} positions")
        self._facts = {
            "class": cls.__name__,
            "weights_sha256": hashlib.sha256("".join(
                f"{n}\0{d}\n" for n, d in _digests(model_dir, weights=True).items()).encode()).hexdigest(),
            "config_sha256": _sha256(os.path.join(model_dir, "config.json")),
            "tokenizer_files": _digests(tokenizer_dir, weights=False),
        }
        ids, mask, _ = self.tokenize([""])
        probe = self._forward(ids, mask)
        self.shapes = {o: [cfg.max_length, *t.shape[2:]] if o in SEQUENCE_OUTPUTS else list(t.shape[1:])
                       for o, t in probe.items()}
        self.columns = tuple(
            TextColumn(encoder=cfg.name, output=o, dtype=cfg.storage_dtype, shape=tuple(self.shapes[o]),
                       max_length=cfg.max_length, variable=not self.fixed and o in SEQUENCE_OUTPUTS)
            for o in cfg.outputs
        )

    def _model_class(self, transformers: Any, model_dir: str) -> type:
        kind = self.cfg.kind
        if kind == "clip":
            name = "CLIPTextModelWithProjection" if "projected" in self.cfg.outputs else "CLIPTextModel"
        elif kind == "t5":
            name = "T5EncoderModel"
        else:
            name = kind
        cls = getattr(transformers, name, None)
        if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
            raise TextEncoderError(f"{self.key}.kind", f"{kind!r} is not a transformers model class")
        return cls

    def facts(self) -> dict[str, Any]:
        """What the manifest records of the loaded encoder: `model` (class and digests) and `shapes`."""
        return {"model": dict(self._facts), "shapes": {o: list(s) for o, s in self.shapes.items()}}

    def tokenize(self, captions: Sequence[str]) -> tuple[Any, Any, np.ndarray]:
        """(input ids, attention mask or None, token counts) of `captions`, truncated to max_length."""
        enc = self.tokenizer(list(captions), padding="max_length" if self.fixed else "longest",
                             max_length=self.cfg.max_length, truncation=True, return_tensors="pt")
        mask = enc["attention_mask"]
        lengths = mask.sum(dim=1).numpy()
        # max_length padding feeds the model the padded sequence without a mask, as the SD, SDXL
        # and FLUX pipelines feed CLIP; otherwise only the real tokens count.
        return enc["input_ids"], (None if self.fixed else mask), lengths

    def _forward(self, ids: Any, mask: Any) -> dict[str, Any]:
        """The requested outputs of tokenized captions as device tensors in the compute dtype, by output."""
        import torch

        ids = ids.to(self.device)
        mask = mask.to(self.device) if mask is not None else None
        outputs = self.cfg.outputs
        hidden = "penultimate" in outputs
        with torch.inference_mode():
            if self.cfg.kind == "clip":
                # What CLIPTextModel(WithProjection).forward computes, with the pooled output kept. The
                # text transformer is `text_model` of both classes, or (transformers 5) CLIPTextModel itself.
                text_model = getattr(self.model, "text_model", self.model)
                out = text_model(input_ids=ids, attention_mask=mask, output_hidden_states=hidden)
                pooled = out.pooler_output
                projected = self.model.text_projection(pooled) if "projected" in outputs else None
            else:
                out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=hidden)
                pooled = getattr(out, "pooler_output", None)
                projected = getattr(out, "text_embeds", None)
            found = {
                "last": out.last_hidden_state,
                "penultimate": out.hidden_states[-2] if hidden else None,
                "pooled": pooled,
                "projected": projected,
            }
        missing = [o for o in outputs if found[o] is None]
        if missing:
            raise TextEncoderError(f"{self.key}.outputs", f"{type(self.model).__name__} has no {missing[0]} output")
        return {o: found[o] for o in outputs}


class TextEncoders:
    """Every encoder of a job's `text` section on one device; they run one after another."""

    def __init__(self, configs: Sequence[TextEncoderConfig], device: Any):
        self.device = device
        self.encoders = [TextEncoder(cfg, f"text[{i}]", device) for i, cfg in enumerate(configs)]
        # One batch at a time on the device: shards encoded concurrently share the models.
        self._lock = threading.Lock()

    def facts(self) -> dict[str, dict[str, Any]]:
        """`TextEncoder.facts()` by encoder name (what `manifest.build_manifest` takes)."""
        return {e.name: e.facts() for e in self.encoders}

    def launch(self, captions: Sequence[str | None]) -> PendingText:
        """Start encoding `captions` (None, a missing caption, is encoded as "": what the pipelines
        use for an unconditional sample); asynchronous on CUDA."""
        import torch

        texts = ["" if c is None else c for c in captions]
        tokens = [e.tokenize(texts) for e in self.encoders]  # on this thread's CPU, outside the lock
        cuda = self.device.type == "cuda"
        parts = []
        with self._lock:
            for encoder, tok in zip(self.encoders, tokens):
                outputs = {}
                for output, t in encoder._forward(tok[0], tok[1]).items():
                    t = t.float()
                    if cuda:
                        host = torch.empty(t.shape, dtype=torch.float32, pin_memory=True)
                        host.copy_(t, non_blocking=True)
                        t = host
                    outputs[f"{encoder.name}_{output}"] = t
                parts.append((encoder, outputs, tok[2]))
            event = None
            if cuda:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self.device))
        return PendingText(parts, event)
