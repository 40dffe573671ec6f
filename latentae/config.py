"""Typed configuration of an AutoencoderKL (architecture plus latent scaling)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .encoder import check_architecture


class AutoencoderConfigError(ValueError):
    """An autoencoder configuration field is missing, unknown or out of range (the message names it)."""


@dataclass
class AutoencoderConfig:
    """Architecture and latent statistics of a KL autoencoder (CompVis ``ddconfig`` + ``embed_dim``).

    ``ch_mult`` sets the number of levels; the spatial downsampling factor is ``2 ** (len(ch_mult)-1)``.
    ``attn_resolutions`` are feature-map sizes relative to ``resolution`` that get attention (the
    middle block always has one). ``embed_dim`` is the latent channel count after ``quant_conv``;
    without quant convs it must equal ``z_channels``. ``norm_num_groups`` is the GroupNorm group count
    (32 in CompVis models; diffusers' key of the same name); every level's width must be a multiple. Latents for diffusion are
    ``(z - shift_factor) * scaling_factor``.
    """

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 256
    z_channels: int = 4
    embed_dim: int = 4
    double_z: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    dropout: float = 0.0
    attn_type: str = "vanilla"
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        self.validate()

    @property
    def downsample_factor(self) -> int:
        """Spatial ratio between images and latents (8 for SD)."""
        return 2 ** (len(self.ch_mult) - 1)

    def validate(self) -> None:
        """Raise AutoencoderConfigError naming the first inconsistent field."""
        for name in ("in_channels", "out_channels", "resolution", "z_channels", "embed_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise AutoencoderConfigError(f"config field {name!r} must be a positive int, got {value!r}")
        check_architecture(self.ch, self.ch_mult, self.num_res_blocks, self.attn_type, self.norm_num_groups,
                           error=AutoencoderConfigError, label="config field")
        if not self.double_z:
            raise AutoencoderConfigError(
                "config field 'double_z' must be True for AutoencoderKL: the posterior takes its mean and "
                "logvar from the encoder output"
            )
        if not self.use_quant_conv and self.embed_dim != self.z_channels:
            raise AutoencoderConfigError(
                f"config field 'embed_dim' ({self.embed_dim}) must equal 'z_channels' ({self.z_channels}) "
                "when use_quant_conv is False"
            )
        if not self.use_post_quant_conv and self.embed_dim != self.z_channels:
            raise AutoencoderConfigError(
                f"config field 'embed_dim' ({self.embed_dim}) must equal 'z_channels' ({self.z_channels}) "
                "when use_post_quant_conv is False"
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise AutoencoderConfigError(f"config field 'dropout' must be in [0, 1), got {self.dropout!r}")
        if not float(self.scaling_factor) > 0.0:
            raise AutoencoderConfigError(f"config field 'scaling_factor' must be > 0, got {self.scaling_factor!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of the public configuration fields."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AutoencoderConfig:
        """Build from a dict such as ``to_dict()`` returns; unknown keys raise AutoencoderConfigError naming them."""
        known = set(cls.field_names())
        unknown = sorted(set(data) - known)
        if unknown:
            raise AutoencoderConfigError(f"unknown autoencoder config keys: {unknown} (known: {sorted(known)})")
        return cls(**data)

    def replace(self, **changes: Any) -> AutoencoderConfig:
        """Copy with some fields changed (validated)."""
        return AutoencoderConfig.from_dict({**self.to_dict(), **changes})

    def same_architecture(self, other: AutoencoderConfig) -> bool:
        """True when both configs build modules with identical parameter names and shapes.

        ``norm_num_groups`` is not compared: it changes no tensor, so a checkpoint cannot show it.
        """
        keys = ("in_channels", "out_channels", "ch", "ch_mult", "num_res_blocks", "z_channels", "embed_dim",
                "double_z", "use_quant_conv", "use_post_quant_conv", "attn_type")
        if any(getattr(self, k) != getattr(other, k) for k in keys):
            return False
        return self.attention_levels() == other.attention_levels()

    def attention_levels(self) -> tuple[int, ...]:
        """Indices of the levels that carry attention blocks (besides the middle block)."""
        return tuple(i for i in range(len(self.ch_mult)) if (self.resolution >> i) in self.attn_resolutions)
