"""Reading and writing autoencoder checkpoints in the formats found in the wild.

Everything is converted to one canonical ("native") naming: the CompVis module names of
``latentae.encoder`` (``encoder.down.0.block.1.norm1.weight``, ``decoder.up.2.upsample.conv.bias``,
``quant_conv.weight``...). Supported sources:

* diffusers folders (``config.json`` + ``diffusion_pytorch_model.safetensors`` or ``.bin``), also a
  pipeline folder with a ``vae/`` subfolder;
* single files (``.safetensors``, ``.ckpt``, ``.pt``, ``.pth``, ``.bin``) holding either naming, with or
  without a ``first_stage_model.`` (CompVis/SGM/SD3 full checkpoints) or ``vae.`` prefix, with or
  without quant convs (SD3, FLUX ``ae.safetensors``);
* both diffusers attention namings (``to_q/to_k/to_v/to_out.0`` and ``query/key/value/proj_attn``)
  and both projection shapes (Linear ``[C, C]`` and 1x1 conv ``[C, C, 1, 1]``), at any level.

Pickle-based files are read with ``torch.load(weights_only=True)``: a pickle that would construct
arbitrary objects (and so could run code) is refused, never executed.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import AutoencoderConfig, AutoencoderConfigError
from .presets import get_preset, list_presets, matching_presets

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)
# Where latentae stores its own config: safetensors metadata, .ckpt dict entry, diffusers config.json.
CONFIG_METADATA_KEY = "latentae_config"
DIFFUSERS_CONFIG_KEY = "_latentae_config"
# Prefixes under which full model checkpoints keep the autoencoder, tried in this order.
_PREFIXES = ("first_stage_model.", "vae.")
# Training-only tensors of LDM autoencoder checkpoints (LPIPS + discriminator loss), never model weights.
_IGNORED_PREFIXES = ("loss.",)
_MAX_LISTED_KEYS = 20


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message names the file and key."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle-based checkpoint needs more than tensors and plain containers to load."""


class CheckpointKeyError(CheckpointError):
    """Missing and/or unexpected tensor names (``missing`` and ``unexpected`` hold them)."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str]) -> None:
        self.missing = missing
        self.unexpected = unexpected
        parts = [f"checkpoint {source} does not match the autoencoder architecture"]
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_abbrev(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_abbrev(unexpected)}")
        parts.append("pass the matching preset= or config= (or check the file is an autoencoder)")
        super().__init__("; ".join(parts))


class CheckpointShapeError(CheckpointError):
    """A tensor's shape differs from the parameter it should fill."""


class ArchitectureError(CheckpointError):
    """The architecture cannot be inferred from the tensors alone."""


def _abbrev(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    return f"[{shown}{f', ... and {more} more' if more > 0 else ''}]"


# --------------------------------------------------------------------------------------------- reading


def _torch_load(path: Path) -> Any:
    try:
        try:
            # Memory-mapped: a multi-GB full checkpoint is not read whole to take its autoencoder.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnsafeCheckpointError(
            f"refused to load {path}: the pickle needs objects other than tensors and plain containers, "
            f"which could execute code ({first_line}). Convert it to .safetensors in a trusted environment."
        ) from None


def select_keys(keys: Iterable[str]) -> dict[str, str]:
    """Map autoencoder tensor names (full-checkpoint prefix removed) to the file's names.

    Keys under the first prefix of ``first_stage_model.``/``vae.`` that occurs are taken; without one,
    all keys. Training-only ``loss.*`` tensors of LDM autoencoder checkpoints are left out.
    """
    keys = list(keys)
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in keys):
            chosen = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
            break
    else:
        chosen = {k: k for k in keys}
    return {name: key for name, key in chosen.items() if not name.startswith(_IGNORED_PREFIXES)}


