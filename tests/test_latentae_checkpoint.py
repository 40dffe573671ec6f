"""Checkpoint loading/saving in every supported format, built in the test from small random tensors."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentae import AutoencoderConfig, AutoencoderKL, get_preset
from latentae.checkpoint import (
    ArchitectureError,
    CheckpointError,
    CheckpointKeyError,
    CheckpointShapeError,
    UnsafeCheckpointError,
    diffusers_to_native,
    native_to_diffusers,
    read_tensors,
)
from latentae.config import AutoencoderConfigError

SMALL = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, scaling_factor=0.5)
FLUXLIKE = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, embed_dim=16,
                             use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                             shift_factor=0.1159)
# Attention at levels 1 and 2 (feature sizes 128 and 64 of 256): a kl-f16/kl-f32-like layout.
ATTN_LEVELS = AutoencoderConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(128, 64),
                                z_channels=4, embed_dim=4, scaling_factor=1.0)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _model(config: AutoencoderConfig = SMALL, seed: int = 0) -> AutoencoderKL:
    """A model whose every tensor (norms included) is distinct, so a misplaced tensor shows."""
    torch.manual_seed(seed)
    model = AutoencoderKL(config)
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    return model


def _assert_same_tensors(model: AutoencoderKL, native: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(native)
    for key, value in native.items():
        assert torch.equal(state[key], value.reshape(state[key].shape).to(state[key].dtype)), key


def _assert_same_outputs(a: AutoencoderKL, b: AutoencoderKL) -> None:
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(a.encode(x).mean, b.encode(x).mean)


def _diffusers_small(**kw):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    args = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                scaling_factor=0.25)
    args.update(kw)
    model = diffusers.AutoencoderKL(**args)
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    return model


def test_diffusers_folder_safetensors_bin_and_pipeline_folder(tmp_path):
    d = _diffusers_small()
    d.save_pretrained(tmp_path / "st")
    d.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").is_file()
    shutil.copytree(tmp_path / "st", tmp_path / "pipe" / "vae")
    native = diffusers_to_native(d.state_dict())
    loaded = [AutoencoderKL.from_pretrained(tmp_path / sub) for sub in ("st", "bin", "pipe")]
    for ae in loaded:
        _assert_same_tensors(ae, native)
        assert ae.scaling_factor == 0.25 and ae.config.ch_mult == (1, 2) and ae.latent_channels == 4
    assert loaded[0].weights_sha256 == loaded[1].weights_sha256 is not None
    assert loaded[0].weights_source.endswith("diffusion_pytorch_model.safetensors")


def test_diffusers_single_file_with_config_preset_or_inferred(tmp_path):
    d = _diffusers_small()
    d.save_pretrained(tmp_path / "st")
    single = tmp_path / "vae.safetensors"
    shutil.copy(tmp_path / "st" / "diffusion_pytorch_model.safetensors", single)
    native = diffusers_to_native(load_file(single))
    _assert_same_tensors(AutoencoderKL.from_pretrained(single, config=SMALL), native)
    _assert_same_tensors(AutoencoderKL.from_pretrained(single, config=SMALL.to_dict()), native)
    inferred = AutoencoderKL.from_pretrained(single)
    _assert_same_tensors(inferred, native)
    assert inferred.config.same_architecture(SMALL)


def test_old_attention_naming_and_both_weight_shapes(tmp_path):
    d = _diffusers_small()
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, value in d.state_dict().items():
        for new, legacy in renames.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{legacy}.")
                if value.ndim == 2:
                    value = value[:, :, None, None]  # conv-shaped projections
        old[key] = value.contiguous()
    assert any(".query.weight" in k for k in old)
    save_file(old, str(tmp_path / "old.safetensors"))
    ae = AutoencoderKL.from_pretrained(tmp_path / "old.safetensors", config=SMALL)
    _assert_same_tensors(ae, diffusers_to_native(d.state_dict()))


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_compvis_full_checkpoint(tmp_path, suffix, caplog):
    ref = _model()
    full = {f"first_stage_model.{k}": v for k, v in ref.state_dict().items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3)
    full["cond_stage_model.transformer.embeddings.weight"] = torch.randn(10, 8)
    path = tmp_path / f"full{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": full, "global_step": 7, "epoch": 1}, path)
    else:
        save_file(full, str(path))
    with caplog.at_level(logging.WARNING, logger="latentae"):
        ae = AutoencoderKL.from_pretrained(path)
    assert "matches no preset" in caplog.text  # scaling factor unknown: warned, not guessed
    _assert_same_tensors(ae, ref.state_dict())
    _assert_same_outputs(ae, ref)
    assert AutoencoderKL.from_pretrained(path, config=SMALL).scaling_factor == 0.5


def test_standalone_files_no_prefix_and_vae_prefix(tmp_path):
    ref = _model()
    plain = dict(ref.state_dict())
    plain["loss.logvar"] = torch.zeros(())  # LDM training checkpoints carry their loss module
    torch.save({"state_dict": plain}, tmp_path / "plain.ckpt")
    torch.save(dict(ref.state_dict()), tmp_path / "bare.pt", _use_new_zipfile_serialization=False)  # legacy
    save_file({f"vae.{k}": v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "vae.safetensors"))
    for name in ("plain.ckpt", "bare.pt", "vae.safetensors"):
        _assert_same_tensors(AutoencoderKL.from_pretrained(tmp_path / name, config=SMALL), ref.state_dict())


def test_full_safetensors_reads_only_autoencoder_tensors(tmp_path):
    ref = _model()
    full = {f"first_stage_model.{k}": v.contiguous() for k, v in ref.state_dict().items()}
    full["model.diffusion_model.out.weight"] = torch.randn(4, 4)
    save_file(full, str(tmp_path / "full.safetensors"))
    tensors, stored = read_tensors(tmp_path / "full.safetensors")
    assert stored is None and set(tensors) == set(ref.state_dict())


def test_flux_style_file_without_quant_convs_bf16(tmp_path):
    ref = _model(FLUXLIKE)
    bf16 = {k: v.to(torch.bfloat16).contiguous() for k, v in ref.state_dict().items()}
    assert not any("quant_conv" in k for k in bf16)
    save_file(bf16, str(tmp_path / "ae.safetensors"))
    ae = AutoencoderKL.from_pretrained(tmp_path / "ae.safetensors")
    assert ae.quant_conv is None and ae.post_quant_conv is None and ae.latent_channels == 16
    assert ae.encoder.conv_in.weight.dtype == torch.float32
    _assert_same_tensors(ae, bf16)  # bf16 values are held exactly in fp32
    flux = AutoencoderKL.from_pretrained(tmp_path / "ae.safetensors", config=FLUXLIKE)
    assert (flux.scaling_factor, flux.shift_factor) == (0.3611, 0.1159)


def test_attention_at_other_levels_inferred(tmp_path):
    ref = _model(ATTN_LEVELS)
    assert any(k.startswith("encoder.down.1.attn.0.") for k in ref.state_dict())
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "f.safetensors"))
    ae = AutoencoderKL.from_pretrained(tmp_path / "f.safetensors")
    assert ae.config.attention_levels() == (1, 2)
    _assert_same_tensors(ae, ref.state_dict())
    _assert_same_outputs(ae, ref)
    # Through diffusers naming and back, at every level.
    conv = native_to_diffusers(ref.state_dict(), 3)
    assert "encoder.down_blocks.1.attentions.0.to_q.weight" in conv
    assert "decoder.up_blocks.0.attentions.1.to_out.0.bias" in conv  # up_blocks.0 is level 2
    _assert_same_tensors(ae, diffusers_to_native(conv))


def test_inference_uses_unique_preset_factors(tmp_path):
    ref = _model(get_preset("tiny"))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "t.safetensors"))
    ae = AutoencoderKL.from_pretrained(tmp_path / "t.safetensors")
    assert ae.config == get_preset("tiny")


def test_linear_attention_roundtrip(tmp_path):
    cfg = SMALL.replace(attn_type="linear", attn_resolutions=(128,))
    ref = _model(cfg)
    with pytest.raises(AutoencoderConfigError, match="linear"):
        ref.save_pretrained(tmp_path / "d")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "lin.safetensors"))
    ae = AutoencoderKL.from_pretrained(tmp_path / "lin.safetensors")
    assert ae.config.attn_type == "linear" and ae.config.attention_levels() == (1,)
    _assert_same_outputs(ae, ref)


def test_save_roundtrips(tmp_path):
    ref = _model(SMALL.replace(shift_factor=0.125))
    ref.save_pretrained(tmp_path / "diffusers")
    cfg = json.loads((tmp_path / "diffusers" / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKL" and cfg["block_out_channels"] == [32, 64]
    ref.save_compvis(tmp_path / "vae.safetensors")
    ref.save_compvis(tmp_path / "vae.ckpt")
    ref.save_compvis(tmp_path / "full.safetensors", prefix="first_stage_model.")
    assert next(iter(load_file(tmp_path / "full.safetensors"))).startswith("first_stage_model.")
    digests = set()
    for name in ("diffusers", "vae.safetensors", "vae.ckpt", "full.safetensors"):
        ae = AutoencoderKL.from_pretrained(tmp_path / name)
        assert ae.config == ref.config, name  # config (scaling/shift included) travels with the file
        _assert_same_tensors(ae, ref.state_dict())
        digests.add(ae.weights_sha256)
    assert len(digests) == 1  # the digest is of the weights, not of the file format
    again = AutoencoderKL.from_pretrained(tmp_path / "diffusers")
    again.save_pretrained(tmp_path / "diffusers2")
    assert load_file(tmp_path / "diffusers2" / "diffusion_pytorch_model.safetensors").keys() == load_file(
        tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors").keys()


def test_key_and_shape_errors(tmp_path):
    ref = _model()
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    missing = dict(state)
    del missing["decoder.up.0.block.1.norm2.bias"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointKeyError, match=r"missing key\(s\): \[decoder\.up\.0\.block\.1\.norm2\.bias\]") as exc:
        AutoencoderKL.from_pretrained(tmp_path / "missing.safetensors", config=SMALL)
    assert exc.value.missing == ["decoder.up.0.block.1.norm2.bias"] and exc.value.unexpected == []

    extra = dict(state, **{"encoder.bogus.weight": torch.zeros(2)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointKeyError, match=r"unexpected key\(s\): \[encoder\.bogus\.weight\]"):
        AutoencoderKL.from_pretrained(tmp_path / "extra.safetensors", config=SMALL)

    save_file(state, str(tmp_path / "ok.safetensors"))
    with pytest.raises(CheckpointShapeError, match=r"'encoder\.conv_out\.weight' has shape \(8, 64, 3, 3\), the model "
                                                   r"expects \(16, 64, 3, 3\)"):
        AutoencoderKL.from_pretrained(tmp_path / "ok.safetensors", config=SMALL.replace(z_channels=8, embed_dim=8))


def test_architecture_and_format_errors(tmp_path):
    ref = _model()
    decoder_only = {k: v.contiguous() for k, v in ref.state_dict().items() if k.startswith("decoder.")}
    save_file(decoder_only, str(tmp_path / "dec.safetensors"))
    with pytest.raises(ArchitectureError, match=r"no tensor 'encoder\.conv_in\.weight'.*preset="):
        AutoencoderKL.from_pretrained(tmp_path / "dec.safetensors")
    save_file({"unet.weight": torch.zeros(2)}, str(tmp_path / "unet.safetensors"))
    with pytest.raises(CheckpointError, match="no autoencoder tensors"):
        AutoencoderKL.from_pretrained(tmp_path / "unet.safetensors")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported checkpoint file"):
        AutoencoderKL.from_pretrained(tmp_path / "w.onnx")
    with pytest.raises(CheckpointError, match="not found"):
        AutoencoderKL.from_pretrained(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="only local paths"):
        AutoencoderKL.from_pretrained("s3://bucket/vae.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        AutoencoderKL.from_pretrained(tmp_path / "empty")


class _Exploit:
    """Pickles to a call of os.system: loading it without weights_only would run the command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"
    state = {k: v for k, v in _model().state_dict().items()}
    torch.save({"state_dict": state, "hook": _Exploit(str(marker))}, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="refused to load .*evil.ckpt"):
        AutoencoderKL.from_pretrained(tmp_path / "evil.ckpt", config=SMALL)
    assert not marker.exists()


def test_from_preset_shipped_weights(tmp_path, monkeypatch, caplog):
    weights = tmp_path / "tiny.safetensors"
    ref = _model(get_preset("tiny"))
    ref.save_compvis(weights)
    (tmp_path / "tiny.json").write_text(json.dumps({"scaling_factor": 0.77, "config": {"shift_factor": 0.1},
                                                    "trained_steps": 10}))
    monkeypatch.setattr("latentae.autoencoder.SHIPPED_WEIGHTS", {"tiny": weights})
    with caplog.at_level(logging.WARNING, logger="latentae"):
        ae = AutoencoderKL.from_preset("tiny")
    assert "RANDOM WEIGHTS" not in caplog.text
    assert ae.preset == "tiny" and ae.weights_sha256 is not None
    assert (ae.scaling_factor, ae.shift_factor) == (0.77, 0.1)
    _assert_same_tensors(ae, ref.state_dict())
    assert ae.fingerprint()["weights_sha256"] == ae.weights_sha256
    # Any preset with explicit weights.
    other = AutoencoderKL.from_preset("tiny", weights=weights)
    assert other.preset == "tiny" and other.weights_sha256 == ae.weights_sha256
