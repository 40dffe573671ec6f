"""Encoder and Decoder of the LDM autoencoder family (CompVis parameter names and semantics).

Submodule names follow the original ``ldm/modules/diffusionmodules/model.py`` layout
(``conv_in``, ``down.{i}.block.{j}``, ``down.{i}.attn.{j}``, ``down.{i}.downsample``,
``mid.block_1``, ``mid.attn_1``, ``mid.block_2``, ``norm_out``, ``conv_out``; decoder ``up.{i}``),
so original checkpoints load without renaming.

Example (the seed configuration)::

    enc = Encoder(ch=64, out_ch=3, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=[16],
                  in_channels=3, resolution=128, z_channels=16)
    enc(torch.randn(1, 3, 128, 128)).shape  # (1, 16, 8, 8)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTN_TYPES = ("vanilla", "linear", "none")

# Above this many tokens the query axis of vanilla attention is processed in chunks, so that even when
# the fused SDPA kernels are unavailable (the "math" fallback) no full N x N score matrix is held:
# at 1024x1024 with an f8 model the mid block has 16384 tokens, i.e. a 1 GiB fp32 score matrix per image.
_ATTN_QUERY_CHUNK = 4096


def _no_graph(t: Tensor) -> bool:
    """True when autograd records nothing through ``t``, so updating it in place is safe."""
    return not (torch.is_grad_enabled() and t.requires_grad)


def _swish(x: Tensor) -> Tensor:
    # In place when no graph is recorded: saves an activation-sized allocation (and, on CPU, the page
    # faults of a fresh large buffer) per call. With autograd on, silu's backward needs its input intact.
    return F.silu(x, inplace=True) if _no_graph(x) else F.silu(x)


def _add_residual(h: Tensor, x: Tensor) -> Tensor:
    """``h + x``, written into ``h`` (a fresh block output) when no graph is recorded."""
    return h.add_(x) if _no_graph(h) else h + x


class Normalize(nn.GroupNorm):
    """GroupNorm(32 groups, eps=1e-6, affine) that stays numerically safe in reduced precision.

    Under fp16/bf16 autocast PyTorch would upcast the whole activation to fp32 for GroupNorm and hand
    fp32 on to the next conv. Instead the native kernel runs on the half-precision tensor directly:
    it accumulates mean and variance in fp32 internally, so statistics stay accurate without
    materialising an fp32 copy of large activations.
    """

    def __init__(self, in_channels: int, num_groups: int = 32) -> None:
        super().__init__(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            with torch.autocast(device_type=x.device.type, enabled=False):
                return F.group_norm(
                    x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps
                )
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, followed by a 3x3 conv when ``with_conv``."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.with_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """x2 downsampling: asymmetric (0,1,0,1) zero pad + stride-2 3x3 conv, or 2x2 average pooling."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            # No padding in the conv itself: the original pads right/bottom only (see forward).
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        if self.with_conv:
            x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)
            return self.conv(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: norm-swish-conv twice, with a shortcut when channels change.

    The shortcut is a 1x1 conv (``nin_shortcut``) by default, a 3x3 conv (``conv_shortcut``) when
    ``conv_shortcut`` is True, as in the original.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        conv_shortcut: bool = False,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut

        self.norm1 = Normalize(in_channels, norm_num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels, norm_num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        h = _swish(self.norm1(x))
        h = self.conv1(h)
        h = _swish(self.norm2(h))
        h = self.dropout(h)
        h = self.conv2(h)
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return _add_residual(h, x)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with residual (the original "vanilla" AttnBlock).

    Same math as the original (softmax(q k^T / sqrt(C)) v with 1x1-conv projections), computed by
    ``F.scaled_dot_product_attention`` so that fused kernels avoid materialising the score matrix.
    """

    def __init__(self, in_channels: int, norm_num_groups: int = 32) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels, norm_num_groups)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # Projections run as one Linear over [B, N, C] tokens with q, k, v stacked: a single GEMM instead
        # of three 1x1 convs (faster on CPU), and the same arithmetic as diffusers' Attention.
        tokens = self.norm(x).reshape(b, c, h * w).transpose(1, 2)
        weight = torch.cat([self.q.weight, self.k.weight, self.v.weight]).reshape(3 * c, c)
        bias = torch.cat([self.q.bias, self.k.bias, self.v.bias])
        q, k, v = F.linear(tokens, weight, bias).reshape(b, h * w, 3, c).permute(2, 0, 1, 3).unsqueeze(2)
        if h * w <= _ATTN_QUERY_CHUNK:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            # Queries are independent, so chunking them bounds memory on any SDPA backend.
            out = torch.cat(
                [F.scaled_dot_product_attention(qc, k, v) for qc in q.split(_ATTN_QUERY_CHUNK, dim=2)],
                dim=2,
            )
        out = F.linear(out.squeeze(1), self.proj_out.weight.reshape(c, c), self.proj_out.bias)
        # The result keeps the token-major (channels_last) layout of the projection, as diffusers' does:
        # no copy back to NCHW, and the following convs then compute exactly what diffusers computes.
        return _add_residual(out.transpose(1, 2).reshape(b, c, h, w), x)


class LinAttnBlock(nn.Module):
    """Linear attention block with the LDM ``LinAttnBlock`` semantics.

    One head of width ``in_channels``; keys are softmax-normalised over positions and contracted with
    values first, so cost is linear in the number of positions. Faithful to the original, the block
    has neither a normalisation nor a residual connection: its output replaces its input.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.to_qkv = nn.Conv2d(in_channels, in_channels * 3, kernel_size=1, bias=False)
        self.to_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.to_qkv(x).reshape(b, 3, c, h * w).unbind(dim=1)
        k = k.softmax(dim=-1)
        context = torch.bmm(k, v.transpose(1, 2))  # [B, C_k, C_v]
        out = torch.bmm(context.transpose(1, 2), q)  # [B, C_v, N]
        return self.to_out(out.reshape(b, c, h, w))


def make_attn(in_channels: int, attn_type: str = "vanilla", norm_num_groups: int = 32) -> nn.Module:
    """Build the attention block named by ``attn_type`` ("vanilla", "linear" or "none" = identity)."""
    if attn_type == "vanilla":
        return AttnBlock(in_channels, norm_num_groups)
    if attn_type == "linear":
        return LinAttnBlock(in_channels)
    if attn_type == "none":
        return nn.Identity()
    raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {attn_type!r}")


def check_architecture(
    ch: int,
    ch_mult: Sequence[int],
    num_res_blocks: int,
    attn_type: str,
    norm_num_groups: int,
    *,
    error: type[ValueError] = ValueError,
    label: str = "argument",
) -> None:
    """Raise `error` naming the first of these arguments that cannot build an Encoder or Decoder.

    `AutoencoderConfig.validate` runs the same checks on its fields (``label="config field"``).
    """
    for name, value in (("ch", ch), ("num_res_blocks", num_res_blocks), ("norm_num_groups", norm_num_groups)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise error(f"{label} {name!r} must be a positive int, got {value!r}")
    if ch % norm_num_groups != 0:
        raise error(f"{label} 'ch' must be a multiple of 'norm_num_groups' ({norm_num_groups}), got {ch}")
    if not ch_mult or any(m <= 0 for m in ch_mult):
        raise error(f"{label} 'ch_mult' must be non-empty positive ints, got {tuple(ch_mult)}")
    if attn_type not in ATTN_TYPES:
        raise error(f"{label} 'attn_type' must be one of {ATTN_TYPES}, got {attn_type!r}")


class Level(nn.Module):
    """One resolution level: ResnetBlocks ``block.{j}``, each followed by ``attn.{j}`` when the level
    has attention. The Encoder adds ``downsample`` after it, the Decoder ``upsample``."""

    def __init__(
        self, *, in_channels: int, out_channels: int, num_blocks: int, attention: bool, dropout: float,
        attn_type: str, norm_num_groups: int,
    ) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(num_blocks):
            self.block.append(ResnetBlock(in_channels=in_channels, out_channels=out_channels, dropout=dropout,
                                          norm_num_groups=norm_num_groups))
            in_channels = out_channels
            if attention:
                self.attn.append(make_attn(out_channels, attn_type, norm_num_groups))

    def forward(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if self.attn:
                h = self.attn[i](h)
        return h


class MidBlock(nn.Module):
    """The middle of both halves, at the lowest resolution: ``block_1``, ``attn_1``, ``block_2``."""

    def __init__(self, channels: int, *, dropout: float, attn_type: str, norm_num_groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(in_channels=channels, out_channels=channels, dropout=dropout,
                                   norm_num_groups=norm_num_groups)
        self.attn_1 = make_attn(channels, attn_type, norm_num_groups)
        self.block_2 = ResnetBlock(in_channels=channels, out_channels=channels, dropout=dropout,
                                   norm_num_groups=norm_num_groups)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image -> latent moments. Downsamples by ``2 ** (len(ch_mult) - 1)``.

    Args:
        ch: base channel count; level ``i`` has ``ch * ch_mult[i]`` channels.
        out_ch: unused by the encoder; accepted so one argument set builds both halves.
        ch_mult: per-level channel multipliers; the number of levels.
        num_res_blocks: ResnetBlocks per level.
        attn_resolutions: feature-map sizes (relative to ``resolution``) that get attention after
            each ResnetBlock; the middle block always has one attention block.
        dropout: dropout inside ResnetBlocks.
        resamp_with_conv: strided conv (True) or average pooling (False) for downsampling.
        in_channels: image channels.
        resolution: nominal input size; it only decides where attention sits. Any H, W divisible by
            the downsampling factor work.
        z_channels: latent channels.
        double_z: output ``2 * z_channels`` (mean and logvar) instead of ``z_channels``.
        attn_type: "vanilla", "linear" or "none".
        norm_num_groups: GroupNorm groups (32 in every CompVis model; every level's width must divide).
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int = 3,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = False,
        attn_type: str = "vanilla",
        norm_num_groups: int = 32,
    ) -> None:
        super().__init__()
        check_architecture(ch, ch_mult, num_res_blocks, attn_type, norm_num_groups)
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.z_channels = z_channels
        self.double_z = double_z
        attn_resolutions = tuple(attn_resolutions)
        block_args = {"dropout": dropout, "attn_type": attn_type, "norm_num_groups": norm_num_groups}

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        curr_res = resolution
        in_ch_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block_out = ch * ch_mult[i_level]
            down = Level(in_channels=ch * in_ch_mult[i_level], out_channels=block_out, num_blocks=num_res_blocks,
                         attention=curr_res in attn_resolutions, **block_args)
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_out, resamp_with_conv)
                curr_res = curr_res // 2
            self.down.append(down)
        block_in = ch * ch_mult[-1]

        self.mid = MidBlock(block_in, **block_args)

        self.norm_out = Normalize(block_in, norm_num_groups)
        self.conv_out = nn.Conv2d(
            block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1
        )

    @property
    def downsample_factor(self) -> int:
        """Ratio between input and latent spatial size."""
        return 2 ** (self.num_resolutions - 1)

    def forward(self, x: Tensor) -> Tensor:
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"Encoder input must be [B, C, H, W] with H and W divisible by {f}, got {tuple(x.shape)}")
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            h = down(h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid(h)
        h = _swish(self.norm_out(h))
        return self.conv_out(h)


class Decoder(nn.Module):
    """Latent -> image. Upsamples by ``2 ** (len(ch_mult) - 1)``.

    Takes the Encoder's arguments (``in_channels`` is accepted and unused, ``out_ch`` is the image
    channel count) plus:

    Args:
        give_pre_end: return the last feature map before ``norm_out``/``conv_out``.
        tanh_out: squash the output with tanh.
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int = 3,
        resolution: int,
        z_channels: int,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        attn_type: str = "vanilla",
        norm_num_groups: int = 32,
    ) -> None:
        super().__init__()
        check_architecture(ch, ch_mult, num_res_blocks, attn_type, norm_num_groups)
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.z_channels = z_channels
        self.out_ch = out_ch
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out
        attn_resolutions = tuple(attn_resolutions)
        block_args = {"dropout": dropout, "attn_type": attn_type, "norm_num_groups": norm_num_groups}

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = MidBlock(block_in, **block_args)

        # Built from the lowest resolution up, but stored so that up[i] is level i (as the encoder's
        # down[i]): this is the original's (and every checkpoint's) indexing.
        ups: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i_level]
            up = Level(in_channels=block_in, out_channels=block_out, num_blocks=num_res_blocks + 1,
                       attention=curr_res in attn_resolutions, **block_args)
            block_in = block_out
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res = curr_res * 2
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)

        self.norm_out = Normalize(block_in, norm_num_groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    @property
    def upsample_factor(self) -> int:
        """Ratio between output and latent spatial size."""
        return 2 ** (self.num_resolutions - 1)

    def forward(self, z: Tensor) -> Tensor:
        if z.ndim != 4 or z.shape[1] != self.z_channels:
            raise ValueError(f"Decoder input must be [B, {self.z_channels}, h, w], got {tuple(z.shape)}")
        h = self.mid(self.conv_in(z))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            h = up(h)
            if i_level != 0:
                h = up.upsample(h)
        if self.give_pre_end:
            return h
        h = _swish(self.norm_out(h))
        h = self.conv_out(h)
        if self.tanh_out:
            h = torch.tanh(h)
        return h
