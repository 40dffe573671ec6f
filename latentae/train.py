"""Training recipe for the ``tiny`` preset: a small AutoencoderKL fitted to the photos bundled with scikit-image.

The shipped ``latentae/weights/tiny.safetensors`` + ``tiny.json`` come from::

    python -m latentae.train --out latentae/weights

(defaults below; about 40 minutes on 2 CPU cores). The loss is reconstruction (L1 + MSE, with each
image's mean colour weighted extra) plus a small KL term, optimised with AdamW on random crops, flips
and tints of the training photos. A few photos are held out and never seen in training; their PSNR at
128x128 is reported during training and pinned by the tests. The photos and their train/held-out split
are `latentae.sample_photos`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .autoencoder import AutoencoderKL
from .checkpoint import CONFIG_METADATA_KEY
from .presets import get_preset
from .sample_photos import HELDOUT_PHOTOS, SampleDataMissing, load_rgb, sample_photos

log = logging.getLogger("latentae.train")

# Image files taken from --images: the formats of `pipeline.config.IMAGE_EXTS`, written out here because
# latentae does not depend on pipeline.
_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})

# Zoom levels of the held-out evaluation crops: the crop side is short_side / k (never below the output
# size), so the set covers whole-photo downscales (dense detail) and near-native crops (smooth detail).
_EVAL_ZOOMS: tuple[int, ...] = (1, 2, 3)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 [H, W, 3] -> float [3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of [C, H, W] or [B, C, H, W] to (h, w)."""
    batched = x.dim() == 4
    y = F.interpolate(x if batched else x[None], size=size, mode="bilinear", antialias=True, align_corners=False)
    return y if batched else y[0]


