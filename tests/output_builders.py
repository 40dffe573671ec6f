"""Shared builders for the output-format tests: synthetic latent rows and whole outputs."""

from __future__ import annotations

import json

import numpy as np

from pipeline.manifest import Manifest, check_or_write_manifest
from pipeline.rows import ErrorRow, LatentRow
from pipeline.writer import ShardWriter

FINGERPRINT = {"preset": "tiny", "config": {"z_channels": 4}, "weights_sha256": "ab" * 32}


def make_manifest(fmt="parquet", dtype="fp32", store="mean+logvar", flip=True, shapes=((4, 4, 4),), **kw) -> Manifest:
    return Manifest(
        format=fmt,
        dtype=dtype,
        store=store,
        flip=flip,
        model=dict(FINGERPRINT),
        scaling_factor=0.5,
        shift_factor=0.25,
        latent_channels=shapes[0][0],
        downsample_factor=8,
        shapes=[list(s) for s in shapes],
        preprocess={"resolution": 32, "crop": "center"},
        **kw,
    )


def make_rows(shard: str, n: int, *, shapes=((4, 4, 4),), logvar=True, flip=True, seed=0, source=None):
    rng = np.random.default_rng([seed, n, len(shard)])
    rows = []
    for i in range(n):
        shape = shapes[i % len(shapes)]

        def arr(shape=shape):
            return rng.standard_normal(shape).astype(np.float32)

        rows.append(
            LatentRow(
                key=f"{shard}-{i:05d}",
                source=source or f"s3://user:secret@bucket/in/{shard}.tar",
                index=i,
                latent=arr(),
                logvar=(arr() - 4.0) if logvar else None,
                latent_flip=arr() if flip else None,
                logvar_flip=(arr() - 4.0) if (flip and logvar) else None,
                caption=None if i % 3 == 0 else f"caption {shard} {i}",
                meta=json.dumps({"i": i, "shard": shard}),
                original_size=(100 + i, 200 + i),
                crop_top_left=(i, 2 * i),
                target_size=(8 * shape[1], 8 * shape[2]),
            )
        )
    return rows


def write_output(
    root: str,
    shards: dict[str, int],
    *,
    manifest: Manifest | None = None,
    storage_options=None,
    row_group_rows: int | None = 3,
    errors: int = 1,
) -> tuple[Manifest, dict[str, list[LatentRow]]]:
    """Write a committed output with `shards` {name: rows}; returns the manifest and the rows written."""
    manifest = manifest or make_manifest()
    check_or_write_manifest(root, manifest, storage_options)
    written = {}
    shapes = [tuple(s) for s in manifest.shapes]
    for name, n in shards.items():
        rows = make_rows(name, n, shapes=shapes, logvar=manifest.has_logvar, flip=manifest.flip)
        with ShardWriter(root, name, manifest.format, manifest.dtype, storage_options, manifest,
                         row_group_rows=row_group_rows) as w:
            w.write(rows)
            for e in range(errors):
                w.add_error(ErrorRow(f"{name}-bad{e}", f"in/{name}.tar", "decode", "UnidentifiedImageError", "not an image"))
            w.commit()
        written[name] = rows
    return manifest, written
