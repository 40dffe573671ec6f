"""The worker's device stage on CPU: launched batches give exactly what the encoder gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.device_encoder import DeviceEncoder


def test_launch_matches_the_encoder_and_its_mirror_image():
    from latentae import AutoencoderKL

    model = AutoencoderKL.from_preset("tiny").prepare(device="cpu")
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    encoder = DeviceEncoder(model, torch.device("cpu"))
    # Two batches launched before either is collected, as the worker does.
    first = encoder.launch(pixels, flip=True)
    second = encoder.launch(pixels[:2], flip=False)
    mean, logvar, flip_mean, flip_logvar = first.get()
    with torch.inference_mode():
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
        direct = model.encode(x)
        mirrored = model.encode(x.flip(3))
        direct2 = model.encode(x[:2].contiguous())
    np.testing.assert_array_equal(mean, direct.mean.numpy())
    np.testing.assert_array_equal(logvar, direct.logvar.numpy())
    np.testing.assert_array_equal(flip_mean, mirrored.mean.numpy())
    np.testing.assert_array_equal(flip_logvar, mirrored.logvar.numpy())
    mean2, _, none_mean, none_logvar = second.get()
    assert none_mean is None and none_logvar is None
    np.testing.assert_array_equal(mean2, direct2.mean.numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replay_matches_eager_launches():
    from latentae import AutoencoderKL

    model = AutoencoderKL.from_preset("tiny").prepare(device="cuda")
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(4, 64, 64, 3), (2, 64, 96, 3)] * 3]
    eager = DeviceEncoder(model, torch.device("cuda"), cuda_graphs=False)
    graphs = DeviceEncoder(model, torch.device("cuda"), cuda_graphs=True, lanes=2)
    # Two batches in flight at a time, shapes, flips and lanes (concurrent shards) interleaved.
    pending = []
    for i, pixels in enumerate(batches):
        flip = i % 3 == 0
        pending.append((eager.launch(pixels, flip=flip), graphs.launch(pixels, flip=flip, lane=i % 2), flip))
        if len(pending) == 2:
            want, got, f = pending.pop(0)
            _assert_same(want.get(), got.get(), f)
    for want, got, f in pending:
        _assert_same(want.get(), got.get(), f)
    assert graphs.captures and all(graphs.captures.values())


def _assert_same(want, got, flip):
    for w, g in zip(want, got):
        if w is None:
            assert g is None and not flip
        else:
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