def eval_crops(photos: Sequence[tuple[str, np.ndarray]], size: int = 128) -> torch.Tensor:
    """Deterministic centre crops of each photo at several zoom levels, resized to size x size, in [-1, 1]."""
    crops = []
    for _, image in photos:
        x = to_tensor(image)
        h, w = x.shape[1:]
        for k in _EVAL_ZOOMS:
            side = max(size, min(h, w) // k)
            top, left = (h - side) // 2, (w - side) // 2
            crops.append(resize(x[:, top : top + side, left : left + side], (size, size)))
    return torch.stack(crops).clamp(-1.0, 1.0)


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [B, 3, H, W] images in [-1, 1], both quantised to 8 bits as a viewer sees them."""
    a = ((reference.clamp(-1, 1) + 1) * 127.5).round()
    b = ((reconstruction.clamp(-1, 1) + 1) * 127.5).round()
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10.0 * torch.log10(255.0**2 / mse)


@torch.no_grad()
def reconstruct(ae: AutoencoderKL, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Decode the posterior mean of each image."""
    out = [ae.decode(ae.encode(images[i : i + batch_size]).mode()) for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def heldout_psnr(ae: AutoencoderKL, size: int = 128) -> torch.Tensor:
    """Per-crop PSNR of `ae` on the held-out photos' evaluation crops (see eval_crops)."""
    images = eval_crops(sample_photos("heldout"), size)
    was_training = ae.training
    ae.eval()
    try:
        return psnr(images, reconstruct(ae, images))
    finally:
        ae.train(was_training)


class CropSampler:
    """Random square crops of the training photos at random zoom, flipped and re-coloured at random.

    The zoom spans native-resolution crops up to whole-photo downscales, the same range of detail density
    that an encode job sees after resizing images of any size to its target resolution.
    """

    def __init__(self, photos: Sequence[np.ndarray], generator: torch.Generator, augment: bool = True) -> None:
        if not photos:
            raise ValueError("no training photos")
        self.photos = [to_tensor(p) for p in photos]
        self.generator = generator
        self.augment = augment

    def _uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def crop(self, size: int) -> torch.Tensor:
        """One [3, size, size] crop in [-1, 1]."""
        x = self.photos[int(torch.randint(len(self.photos), (), generator=self.generator))]
        h, w = x.shape[1:]
        max_zoom = max(1.0, min(h, w) / size)
        side = min(min(h, w), round(size * max_zoom ** self._uniform()))
        top = int(torch.randint(h - side + 1, (), generator=self.generator))
        left = int(torch.randint(w - side + 1, (), generator=self.generator))
        c = x[:, top : top + side, left : left + side]
        if side != size:
            c = resize(c, (size, size))
        if not self.augment:
            return c.clamp(-1.0, 1.0)
        if self._uniform() < 0.5:
            c = c.flip(2)
        # Ten of the sixteen training photos are grey: permuted channels and mild random tints (per-channel
        # gain and offset, also of grey photos) keep colour from being a rare input.
        if self._uniform() < 0.5:
            c = c[torch.randperm(3, generator=self.generator)]
        if self._uniform() < 0.5:
            gain = 0.7 + 0.5 * torch.rand(3, 1, 1, generator=self.generator)
            offset = 0.4 * torch.rand(3, 1, 1, generator=self.generator) - 0.2
            c = c * gain + offset
        return c.clamp(-1.0, 1.0)

    def batch(self, size: int, count: int) -> torch.Tensor:
        return torch.stack([self.crop(size) for _ in range(count)])


@dataclass
class TrainConfig:
    """Hyper-parameters of the recipe; the defaults produced the shipped tiny weights (2 CPU threads)."""

    preset: str = "tiny"
    steps: int = 4000
    batch_size: int = 16  # at 64 px; larger crops get proportionally fewer images (same pixels per step)
    crop_sizes: tuple[int, ...] = (64,)
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    kl_weight: float = 1e-6  # per pixel value, as in the LDM first-stage recipe
    mean_weight: float = 5.0  # extra weight on each image's mean-colour error (see loss_terms)
    chroma_weight: float = 1.0  # initial weight of the colour axes of the error (see _chroma_weight_at); 1: plain RGB
    chroma_steps: int = 1000  # ... decaying linearly to 1 over these steps
    ema_decay: float = 0.999
    init_logvar: float = -6.0  # start with a near-deterministic posterior (see _init_logvar)
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
    eval_every: int = 250
    images: str | None = None  # a folder of training images instead of the bundled photos
    holdout: tuple[str, ...] = field(default_factory=lambda: HELDOUT_PHOTOS)


def _lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _chroma_weight_at(cfg: TrainConfig, step: int) -> float:
    """Colour-error weight: cfg.chroma_weight at first, linearly down to 1 (plain RGB error) by chroma_steps.

    Chroma is a small share of an image's variance, so with a plain RGB loss the model learns it last:
    it outputs grey images for thousands of steps (~17.5 dB on colour photos) before colour appears.
    Stressing the colour axes early breaks that plateau; returning to 1 then optimises plain PSNR.
    """
    if step >= cfg.chroma_steps:
        return 1.0
    return cfg.chroma_weight + (1.0 - cfg.chroma_weight) * step / max(1, cfg.chroma_steps)


def _training_photos(cfg: TrainConfig) -> list[np.ndarray]:
    if cfg.images is None:
        return [img for name, img in sample_photos("all") if name not in cfg.holdout]
    paths = sorted(p for p in Path(cfg.images).rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images found under --images {cfg.images}")
    return [load_rgb(p) for p in paths]


def loss_terms(
    ae: AutoencoderKL, x: torch.Tensor, cfg: TrainConfig, generator: torch.Generator, chroma_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Reconstruction and KL terms of one batch; 'loss' is their weighted sum.

    The error is taken in an orthonormal luminance/opponent-colour basis (with unit weights its MSE is
    the RGB MSE) so that `chroma_weight` can stress the colour axes.
    """
    posterior = ae.encode(x)
    y = ae.decode(posterior.sample(generator=generator))
    err = torch.einsum("ck,bkhw->bchw", _OPPONENT.to(x.device), y - x)
    if chroma_weight != 1.0:
        err = err * torch.tensor([1.0, chroma_weight, chroma_weight], device=x.device).view(1, 3, 1, 1)
    l1 = err.abs().mean()
    mse = err.pow(2).mean()
    kl = posterior.kl().sum() / x.numel()
    loss = cfg.l1_weight * l1 + cfg.mse_weight * mse + cfg.kl_weight * kl
    terms = {"loss": loss, "l1": l1, "mse": mse, "kl": kl}
    if cfg.mean_weight:
        # The squared error of each image's mean colour: part of the MSE already, stressed because
        # GroupNorm hides global statistics and models learn overall colour last.
        colour = (y - x).mean(dim=(2, 3)).pow(2).mean()
        terms["loss"] = loss + cfg.mean_weight * colour
        terms["colour"] = colour
    return terms


# Rows: luminance (R+G+B), red-green, yellow-blue; orthonormal, so with unit weights the MSE is RGB's.
_OPPONENT = torch.tensor([
    [1 / math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3)],
    [1 / math.sqrt(2), -1 / math.sqrt(2), 0.0],
    [1 / math.sqrt(6), 1 / math.sqrt(6), -2 / math.sqrt(6)],
])


def _init_logvar(ae: AutoencoderKL, value: float) -> None:
    """Bias the posterior's log-variance to `value` at initialisation.

    With the default logvar of 0 the sampled latent is mostly unit noise, the decoder can only learn the
    blurry average image, and training sits on a plateau (~17.5 dB here) until the encoder slowly learns
    to shrink its variance. Starting small skips that plateau; the KL term still shapes the variance.
    """
    conv = ae.quant_conv if ae.config.use_quant_conv else ae.encoder.conv_out
    with torch.no_grad():
        conv.bias[conv.bias.shape[0] // 2 :].fill_(value)


def train(cfg: TrainConfig, model_config=None) -> tuple[AutoencoderKL, dict]:
    """Train an autoencoder per `cfg`; returns the EMA model and a summary (time, held-out PSNR)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    ae = AutoencoderKL(model_config if model_config is not None else get_preset(cfg.preset)).to(device)
    _init_logvar(ae, cfg.init_logvar)
    ema = AutoencoderKL(ae.config).to(device)
    ema.load_state_dict(ae.state_dict())
    ema.requires_grad_(False)
    ema.eval()
    decay, no_decay = [], []
    for p in ae.parameters():
        # Norm scales and biases are not weights to shrink.
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.99),
    )
    sampler = CropSampler(_training_photos(cfg), generator)
    eval_images = eval_crops(sample_photos("heldout"), 128).to(device) if cfg.images is None else None
    base_pixels = cfg.batch_size * 64 * 64
    start = time.monotonic()
    history: list[dict] = []
    running: dict[str, float] = {}
    for step in range(cfg.steps):
        size = cfg.crop_sizes[int(torch.randint(len(cfg.crop_sizes), (), generator=generator))]
        x = sampler.batch(size, max(1, round(base_pixels / (size * size)))).to(device)
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        terms = loss_terms(ae, x, cfg, generator, _chroma_weight_at(cfg, step))
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        # EMA ramps up so early steps do not drag the average towards the random init.
        d = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), ae.parameters()):
                pe.lerp_(p, 1 - d)
        for k, v in terms.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            n = cfg.eval_every if (step + 1) % cfg.eval_every == 0 else (step + 1) % cfg.eval_every
            record = {"step": step + 1, "minutes": round((time.monotonic() - start) / 60, 2)}
            record.update({k: round(v / n, 5) for k, v in running.items()})
            running = {}
            if eval_images is not None:
                record["heldout_psnr"] = round(float(psnr(eval_images, reconstruct(ema, eval_images)).mean()), 3)
            history.append(record)
            log.info(json.dumps(record))
    for be, b in zip(ema.buffers(), ae.buffers()):
        be.copy_(b)
    summary = {"train_minutes": round((time.monotonic() - start) / 60, 1), "threads": cfg.threads,
               "history": history}
    if history and "heldout_psnr" in history[-1]:
        summary["heldout_psnr_128"] = history[-1]["heldout_psnr"]
    return ema, summary


