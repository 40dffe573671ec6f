"""Job config: YAML loading, validation errors that name the key, overrides, env expansion."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, JobConfig, config_from_dict, load_config

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = {"input": {"urls": "data/{0..1}.tar"}, "output": {"path": "out"}}


def _with(**sections) -> dict:
    raw = {k: dict(v) for k, v in MINIMAL.items()}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def _error(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    return str(info.value)


def test_defaults_are_typed_sections():
    c = config_from_dict(MINIMAL)
    assert isinstance(c, JobConfig)
    assert c.output.format == "parquet" and c.output.dtype == "fp16" and c.output.store == "mean"
    assert c.model.preset == "tiny" and c.preprocess.target_sizes() == [(256, 256)]
    assert c.ray.max_attempts == 3 and c.ray.workers is None
    assert (c.qa.samples, c.qa.min_psnr, c.qa.max_nan, c.qa.lpips_weights) == (64, 20.0, 0, None)
    assert isinstance(c.ray.num_cpus_per_worker, float)


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"output": {"dtype": "fp64"}}, "output.dtype: expected one of fp32|fp16|bf16|fp8_e4m3, got 'fp64'"),
        ({"output": {"dtyp": "fp16"}}, "output.dtyp: unknown key (did you mean 'dtype'?)"),
        ({"ray": {"workers": "two"}}, "ray.workers: expected an integer, got 'two'"),
        ({"ray": {"batch_size": True}}, "ray.batch_size: expected an integer or one of auto, got True"),
        ({"ray": {"batch_size": "big"}}, "ray.batch_size: expected an integer or one of auto, got 'big'"),
        ({"ray": {"batch_size": 0}}, "ray.batch_size: must be >= 1, got 0"),
        ({"ray": {"max_attempts": 0}}, "ray.max_attempts: must be >= 1, got 0"),
        ({"preprocess": {"buckets": [[64, "a"]]}}, "preprocess.buckets[0][1]: expected an integer, got 'a'"),
        ({"preprocess": {"resolution": [64, 64, 3]}}, "preprocess.resolution: expected [height, width]"),
        ({"preprocess": {"crop": "middle"}}, "preprocess.crop: expected one of center|random, got 'middle'"),
        ({"preprocess": {"background": [0, 0, 300]}}, "preprocess.background: expected [r, g, b]"),
        ({"model": {"preset": "nope"}}, "model.preset: expected one of"),
        ({"qa": {"min_psnr": "high"}}, "qa.min_psnr: expected a number, got 'high'"),
        ({"output": {"store": "mode"}}, "output.store: expected one of mean|mean+logvar|sample"),
        ({"extra": {"a": 1}}, "extra: unknown key"),
    ],
)
def test_errors_name_the_key(sections, message):
    assert message in _error(_with(**sections))


def test_required_keys_and_sections():
    assert "output: required section is missing" in _error({"input": {"urls": "x.tar"}})
    assert "output.path: required key is missing" in _error({"input": {"urls": "x.tar"}, "output": {}})
    assert "input.urls: must list at least one" in _error(_with(input={"urls": []}))


def test_load_yaml_with_overrides_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENT_TEST_BUCKET", "bucket-a")
    path = tmp_path / "job.yaml"
    path.write_text(
        "input:\n  urls: s3://${LATENT_TEST_BUCKET}/{00..03}.tar\n"
        "output:\n  path: ${LATENT_TEST_OUT:-/tmp/out}\n"
        "preprocess:\n  resolution: 64\n"
    )
    c = load_config(path, ["ray.workers=4", "output.dtype=bf16", "preprocess.buckets=[[64, 64], [48, 80]]",
                           "input.storage_options.anon=true", "qa.lpips_weights=null"])
    assert c.input.urls == "s3://bucket-a/{00..03}.tar" and c.output.path == "/tmp/out"
    assert c.ray.workers == 4 and c.output.dtype == "bf16"
    assert c.preprocess.target_sizes() == [(64, 64), (48, 80)]
    assert c.input.storage_options == {"anon": True}
    assert c.source == str(path)
    with pytest.raises(ConfigError, match=r"^ray\.wokers: unknown key"):
        load_config(path, ["ray.wokers=4"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(path, ["ray.workers"])
    monkeypatch.delenv("LATENT_TEST_BUCKET")
    with pytest.raises(ConfigError, match=r"input\.urls: environment variable LATENT_TEST_BUCKET is not set"):
        load_config(path)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_to_dict_redacts_secrets():
    c = config_from_dict(_with(output={"storage_options": {"key": "AKIA123", "secret": "s3cr3t",
                                                            "client_kwargs": {"endpoint_url": "http://x"}}},
                               model={"weights": "s3://w/vae", "storage_options": {"secret": "m0del"}}))
    d = c.to_dict()
    assert d["model"]["storage_options"]["secret"] == "***" and "m0del" not in str(d)
    assert d["output"]["storage_options"]["secret"] == "***" and d["output"]["storage_options"]["key"] == "***"
    assert "s3cr3t" not in str(d) and "AKIA123" not in str(d)
    assert d["output"]["storage_options"]["client_kwargs"]["endpoint_url"] == "http://x"


def test_shipped_configs_validate():
    names = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert {"demo.yaml", "sd-vae.yaml", "sdxl.yaml", "flux.yaml", "s3.yaml"} <= set(names)
    for name in names:
        c = load_config(ROOT / "configs" / name)
        assert c.output.path
    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert demo.model.preset == "tiny" and demo.ray.num_gpus_per_worker == 0 and demo.ray.workers == 2
    assert demo.preprocess.target_sizes() == [(128, 128)] and demo.output.path == "demo-output"
    assert len(load_config(ROOT / "configs" / "sdxl.yaml").preprocess.target_sizes()) > 1


def test_channels_last_auto_follows_the_device():
    m = config_from_dict(_with()).model
    assert m.channels_last == "auto" and m.channels_last_on("cpu") and not m.channels_last_on("cuda")
    off = config_from_dict(_with(model={"channels_last": False})).model
    on = config_from_dict(_with(model={"channels_last": True})).model
    assert not off.channels_last_on("cpu") and on.channels_last_on("cuda")
    assert "model.channels_last" in _error(_with(model={"channels_last": "sometimes"}))
