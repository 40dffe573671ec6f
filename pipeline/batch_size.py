"""`ray.batch_size`: the `auto` rule, and a check of a batch against the memory it needs.

`auto` depends only on the device type and the largest target size, never on how much memory
happens to be free: every worker of a job picks the same batch, so a shard's output (its row
order with aspect buckets, the low bits of its latents) does not depend on which worker encoded
it. The rule gives a GPU about 4 megapixels per encoder call (64 images at 256 px, 16 at 512, 4
at 1024; at most 128), which keeps an H100/H200-class device busy, and a CPU worker about one
megapixel (at most 16), where larger batches are not faster and only cost memory.

The memory check estimates the encoder's peak working set per image from its first level's
width (the largest activations are at full resolution): `bytes_per_channel_pixel` x channels x
height x width. Measured on the `sd` preset: 96 MiB per 256 px image on a CPU in fp32 (3 full
resolution tensors in channels-last, 4 in the default format; 16 is the larger), and 80 MiB in
bf16 on an H200 (5 tensors of 2 bytes: 10). A batch whose estimate exceeds what the worker can
count on (its share of the free device memory, or of the machine's available memory by its share
of the CPUs) is logged as a warning that names `ray.batch_size` and a batch that fits. It does
not change the batch: the estimate is an estimate, and the worker's own numbers decide.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["auto_batch_size", "bytes_per_image", "memory_budget", "batch_warning"]

#: Pixels per encoder call (batch x height x width) and the largest batch, per device type.
GPU_PIXELS, GPU_MAX = 64 * 256 * 256, 128
CPU_PIXELS, CPU_MAX = 16 * 256 * 256, 16
#: Share of the memory a worker can count on that one encoder call may take.
HEADROOM = 0.8


def _largest(sizes: list[tuple[int, int]]) -> tuple[int, int]:
    return max(sizes, key=lambda s: (s[0] * s[1], s))


def auto_batch_size(device_type: str, sizes: list[tuple[int, int]]) -> int:
    """The largest power of two within the pixel budget of `device_type` for the largest size."""
    h, w = _largest(sizes)
    pixels, most = (CPU_PIXELS, CPU_MAX) if device_type == "cpu" else (GPU_PIXELS, GPU_MAX)
    fit = max(1, min(most, pixels // (h * w)))
    return 1 << (fit.bit_length() - 1)


def bytes_per_image(channels: int, size: tuple[int, int], device_type: str, dtype: str) -> int:
    """Estimated peak working set of the encoder for one image of `size` (see the module doc)."""
    per = 10 if device_type != "cpu" and dtype in ("fp16", "bf16") else 16
    return per * int(channels) * size[0] * size[1]


def _available_host_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def memory_budget(device: Any, *, gpu_share: float | None, cpus: float) -> int | None:
    """Bytes one encoder call of this worker can count on; None when it cannot be told."""
    if device.type == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(device)
        share = min(1.0, gpu_share) if gpu_share else 1.0
        return int(min(free, total * share) * HEADROOM)
    if device.type != "cpu":
        return None
    available = _available_host_memory()
    if available is None:
        return None
    share = min(1.0, max(cpus, 1.0) / (os.cpu_count() or 1))
    return int(available * share * HEADROOM)


def batch_warning(batch: int, sizes: list[tuple[int, int]], channels: int, device_type: str, dtype: str,
                  budget: int | None) -> str | None:
    """The warning for a batch whose estimated memory exceeds `budget`, else None."""
    if budget is None:
        return None
    size = _largest(sizes)
    per = bytes_per_image(channels, size, device_type, dtype)
    if batch * per <= budget:
        return None
    fit = budget // per
    hint = (f"lower ray.batch_size to {1 << (int(fit).bit_length() - 1)}" if fit >= 1 else
            "even one image does not fit: lower the resolution, or give each worker more memory "
            "(fewer workers per machine, e.g. a larger ray.num_cpus_per_worker)")
    return (f"ray.batch_size {batch} at {size[0]}x{size[1]} needs about {batch * per / 2**30:.1f} GiB per "
            f"encoder call on {device_type} (estimated), more than the {budget / 2**30:.1f} GiB this worker "
            f"can count on; {hint}")

