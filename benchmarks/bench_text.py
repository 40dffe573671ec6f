"""Caption embeddings: what text encoding costs next to image encoding, and what it stores.

    python -m benchmarks.bench_text                                  # CPU: tiny VAE at 128 px, CLIP-L + T5-base
    python -m benchmarks.bench_text --device cuda --preset sdxl --resolution 1024 --text clip-l,clip-g --batch 8

The text models are randomly initialised with the architecture of real ones (weights do not change
what they cost), saved to the work folder by transformers with a word-level tokenizer built here:
nothing is downloaded. Captions are 8 to 60 words (30 on average, a recaptioned dataset's length).

1. Cost per sample: the text encoders (tokenize + model + copy back) against the image encoder
   (`DeviceEncoder`) on the same batches, median ms per sample.
2. The pipeline: `EncodeWorker.process_shard` over the same shards with and without `text:`,
   images/s (one worker in this process, as one actor runs it; model loading not counted).
3. Bytes per caption: each text column's stored Parquet bytes per row (zstd, from the file's
   column chunk sizes) against what padding to max_length would store.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import median, photo_pool, table

#: Text architectures: (kind, transformers config, max_length, outputs stored).
ARCHITECTURES = {
    "tiny": ("t5", dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4), 128, ["last"]),
    "clip-l": ("clip", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
               77, ["penultimate", "pooled"]),
    "clip-g": ("clip", dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                            projection_dim=1280), 77, ["penultimate", "projected"]),
    "t5-base": ("t5", dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                           feed_forward_proj="gated-gelu"), 512, ["last"]),
    "t5-xxl": ("t5", dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                          feed_forward_proj="gated-gelu"), 512, ["last"]),
}
WORDS = ("a photo of the cat dog red blue green tabby rocket moon coffee cup coins grass astronaut on in with "
         "under over close up view bright dark morning evening light shadow wooden table old new small large "
         "street city forest river mountain sky cloud person woman man child standing sitting").split()


def _captions(n: int, rng: np.random.Generator) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 61)))) for _ in range(n)]


def make_shards(folder: Path, shards: int, per_shard: int, side: int, seed: int = 0) -> list[str]:
    """WebDataset tars of JPEG crops of the bundled photos with captions of 8 to 60 words."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = photo_pool()
    urls = []
    for s in range(shards):
        path = folder / f"{s:05d}.tar"
        urls.append(str(path))
        with tarfile.open(path, "w") as tar:
            for i, caption in enumerate(_captions(per_shard, rng)):
                buf = io.BytesIO()
                Image.fromarray(photos[int(rng.integers(len(photos)))]).resize((side, side)).save(buf, "JPEG", quality=90)
                for ext, payload in (("jpg", buf.getvalue()), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{s:05d}{i:05d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return urls


def build_text_model(name: str, folder: Path) -> dict:
    """Save a randomly initialised text model of architecture `name` and its tokenizer; returns its
    `text:` entry."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        PreTrainedTokenizerFast,
        T5Config,
        T5EncoderModel,
    )

    kind, arch, max_length, outputs = ARCHITECTURES[name]
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    vocab["<bos>"], vocab["<eos>"] = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    if kind == "clip":
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                            pad_token="<eos>", unk_token="<unk>")
        config = CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=max_length,
                                bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"], pad_token_id=vocab["<eos>"],
                                **arch)
        model = (CLIPTextModelWithProjection if "projected" in outputs else CLIPTextModel)(config)
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", vocab["<eos>"])])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
        model = T5EncoderModel(T5Config(vocab_size=len(vocab), pad_token_id=0, eos_token_id=vocab["<eos>"],
                                        decoder_start_token_id=0, **arch))
    path = folder / name
    if not (path / "config.json").exists():
        model.save_pretrained(str(path))
        tokenizer.save_pretrained(str(path))
    return {"name": name.replace("-", "_"), "kind": kind, "path": str(path), "max_length": max_length,
            "outputs": outputs}


def _config(urls: list[str], out: Path, args, text: list[dict] | None):
    from pipeline.config import config_from_dict

    raw = {
        "input": {"urls": urls},
        "output": {"path": str(out), "dtype": "fp16"},
        "model": {"preset": args.preset, "dtype": args.dtype},
        "preprocess": {"resolution": args.resolution},
        "ray": {"batch_size": args.batch, "num_cpus_per_worker": args.cpus, "decode_threads": args.decode_threads},
        "qa": {"samples": 0},
    }
    if text:
        raw["text"] = [dict(t, dtype=args.dtype, storage_dtype="bf16" if args.dtype == "bf16" else "fp16") for t in text]
    return config_from_dict(raw)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cost_per_sample(worker, urls: list[str], args) -> list[list]:
    """Median ms per sample of each text encoder and of the image encoder, on one batch of a shard."""
    from pipeline.reader import ShardReader
    from pipeline.text_encoders import TextEncoders

    samples = [s for s in ShardReader(urls[0]) if hasattr(s, "caption")][: args.batch]
    items = [(s.key, s.image) for s in samples]
    pixels = np.stack([p.pixels for p in worker.decode_pool.result(worker.decode_pool.submit(items), items)])
    captions = [s.caption for s in samples]

    def ms_per_sample(fn) -> float:
        fn()
        times = []
        for _ in range(args.repeats):
            _sync(worker.device)
            t0 = time.perf_counter()
            fn()
            _sync(worker.device)
            times.append(time.perf_counter() - t0)
        return median(times) / len(samples) * 1000

    image_ms = ms_per_sample(lambda: worker.device_encoder.launch(pixels, flip=False).get())
    rows = [[f"image encoder ({args.preset}, {args.resolution} px)", f"{image_ms:.2f}", "1.00"]]
    for encoder in worker.text_encoders.encoders:
        alone = TextEncoders([], worker.device)
        alone.encoders = [encoder]
        ms = ms_per_sample(lambda alone=alone: alone.launch(captions).get())
        rows.append([f"text: {encoder.name} (max_length {encoder.cfg.max_length})", f"{ms:.2f}",
                     f"{ms / image_ms:.2f}"])
    return rows


def encode(worker, urls: list[str], names: list[str]) -> float:
    """Images/s of `worker` over the shards (model loading not counted)."""
    images, seconds = 0, 0.0
    for url, name in zip(urls, names):
        result = worker.process_shard(url, name, fresh=True)
        images += result.rows
        seconds += result.seconds
    return images / seconds


def stored_bytes(out: Path, names: list[str], manifest) -> list[list]:
    """Per text column: stored Parquet bytes per row against padded bytes per row."""
    import pyarrow.parquet as pq

    from pipeline.text import TextLayout

    layout = TextLayout.from_manifest(manifest.text)
    sizes: dict[str, int] = {}
    rows = 0
    for name in names:
        meta = pq.ParquetFile(out / "shards" / f"{name}.parquet").metadata
        rows += meta.num_rows
        for r in range(meta.num_row_groups):
            rg = meta.row_group(r)
            for c in range(rg.num_columns):
                col = rg.column(c)
                top = col.path_in_schema.split(".")[0]
                sizes[top] = sizes.get(top, 0) + col.total_compressed_size
    out_rows = []
    for c in layout.columns:
        itemsize = 2 if c.dtype != "fp32" else 4
        padded = int(np.prod(c.shape)) * itemsize
        stored = sizes[c.name] / rows
        out_rows.append([c.name, "x".join(str(v) for v in c.shape), c.dtype, "real tokens" if c.variable else "max_length" if c.sequence else "a vector",
                         f"{stored / 1024:,.1f} KiB", f"{padded / 1024:,.1f} KiB", f"{padded / stored:.1f}x"])
    return out_rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--text", default="clip-l,t5-base", help=f"comma-separated, of {', '.join(ARCHITECTURES)}")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--per-shard", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="compute dtype of every model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cpus", type=float, default=2, help="ray.num_cpus_per_worker of the worker")
    p.add_argument("--decode-threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    from pipeline.layout import shard_name

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-text-"))
    urls = make_shards(work / "shards", args.shards, args.per_shard, side=max(args.resolution, 160))
    names = [shard_name(u) for u in urls]
    text = [build_text_model(n, work / "models") for n in args.text.split(",")]

    from pipeline.worker import EncodeWorker

    worker = EncodeWorker(_config(urls, work / "out-images", args, None), device=args.device, set_threads=True)
    try:
        images_only = encode(worker, urls, names)
    finally:
        worker.close()
    worker = EncodeWorker(_config(urls, work / "out-text", args, text), device=args.device, set_threads=True)
    try:
        with_text = encode(worker, urls, names)
        costs = cost_per_sample(worker, urls, args)
    finally:
        worker.close()
    sizes = stored_bytes(work / "out-text", names, worker.manifest)
    where = f"{args.device}, {args.cpus:g} CPUs, batch {args.batch}, {args.dtype}"
    print(table(f"Cost per sample ({where})", ["model", "ms per sample", "x image encoder"], costs))
    print(table(f"Pipeline ({args.shards} x {args.per_shard} images, {where})", ["job", "images/s"],
                [["images only", f"{images_only:.1f}"], [f"images + text ({args.text})", f"{with_text:.1f}"]]))
    print(table("Bytes per caption (Parquet, zstd)", ["column", "shape", "dtype", "stored as", "stored", "padded",
                                                      "padded / stored"], sizes))
    if args.json:
        Path(args.json).write_text(json.dumps({"costs": costs, "images_only": images_only, "with_text": with_text,
                                               "bytes": sizes, "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
