"""LPIPS (Zhang et al. 2018, AlexNet variant, v0.1) from weights on local disk only.

Nothing is downloaded: `qa.lpips_weights` names a file (.safetensors, .pth, .pt) or a folder of
such files whose tensors together hold
  - the AlexNet feature extractor under torchvision's names `features.{0,3,6,8,10}.{weight,bias}`
    (e.g. torchvision's `alexnet-owt-7be5be79.pth`), and
  - the five LPIPS linear heads `lin{0..4}.model.1.weight` (e.g. the `alex.pth` of the LPIPS
    release).
Prefixes such as `net.` or `model.` are ignored, so a single merged file works too.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.qa.errors import QAError

_CHANNELS = (64, 192, 384, 256, 256)
# Input normalisation of the LPIPS release: inputs in [-1,1] are shifted/scaled to ImageNet statistics.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_BACKBONE_KEYS = tuple(f"features.{i}.{p}" for i in (0, 3, 6, 8, 10) for p in ("weight", "bias"))


class LPIPS(nn.Module):
    """Learned perceptual distance: 0 for identical images, larger is more different."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.ModuleDict({
            "0": nn.Conv2d(3, 64, 11, stride=4, padding=2),
            "3": nn.Conv2d(64, 192, 5, padding=2),
            "6": nn.Conv2d(192, 384, 3, padding=1),
            "8": nn.Conv2d(384, 256, 3, padding=1),
            "10": nn.Conv2d(256, 256, 3, padding=1),
        })
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.features
        x = (x - self.shift) / self.scale
        t1 = F.relu(f["0"](x))
        t2 = F.relu(f["3"](F.max_pool2d(t1, 3, 2)))
        t3 = F.relu(f["6"](F.max_pool2d(t2, 3, 2)))
        t4 = F.relu(f["8"](t3))
        t5 = F.relu(f["10"](t4))
        return [t1, t2, t3, t4, t5]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distance per image of two batches [B,3,H,W] in [-1,1] -> [B]."""
        total = torch.zeros(a.shape[0], device=a.device, dtype=torch.float32)
        for head, fa, fb in zip(self.heads, self._taps(a), self._taps(b)):
            # Unit-normalise each position's feature vector so the heads weigh directions, not magnitudes.
            na = fa / (fa.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + head((na - nb).pow(2)).mean(dim=(1, 2, 3)).float()
        return total

    @classmethod
    def from_local(cls, path: str | Path) -> LPIPS:
        """Build from local weight file(s); raises QAError naming the path and any missing tensor."""
        tensors = _read_tensors(Path(path))
        model = cls()
        state = {}
        for name in _BACKBONE_KEYS:
            state[name] = _find(tensors, name, path)
        for i in range(5):
            state[f"heads.{i}.weight"] = _find(tensors, f"lin{i}.model.1.weight", path)
        state["shift"] = model.shift
        state["scale"] = model.scale
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise QAError(f"LPIPS weights at {path} do not fit the AlexNet LPIPS layout: {exc}") from exc
        return model.eval().requires_grad_(False)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".pth", ".pt", ".bin"))
        if not files:
            raise QAError(f"qa.lpips_weights: no .safetensors/.pth/.pt file in folder {path}")
    elif path.is_file():
        files = [path]
    else:
        raise QAError(f"qa.lpips_weights: {path} does not exist (weights are never downloaded)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(str(f))
        else:
            # weights_only: a weight file must never be able to run code.
            loaded = torch.load(str(f), map_location="cpu", weights_only=True)
            if isinstance(loaded, dict) and "state_dict" in loaded:
                loaded = loaded["state_dict"]
        tensors.update({k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)})
    return tensors


def _find(tensors: dict[str, torch.Tensor], name: str, path: str | Path) -> torch.Tensor:
    matches = [k for k in tensors if k == name or k.endswith("." + name)]
    if not matches:
        raise QAError(f"LPIPS weights at {path}: tensor {name!r} is missing")
    return tensors[min(matches, key=len)].float()