@torch.no_grad()
def latent_factors(ae: AutoencoderKL, photos: Sequence[np.ndarray], size: int = 128, seed: int = 0) -> tuple[float, float]:
    """(scaling_factor, shift_factor) that bring the training latents to zero mean and unit variance.

    Measured on posterior means of random training crops, so downstream diffusion training sees latents
    on the scale it expects (the same convention as SD's 0.18215 and FLUX's shift).
    """
    sampler = CropSampler(photos, torch.Generator().manual_seed(seed), augment=False)
    ae.eval()
    device = next(ae.parameters()).device
    z = torch.cat([ae.encode(sampler.batch(size, 16).to(device)).mode() for _ in range(8)])
    shift = float(z.mean())
    scale = 1.0 / float((z - shift).std())
    return float(f"{scale:.5g}"), float(f"{shift:.5g}")


def save_weights(ae: AutoencoderKL, out_dir: str | Path, name: str, training: dict) -> tuple[Path, Path]:
    """Write NAME.safetensors and NAME.json (the config that ``from_preset`` applies, plus how it was made).

    Tensors are stored as fp16: half the size, and the PSNR it costs is far below 0.01 dB.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().to(torch.float16).contiguous() for k, v in ae.state_dict().items()}
    weights = out / f"{name}.safetensors"
    save_file(tensors, str(weights), metadata={"format": "pt", CONFIG_METADATA_KEY: json.dumps(ae.config.to_dict())})
    config = out / f"{name}.json"
    config.write_text(json.dumps({"config": ae.config.to_dict(), "training": training}, indent=2) + "\n")
    return weights, config


# TrainConfig fields that are command-line options (--steps, --batch-size, ...), with their help texts.
_CLI_FIELDS = (
    "preset", "steps", "batch_size", "crop_sizes", "lr", "warmup_steps", "weight_decay", "l1_weight", "mse_weight",
    "kl_weight", "mean_weight", "chroma_weight", "chroma_steps", "ema_decay", "init_logvar", "seed", "threads",
    "device", "eval_every", "images",
)
_CLI_HELP = {
    "preset": "architecture to train (default: %(default)s)",
    "batch_size": "images per step at 64 px",
    "threads": "torch CPU threads (default: %(default)s)",
    "device": "torch device to train on (default: %(default)s)",
    "images": "train on this folder of images instead of the sample photos",
}


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m latentae.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="latentae/weights", help="folder for NAME.safetensors and NAME.json")
    p.add_argument("--name", default=None, help="file name stem (default: the preset name)")
    for name in _CLI_FIELDS:
        default = getattr(d, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(default, tuple):
            p.add_argument(flag, type=type(default[0]), nargs="+", default=list(default), help=_CLI_HELP.get(name))
        else:
            kind = str if default is None else type(default)
            p.add_argument(flag, type=kind, default=default, help=_CLI_HELP.get(name))
    p.add_argument("--z-channels", type=int, default=None, help="override the preset's latent channels")
    p.add_argument("--ch", type=int, default=None, help="override the preset's base width")
    p.add_argument("--ch-mult", type=int, nargs="+", default=None, help="override the preset's level widths")
    p.add_argument("--attn-type", default=None, help="override the preset's attention type")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args = _parse_args(argv)
    values = {name: getattr(args, name) for name in _CLI_FIELDS}
    values["crop_sizes"] = tuple(values["crop_sizes"])
    cfg = TrainConfig(**values)
    overrides = {"z_channels": args.z_channels, "embed_dim": args.z_channels, "ch": args.ch,
                 "ch_mult": tuple(args.ch_mult) if args.ch_mult else None, "attn_type": args.attn_type}
    model_config = get_preset(cfg.preset).replace(**{k: v for k, v in overrides.items() if v is not None})
    try:
        ae, summary = train(cfg, model_config)
        photos = _training_photos(cfg)
    except SampleDataMissing as exc:
        log.error("%s", exc)
        return 2
    scale, shift = latent_factors(ae, photos, seed=cfg.seed)
    ae.config = ae.config.replace(scaling_factor=scale, shift_factor=shift)
    # Measure what ships: the weights after their fp16 round trip.
    ae.load_state_dict({k: v.half().float() for k, v in ae.state_dict().items()})
    training = {
        "recipe": " ".join(["python -m latentae.train", *(sys.argv[1:] if argv is None else argv)]),
        "train_minutes": summary["train_minutes"],
        "threads": cfg.threads,
        "device": cfg.device,
        "torch": torch.__version__,
        "hyperparameters": asdict(cfg),
    }
    if cfg.images is None:
        crop_psnr = heldout_psnr(ae.cpu())
        training["heldout_photos"] = list(cfg.holdout)
        training["heldout_psnr_128"] = round(float(crop_psnr.mean()), 2)
        training["heldout_psnr_128_min"] = round(float(crop_psnr.min()), 2)
    weights, config = save_weights(ae, args.out, args.name or cfg.preset, training)
    log.info("wrote %s and %s (scaling_factor=%s shift_factor=%s)", weights, config, scale, shift)
    log.info("summary: %s", json.dumps({k: v for k, v in training.items() if k != "hyperparameters"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
