"""The device stage of the encode worker: uint8 image batches in, posterior mean and logvar out.

`DeviceEncoder` runs the autoencoder's encoder on one device. On CUDA the upload, the compute and
the download of a batch are asynchronous (pinned staging buffers, a copy stream, optionally CUDA
graphs), so the worker's thread assembles the next batch while the device encodes this one;
`launch` returns a `PendingPosterior` that `get()` turns into numpy arrays when they are needed.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

__all__ = ["DeviceEncoder", "PendingPosterior"]

log = logging.getLogger(__name__)


class PendingPosterior:
    """Posterior tensors of one batch, on their way back to the host.

    `get()` waits for the device (CUDA: for this batch's copies only) and returns numpy arrays
    that the caller owns: (mean, logvar, flip_mean, flip_logvar), the flipped pair None unless
    asked for.
    """

    def __init__(self, host: list[Any], event: Any = None):
        self._host = host
        self._event = event

    def wait(self) -> None:
        """Block until the device has finished this batch (no-op on CPU, where it already has)."""
        if self._event is not None:
            self._event.synchronize()

    def get(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Wait for the batch; (mean, logvar, flip_mean, flip_logvar) as float32 numpy arrays."""
        if self._event is not None:
            self._event.synchronize()
            # The pinned buffers are reused two batches later: hand out copies.
            arrays = [t.numpy().copy() for t in self._host]
        else:
            arrays = [t.numpy() for t in self._host]
        mean, logvar = arrays[0], arrays[1]
        flip_mean, flip_logvar = (arrays[2], arrays[3]) if len(arrays) > 2 else (None, None)
        return mean, logvar, flip_mean, flip_logvar


class DeviceEncoder:
    """Runs the encoder on uint8 batches; on CUDA the copies and the compute are asynchronous.

    CPU: plain synchronous calls. CUDA: each batch is copied into one of two reused pinned host
    buffers and sent to the device on a separate copy stream (so the upload of batch N+1 overlaps
    the encoder's work on batch N); the compute stream waits for that copy only, runs the
    encoder, and copies the posterior back into reused pinned buffers without blocking; an event
    marks when they are filled. Only uint8 crosses the bus on the way in (4x less than float32);
    the scaling to [-1, 1] happens on the device. At most two batches use the buffers at a time
    (the one being encoded and the one being prepared): a caller collects batch N before it
    launches batch N+2 in the same lane, as the encode worker does.

    Shards encoded at the same time (from different threads) each use their own `lane`: a pair of
    slots, so the rule above holds per shard. A lock makes launches one at a time (on CPU, where
    the launch is the computation, whole encoder calls); collecting (`get`) needs no lock.

    With `cuda_graphs`, the encoder of each (slot, batch shape, flip) is captured once as a CUDA
    graph and then replayed: one call per batch instead of hundreds of kernel launches from
    Python. That matters because the launching thread shares the GIL with the decode threads;
    eager launches starve while they decode. All graphs share one memory pool (they replay one
    after another on one stream), and a shape whose capture fails falls back to eager calls.

    `model` is a prepared `AutoencoderKL` on `device` (a `torch.device`); `lanes` is the number of
    shards that may be encoded at the same time; `lock` (default: its own) is the launch lock, one
    shared by the encoders of several outputs on one device (`pipeline.fanout`).
    """

    def __init__(self, model: Any, device: Any, *, cuda_graphs: bool = False, lanes: int = 1,
                 lock: threading.Lock | None = None):
        import torch

        self.model = model
        self.device = device
        self.cuda = device.type == "cuda"
        slots = 2 * max(1, lanes)
        self._next = [0] * max(1, lanes)  # per lane: which of its two slots the next batch uses
        self._lock = lock if lock is not None else threading.Lock()
        # Per slot: pinned host input by shape, its upload-done event, pinned outputs by (index, shape).
        self._staging: list[dict[tuple, Any]] = [{} for _ in range(slots)]
        self._uploaded: list[Any] = [None] * slots
        self._outputs: list[dict[tuple, Any]] = [{} for _ in range(slots)]
        self.cuda_graphs = bool(cuda_graphs) and self.cuda
        # (slot, shape, flip) -> (graph, static uint8 input, static outputs), or None after a failed capture.
        self._graphs: dict[tuple, Any] = {}
        self._graph_pool: Any = None
        if self.cuda:
            self._copy_stream = torch.cuda.Stream(device=device)

    @property
    def captures(self) -> dict[tuple, bool]:
        """With `cuda_graphs`: each (slot, batch shape, flip) met so far -> True when it replays a
        captured CUDA graph, False when its capture failed and it runs eagerly."""
        return {key: entry is not None for key, entry in self._graphs.items()}

    def launch(self, pixels: np.ndarray, *, flip: bool, lane: int = 0) -> PendingPosterior:
        """Start encoding uint8 [B, H, W, 3] (and its mirror image when `flip`) in `lane`."""
        import torch

        with torch.inference_mode():
            if not self.cuda:
                # One encoder call at a time: two at once (shards or outputs of one worker) would
                # each start torch's CPU threads and oversubscribe the cores.
                with self._lock:
                    return PendingPosterior(self._encode_all(torch.from_numpy(pixels), flip))
            with self._lock:
                slot = 2 * lane + self._next[lane]
                self._next[lane] ^= 1
                return self._launch_cuda(pixels, flip, slot)

    def encode_now(self, pixels: np.ndarray, *, flip: bool, dtype: str) -> tuple[np.ndarray, ...]:
        """Encode uint8 [B, H, W, 3] (and its mirror image when `flip`) right away and eagerly,
        computing in `dtype` instead of the model's prepared dtype (the fp32 second try of images
        whose posterior was not finite, see `pipeline.finite`). Returns float32 numpy arrays
        (mean, logvar, flip_mean, flip_logvar), the flipped pair None unless asked for."""
        import torch

        # Under the lock: on CUDA it keeps this off the streams while another shard launches.
        with torch.inference_mode(), self._lock:
            outputs = self._encode_all(torch.from_numpy(pixels).to(self.device), flip, dtype)
            arrays = [t.cpu().numpy() for t in outputs]
        return (arrays[0], arrays[1], *(arrays[2:] if flip else (None, None)))

    def _encode(self, x: Any, dtype: str | None) -> tuple[Any, Any]:
        # x: uint8 NHWC on the device -> float32 mean, logvar (on the device).
        x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        posterior = self.model.encode(x, dtype=dtype)
        return posterior.mean.float(), posterior.logvar.float()

    def _encode_all(self, x: Any, flip: bool, dtype: str | None = None) -> list[Any]:
        outputs = list(self._encode(x, dtype))
        if flip:
            outputs += self._encode(x.flip(2), dtype)
        return outputs

    def _graph(self, slot: int, shape: tuple, flip: bool) -> Any:
        """The captured graph for this slot, shape and flip (captured on first use); None: run eagerly."""
        import torch

        key = (slot, shape, flip)
        if key in self._graphs:
            return self._graphs[key]
        entry = None
        try:
            torch.cuda.synchronize(self.device)
            static_in = torch.zeros(shape, dtype=torch.uint8, device=self.device)
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up (cuDNN/cuBLAS choose their kernels) before capture
                for _ in range(2):
                    self._encode_all(static_in, flip)
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            # thread_local: another shard's thread may wait on its events while this one captures.
            with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
                outputs = self._encode_all(static_in, flip)
            if self._graph_pool is None:
                self._graph_pool = graph.pool()
            entry = (graph, static_in, outputs)
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run this shape eagerly
            log.warning("CUDA graph capture failed for batch shape %s (flip=%s), encoding it eagerly: %s",
                        shape, flip, exc)
            torch.cuda.synchronize(self.device)
        self._graphs[key] = entry
        return entry

    def _launch_cuda(self, pixels: np.ndarray, flip: bool, slot: int) -> PendingPosterior:
        import torch

        staging = self._staging[slot].get(pixels.shape)
        if staging is None:
            staging = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
            self._staging[slot][pixels.shape] = staging
        if self._uploaded[slot] is not None:
            self._uploaded[slot].synchronize()  # the upload that last read this buffer is done
        staging.numpy()[...] = pixels
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            x = staging.to(self.device, non_blocking=True)
            uploaded = torch.cuda.Event()
            uploaded.record(self._copy_stream)
        self._uploaded[slot] = uploaded
        compute.wait_event(uploaded)
        # x was allocated on the copy stream; tell the caching allocator the compute stream uses it.
        x.record_stream(compute)
        graph = self._graph(slot, tuple(pixels.shape), flip) if self.cuda_graphs else None
        if graph is None:
            outputs = self._encode_all(x, flip)
        else:
            g, static_in, outputs = graph
            static_in.copy_(x)  # device to device, on the compute stream: ordered before the replay
            g.replay()
        host = []
        for i, t in enumerate(outputs):
            key = (i, tuple(t.shape))
            buf = self._outputs[slot].get(key)
            if buf is None:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                self._outputs[slot][key] = buf
            buf.copy_(t, non_blocking=True)
            host.append(buf)
        done = torch.cuda.Event()
        done.record(compute)
        return PendingPosterior(host, done)

