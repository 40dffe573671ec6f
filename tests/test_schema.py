"""schema.py: stored latent dtypes and the Arrow schemas of the shard, ledger and QA tables."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from output_builders import make_manifest

from pipeline.schema import (
    SCHEMA_METADATA_KEY,
    ShardColumns,
    errors_schema,
    from_storage,
    latent_schema,
    qa_schema,
    storage_arrow_type,
    storage_numpy_dtype,
    to_storage,
)


def test_bf16_matches_torch_rounding():
    x = np.concatenate([np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 100,
                        np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, 1e-40, np.nan], np.float32)])
    bits = to_storage(x, "bf16")
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(bits[finite], ref[finite])
    back = from_storage(bits, "bf16")
    assert np.isnan(back[~finite]).all()
    np.testing.assert_array_equal(back[finite], torch.from_numpy(ref.view(np.int16)).view(torch.bfloat16).float().numpy()[finite])


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_storage_types_agree(dtype):
    x = np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 3, 4)
    stored = to_storage(x, dtype)
    assert stored.dtype == storage_numpy_dtype(dtype)
    assert pa.array(stored.reshape(-1), storage_arrow_type(dtype)).type == storage_arrow_type(dtype)
    np.testing.assert_allclose(from_storage(stored, dtype), x, atol=0.02)
    with pytest.raises(ValueError, match="fp8"):
        to_storage(x, "fp8")


def test_latent_schema_fixed_and_variable():
    manifest = make_manifest(dtype="bf16")
    fixed = latent_schema(ShardColumns("bf16", ("latent", "logvar"), (4, 4, 4), 4), manifest)
    assert fixed.field("latent").type == pa.list_(pa.uint16(), 64)
    assert fixed.field("latent").metadata[b"dtype"] == b"bf16" and "latent_shape" not in fixed.names
    info = json.loads(fixed.metadata[SCHEMA_METADATA_KEY])
    assert info["latent_columns"] == ["latent", "logvar"] and info["shape"] == [4, 4, 4]
    assert info["scaling_factor"] == 0.5 and info["channels"] == 4
    variable = latent_schema(ShardColumns("fp16", ("latent",), None, 4), None)
    assert variable.field("latent").type == pa.list_(pa.float16())
    assert variable.field("latent_shape").type == pa.list_(pa.int32(), 3)
    info = json.loads(variable.metadata[SCHEMA_METADATA_KEY])
    assert info["shape"] is None and "scaling_factor" not in info
    assert variable.names[-3:] == ["original_size", "crop_top_left", "target_size"]


def test_side_table_schemas():
    assert errors_schema().names == ["key", "source", "stage", "error", "message"]
    assert all(f.type == pa.string() and f.nullable for f in errors_schema())
    qa = qa_schema()
    assert qa.names == ["key", "source", "bucket", "pixels", "pixels_shape", "latent", "latent_shape"]
    assert qa.field("pixels").type == pa.binary() and qa.field("latent").type == pa.list_(pa.float32())