def read_tensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """The autoencoder tensors of one checkpoint file (prefix removed, names otherwise as stored) and the
    latentae config stored in it, if any. Of a safetensors file only those tensors are read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(key) for name, key in select_keys(f.keys()).items()}
        raw = metadata.get(CONFIG_METADATA_KEY)
        return tensors, json.loads(raw) if raw else None
    if suffix in PICKLE_SUFFIXES:
        obj = _torch_load(path)
        stored = None
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            stored = obj.get(CONFIG_METADATA_KEY)
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
        tensors = {name: obj[key] for name, key in select_keys(map(str, obj)).items() if isinstance(obj[key], Tensor)}
        return tensors, stored if isinstance(stored, dict) else None
    raise CheckpointError(
        f"unsupported checkpoint file {path}: expected one of {SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES} "
        "or a diffusers folder"
    )


def _resolve_folder(folder: Path) -> Path:
    """The diffusers autoencoder folder: ``folder`` itself or its ``vae/`` subfolder."""
    if (folder / "config.json").is_file():
        return folder
    if (folder / "vae" / "config.json").is_file():
        return folder / "vae"
    raise CheckpointError(f"{folder} is not a diffusers autoencoder folder: no config.json (nor vae/config.json)")


def read_diffusers_folder(folder: str | Path) -> tuple[dict[str, Tensor], dict[str, Any], Path]:
    """Tensors and ``config.json`` of a diffusers AutoencoderKL folder, and the weights file used."""
    folder = _resolve_folder(Path(folder))
    with open(folder / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    for name in DIFFUSERS_WEIGHT_NAMES:
        if (folder / name).is_file():
            tensors, _ = read_tensors(folder / name)
            return tensors, config, folder / name
    raise CheckpointError(f"no weights in diffusers folder {folder}: looked for {list(DIFFUSERS_WEIGHT_NAMES)}")


# ---------------------------------------------------------------------------------------- key naming


def is_diffusers_naming(keys: Iterable[str]) -> bool:
    """True when tensor names follow diffusers (``down_blocks``/``mid_block``) rather than CompVis."""
    return any(
        re.match(r"(encoder|decoder)\.(down_blocks|up_blocks|mid_block|conv_norm_out)\.", k) for k in keys
    )


# Tensor names under "encoder."/"decoder.", one row per kind of tensor: (native name, diffusers name).
# Both conversions read this one table, each in its own direction. Fields:
#   {level} level index, the same in both namings (down blocks);
#   {up}    level index of an up block: diffusers counts from the lowest resolution, so it is reversed;
#   {mid}   middle ResnetBlock: native block_1/block_2, diffusers resnets.0/1;
#   {i}     block index within a level;
#   {res}, {att}  rest of a ResnetBlock / attention tensor name, submodule renamed (_RESNET_NAMES,
#           _ATTN_NAMES);
#   {rest}  rest of the name, unchanged.
_KEY_TABLE: tuple[tuple[str, str], ...] = (
    ("conv_in.{rest}", "conv_in.{rest}"),
    ("conv_out.{rest}", "conv_out.{rest}"),
    ("norm_out.{rest}", "conv_norm_out.{rest}"),
    ("mid.block_{mid}.{res}", "mid_block.resnets.{mid}.{res}"),
    ("mid.attn_1.{att}", "mid_block.attentions.0.{att}"),
    ("down.{level}.block.{i}.{res}", "down_blocks.{level}.resnets.{i}.{res}"),
    ("down.{level}.attn.{i}.{att}", "down_blocks.{level}.attentions.{i}.{att}"),
    ("down.{level}.downsample.conv.{rest}", "down_blocks.{level}.downsamplers.0.conv.{rest}"),
    ("up.{up}.block.{i}.{res}", "up_blocks.{up}.resnets.{i}.{res}"),
    ("up.{up}.attn.{i}.{att}", "up_blocks.{up}.attentions.{i}.{att}"),
    ("up.{up}.upsample.conv.{rest}", "up_blocks.{up}.upsamplers.0.conv.{rest}"),
)
_FIELD_PATTERNS = {"level": r"\d+", "up": r"\d+", "mid": r"\d", "i": r"\d+", "res": ".+", "att": ".+", "rest": ".+"}

# Submodules of ResnetBlocks and attention blocks: (native, diffusers, older diffusers names also read).
# diffusers' ResnetBlock2D calls its 1x1 shortcut "conv_shortcut"; CompVis calls it "nin_shortcut".
_SubmoduleNames = tuple[tuple[str, str, tuple[str, ...]], ...]
_RESNET_NAMES: _SubmoduleNames = (("nin_shortcut", "conv_shortcut", ()),)
_ATTN_NAMES: _SubmoduleNames = (
    ("norm", "group_norm", ()),
    ("q", "to_q", ("query",)),
    ("k", "to_k", ("key",)),
    ("v", "to_v", ("value",)),
    ("proj_out", "to_out.0", ("proj_attn",)),
)


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, ...
    return re.compile("".join(
        re.escape(part) if i % 2 == 0 else f"(?P<{part}>{_FIELD_PATTERNS[part]})" for i, part in enumerate(parts)
    ))


# (pattern of one naming, template of the other) for each direction.
_DIFFUSERS_TO_NATIVE = [(_template_regex(diffusers), native) for native, diffusers in _KEY_TABLE]
_NATIVE_TO_DIFFUSERS = [(_template_regex(native), diffusers) for native, diffusers in _KEY_TABLE]


def _submodule_map(names: _SubmoduleNames, to_native: bool) -> dict[str, str]:
    if to_native:
        return {old: native for native, diffusers, older in names for old in (diffusers, *older)}
    return {native: diffusers for native, diffusers, _ in names}


def _rename_submodule(leaf: str, names: Mapping[str, str]) -> str:
    module, _, param = leaf.rpartition(".")
    return f"{names[module]}.{param}" if module in names else leaf


def _field_converters(num_levels: int, to_native: bool) -> dict[str, Callable[[str], str]]:
    """For each field of _KEY_TABLE: its value in one naming -> its value in the other."""
    resnet = _submodule_map(_RESNET_NAMES, to_native)
    attn = _submodule_map(_ATTN_NAMES, to_native)
    return {
        "level": lambda v: str(int(v)),
        "up": lambda v: str(num_levels - 1 - int(v)),
        "mid": lambda v: str(int(v) + 1 if to_native else int(v) - 1),
        "i": lambda v: v,
        "res": lambda v: _rename_submodule(v, resnet),
        "att": lambda v: _rename_submodule(v, attn),
        "rest": lambda v: v,
    }


def _rename_key(
    key: str, rules: list[tuple[re.Pattern[str], str]], fields: Mapping[str, Callable[[str], str]]
) -> str | None:
    """`key` renamed by the first rule that matches its name under "encoder."/"decoder.", else None."""
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        return None
    for pattern, template in rules:
        if m := pattern.fullmatch(rest):
            return f"{part}." + template.format(**{k: fields[k](v) for k, v in m.groupdict().items()})
    return None


def _count_levels(keys: Iterable[str], pattern: str) -> int:
    levels = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(levels) + 1 if levels else 0


def diffusers_to_native(tensors: Mapping[str, Tensor], source: str = "checkpoint") -> dict[str, Tensor]:
    """Rename diffusers AutoencoderKL tensors to the CompVis names used by ``latentae``."""
    fields = _field_converters(_count_levels(tensors, r"decoder\.up_blocks\.(\d+)\."), to_native=True)
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        # Unmatched: the quant convs (named alike in both), or a stray key reported as unexpected when loaded.
        new = _rename_key(key, _DIFFUSERS_TO_NATIVE, fields) or key
        if new in out:
            raise CheckpointError(f"{source}: keys map to the same tensor {new!r} (mixed attention namings?)")
        out[new] = value
    return out


def native_to_diffusers(state: Mapping[str, Tensor], num_levels: int) -> dict[str, Tensor]:
    """Rename native tensors to diffusers names; attention projections become Linear ``[C, C]``."""
    fields = _field_converters(num_levels, to_native=False)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = _rename_key(key, _NATIVE_TO_DIFFUSERS, fields) or key
        if re.search(r"attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", new) and value.ndim == 4:
            value = value.reshape(value.shape[0], value.shape[1])
        out[new] = value
    return out


def to_native(tensors: Mapping[str, Tensor], source: str = "checkpoint") -> dict[str, Tensor]:
    """Unprefixed tensors in either naming (diffusers or CompVis) -> native names."""
    if not any(k.startswith(("encoder.", "decoder.")) for k in tensors):
        raise CheckpointError(
            f"no autoencoder tensors in {source}: expected keys starting with 'encoder.'/'decoder.', "
            f"optionally under one of {list(_PREFIXES)}"
        )
    if is_diffusers_naming(tensors):
        return diffusers_to_native(tensors, source)
    return dict(tensors)


# --------------------------------------------------------------------------------- architecture


def config_from_diffusers(d: Mapping[str, Any]) -> AutoencoderConfig:
    """Translate a diffusers ``AutoencoderKL`` config.json into an AutoencoderConfig."""
    if isinstance(d.get(DIFFUSERS_CONFIG_KEY), Mapping):
        return AutoencoderConfig.from_dict(dict(d[DIFFUSERS_CONFIG_KEY]))
    try:
        boc = [int(c) for c in d["block_out_channels"]]
        down_types = list(d.get("down_block_types") or ["DownEncoderBlock2D"] * len(boc))
        up_types = list(d.get("up_block_types") or ["UpDecoderBlock2D"] * len(boc))
        latent = int(d["latent_channels"])
    except KeyError as exc:
        raise AutoencoderConfigError(f"diffusers config lacks key {exc.args[0]!r}") from None
    if d.get("act_fn", "silu") != "silu":
        raise AutoencoderConfigError(f"diffusers config key 'act_fn' must be 'silu', got {d['act_fn']!r}")
    ch = boc[0]
    if any(c % ch for c in boc):
        raise AutoencoderConfigError(f"diffusers config key 'block_out_channels' {boc} is not a multiple of its first entry")
    n = len(boc)
    if len(down_types) != n or len(up_types) != n:
        raise AutoencoderConfigError("diffusers config keys 'down_block_types'/'up_block_types' must match 'block_out_channels'")
    enc_attn = _levels_with_attention(down_types, "DownEncoderBlock2D", "AttnDownEncoderBlock2D", "down_block_types")
    dec_attn = {n - 1 - i for i in _levels_with_attention(up_types, "UpDecoderBlock2D", "AttnUpDecoderBlock2D",
                                                          "up_block_types")}
    if enc_attn != dec_attn:
        raise AutoencoderConfigError("diffusers config: encoder and decoder attention levels differ, which latentae cannot build")
    mid_attn = bool(d.get("mid_block_add_attention", True))
    if not mid_attn and enc_attn:
        raise AutoencoderConfigError("diffusers config: 'mid_block_add_attention' False with attention blocks elsewhere")
    resolution = 256
    shift = d.get("shift_factor")
    return AutoencoderConfig(
        in_channels=int(d.get("in_channels", 3)),
        out_channels=int(d.get("out_channels", 3)),
        ch=ch,
        ch_mult=tuple(c // ch for c in boc),
        num_res_blocks=int(d.get("layers_per_block", 1)),
        attn_resolutions=tuple(sorted((resolution >> i for i in enc_attn), reverse=True)),
        resolution=resolution,
        z_channels=latent,
        embed_dim=latent,
        use_quant_conv=bool(d.get("use_quant_conv", True)),
        use_post_quant_conv=bool(d.get("use_post_quant_conv", True)),
        attn_type="vanilla" if mid_attn else "none",
        norm_num_groups=int(d.get("norm_num_groups", 32)),
        scaling_factor=float(d.get("scaling_factor", 0.18215)),
        shift_factor=float(shift) if shift is not None else 0.0,
    )


def _levels_with_attention(types: list[str], plain: str, attn: str, key: str) -> set[int]:
    levels = set()
    for i, t in enumerate(types):
        if t == attn:
            levels.add(i)
        elif t != plain:
            raise AutoencoderConfigError(f"diffusers config key {key!r}: unsupported block type {t!r} (use {plain} or {attn})")
    return levels


def config_to_diffusers(config: AutoencoderConfig) -> dict[str, Any]:
    """A diffusers ``AutoencoderKL`` config.json for ``config`` (which diffusers must be able to express)."""
    if config.attn_type == "linear":
        raise AutoencoderConfigError("config field 'attn_type' is 'linear', which diffusers cannot express; use save_compvis")
    if config.embed_dim != config.z_channels:
        raise AutoencoderConfigError(
            f"config fields 'embed_dim' ({config.embed_dim}) and 'z_channels' ({config.z_channels}) differ, "
            "which diffusers cannot express; use save_compvis"
        )
    levels = set(config.attention_levels())
    if config.attn_type == "none" and levels:
        raise AutoencoderConfigError("attn_type 'none' with attn_resolutions set: diffusers cannot express it")
    n = len(config.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.30.0",
        "act_fn": "silu",
        "block_out_channels": [config.ch * m for m in config.ch_mult],
        "down_block_types": ["AttnDownEncoderBlock2D" if i in levels else "DownEncoderBlock2D" for i in range(n)],
        "up_block_types": [
            "AttnUpDecoderBlock2D" if (n - 1 - i) in levels else "UpDecoderBlock2D" for i in range(n)
        ],
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "latent_channels": config.z_channels,
        "layers_per_block": config.num_res_blocks,
        "norm_num_groups": config.norm_num_groups,
        "sample_size": config.resolution,
        "scaling_factor": config.scaling_factor,
        "shift_factor": config.shift_factor if config.shift_factor else None,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": True,
        "use_quant_conv": config.use_quant_conv,
        "use_post_quant_conv": config.use_post_quant_conv,
        "mid_block_add_attention": config.attn_type != "none",
        # Ignored by diffusers (leading underscore); lets latentae round-trip fields diffusers lacks.
        DIFFUSERS_CONFIG_KEY: config.to_dict(),
    }


def infer_config(state: Mapping[str, Tensor], source: str = "checkpoint") -> AutoencoderConfig:
    """Architecture from native tensors; scaling factors from the unique preset of that architecture.

    When several presets share the architecture (sd/sdxl, sd3/flux) or none does, the scaling and
    shift factors cannot be known: they are set to 1.0 / 0.0 and a warning names the presets to pass.
    """
    hint = f"pass preset= (one of {list_presets()}) or config= to from_pretrained"

    def need(key: str) -> Tensor:
        if key not in state:
            raise ArchitectureError(f"cannot infer the architecture of {source}: no tensor {key!r}; {hint}")
        return state[key]

    conv_in = need("encoder.conv_in.weight")
    ch, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    levels = _count_levels(state, r"encoder\.down\.(\d+)\.")
    if levels == 0:
        raise ArchitectureError(f"cannot infer the architecture of {source}: no 'encoder.down.*' tensors; {hint}")
    ch_mult = tuple(int(need(f"encoder.down.{i}.block.0.conv1.weight").shape[0]) // ch for i in range(levels))
    num_res_blocks = _count_levels(state, r"encoder\.down\.0\.block\.(\d+)\.")
    z_channels = int(need("decoder.conv_in.weight").shape[1])
    enc_out = int(need("encoder.conv_out.weight").shape[0])
    if enc_out != 2 * z_channels:
        raise ArchitectureError(
            f"{source}: encoder.conv_out has {enc_out} channels, expected 2 x {z_channels} (double_z); {hint}"
        )
    out_channels = int(need("decoder.conv_out.weight").shape[0])
    use_quant = "quant_conv.weight" in state
    use_post_quant = "post_quant_conv.weight" in state
    if use_quant:
        embed_dim = int(state["quant_conv.weight"].shape[0]) // 2
    elif use_post_quant:
        embed_dim = int(state["post_quant_conv.weight"].shape[1])
    else:
        embed_dim = z_channels
    if "encoder.mid.attn_1.q.weight" in state:
        attn_type = "vanilla"
    elif "encoder.mid.attn_1.to_qkv.weight" in state:
        attn_type = "linear"
    else:
        attn_type = "none"
    enc_attn = {i for i in range(levels) if any(k.startswith(f"encoder.down.{i}.attn.") for k in state)}
    dec_attn = {i for i in range(levels) if any(k.startswith(f"decoder.up.{i}.attn.") for k in state)}
    if enc_attn != dec_attn:
        raise ArchitectureError(
            f"{source}: encoder attention at levels {sorted(enc_attn)} but decoder at {sorted(dec_attn)}; "
            "latentae places attention at the same levels in both"
        )
    resolution = 256
    try:
        config = AutoencoderConfig(
            in_channels=in_channels, out_channels=out_channels, ch=ch, ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            attn_resolutions=tuple(sorted((resolution >> i for i in enc_attn), reverse=True)),
            resolution=resolution, z_channels=z_channels, embed_dim=embed_dim,
            use_quant_conv=use_quant, use_post_quant_conv=use_post_quant, attn_type=attn_type,
            scaling_factor=1.0, shift_factor=0.0,
        )
    except AutoencoderConfigError as exc:
        raise ArchitectureError(f"cannot infer the architecture of {source}: {exc}; {hint}") from None
    matches = matching_presets(config)
    if len(matches) == 1:
        return get_preset(matches[0])
    if matches:
        logger.warning(
            "%s matches the architecture of presets %s, which differ in scaling/shift factors; using "
            "scaling_factor=1.0, shift_factor=0.0. Pass preset= to choose.", source, matches,
        )
    else:
        logger.warning(
            "%s matches no preset; using scaling_factor=1.0, shift_factor=0.0. Pass config= to set them.", source
        )
    return config


# ------------------------------------------------------------------------------------------ loading


def _fits(value: Tensor, target: Tensor) -> bool:
    if value.shape == target.shape:
        return True
    # Attention projections appear both as Linear [C, C] and as 1x1 conv [C, C, 1, 1].
    flat = ((1, 1), ())
    return (value.shape[:2] == target.shape[:2] and tuple(value.shape[2:]) in flat
            and tuple(target.shape[2:]) in flat)


def load_native_into(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Copy native-named tensors into ``model``; strict on names and shapes, exact on values (fp32 holds
    any fp16/bf16 value exactly)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointKeyError(source, missing, unexpected)
    wrong = sorted(k for k, v in state.items() if not _fits(v, expected[k]))
    if wrong:
        details = [f"{k!r} has shape {tuple(state[k].shape)}, the model expects {tuple(expected[k].shape)}"
                   for k in wrong]
        raise CheckpointShapeError(
            f"checkpoint {source}: {len(wrong)} tensor(s) differ in shape from the model: {_abbrev(details)}; "
            "pass the matching preset= or config="
        )
    model.load_state_dict({k: v.reshape(expected[k].shape) for k, v in state.items()}, strict=True)


def resolve_checkpoint(
    path: str | Path, preset: str | None = None, config: AutoencoderConfig | Mapping[str, Any] | None = None
) -> tuple[AutoencoderConfig, dict[str, Tensor], Path]:
    """Read a folder or file; return its config, native tensors and the weights file.

    Config precedence: ``config`` argument, then ``preset``, then a config carried by the checkpoint
    (diffusers ``config.json`` or latentae metadata), then inference from the tensors.
    """
    text = str(path).removeprefix("file://")
    if "://" in text:
        raise CheckpointError(f"{text}: only local paths are supported; download the checkpoint first")
    path = Path(text)
    if path.is_dir():
        raw, diffusers_cfg, weights = read_diffusers_folder(path)
        carried = config_from_diffusers(diffusers_cfg)
    elif path.exists():
        raw, stored = read_tensors(path)
        weights = path
        carried = AutoencoderConfig.from_dict(stored) if stored else None
    else:
        raise CheckpointError(f"checkpoint not found: {path}")
    state = to_native(raw, str(weights))
    if config is not None:
        cfg = config if isinstance(config, AutoencoderConfig) else AutoencoderConfig.from_dict(dict(config))
    elif preset is not None:
        cfg = get_preset(preset)
    elif carried is not None:
        cfg = carried
    else:
        cfg = infer_config(state, str(weights))
    return cfg, state, weights


# ------------------------------------------------------------------------------------------ writing


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_diffusers(model: nn.Module, config: AutoencoderConfig, folder: str | Path) -> Path:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` (diffusers AutoencoderKL layout)."""
    cfg = config_to_diffusers(config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = native_to_diffusers(_cpu_state(model), len(config.ch_mult))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / DIFFUSERS_WEIGHT_NAMES[0]),
              metadata={"format": "pt"})
    with open(folder / "config.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    return folder


def save_native(model: nn.Module, config: AutoencoderConfig, path: str | Path, prefix: str = "") -> Path:
    """Write CompVis-named tensors to ``.safetensors`` (config in the metadata) or ``.ckpt``/``.pt``/``.pth``
    (``{"state_dict": ..., "latentae_config": ...}``, loadable with ``weights_only=True``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {prefix + k: v for k, v in _cpu_state(model).items()}
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        save_file(tensors, str(path), metadata={"format": "pt", CONFIG_METADATA_KEY: json.dumps(config.to_dict())})
    elif suffix in (".ckpt", ".pt", ".pth"):
        torch.save({"state_dict": tensors, CONFIG_METADATA_KEY: config.to_dict()}, path)
    else:
        raise CheckpointError(f"cannot write {path}: use a .safetensors, .ckpt, .pt or .pth file name")
    return path
