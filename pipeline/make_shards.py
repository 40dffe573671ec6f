"""Turn a folder of images, or the bundled sample photos, into WebDataset tar shards.

    python -m pipeline make-shards PHOTOS/ --out shards/ --per-shard 1000
    python -m pipeline make-shards --sample --out demo-shards --shards 4 --per-shard 64

Each sample is ``KEY.jpg`` (or the image's own extension) + ``KEY.txt`` (caption) + ``KEY.json``
(metadata). Shards are named ``00000.tar``, ``00001.tar``, ... so that ``{00000..00003}.tar`` or
``*.tar`` addresses them. Output is deterministic for a given input and ``--seed``: rerunning the
command rewrites byte-identical shards, so a latent job over them can resume.

``--sample`` draws random crops (several scales and aspect ratios, mirrored at random) from the
natural photos that ship inside scikit-image, captioned from their file names. The photos held out
from training the ``tiny`` autoencoder (``latentae.sample_photos.HELDOUT_PHOTOS``) are included and marked
``"split": "heldout"`` in the metadata, so the QA report of the demo covers photos the model never saw.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import storage
from .config import IMAGE_EXTS

log = logging.getLogger("pipeline.make_shards")

# Folder images taken as they are (the formats the encode job decodes by default): file suffix ->
# member extension, one spelling per format.
_MEMBER_EXT = {"jpeg": "jpg", "tif": "tiff"}
FOLDER_SUFFIXES = {f".{ext}": _MEMBER_EXT.get(ext, ext) for ext in IMAGE_EXTS}
SHARD_PATTERN = "{:05d}.tar"
# Aspect ratios (width / height) of the sample crops: the common photo and video formats both ways.
SAMPLE_ASPECTS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16)
# Longest side of a sample crop; larger crops are downscaled (the demo encodes at 128 px anyway).
SAMPLE_MAX_SIDE = 384


class MakeShardsError(RuntimeError):
    """The shards cannot be made as asked (the message names the folder, file or option)."""


@dataclass
class Sample:
    """One WebDataset sample: the image bytes with their extension, a caption and JSON metadata."""

    key: str
    image: bytes
    ext: str
    caption: str
    meta: dict

    def members(self) -> dict[str, bytes]:
        return {
            self.ext: self.image,
            "txt": self.caption.encode("utf-8"),
            "json": json.dumps(self.meta, sort_keys=True).encode("utf-8"),
        }


def _encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        image.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    else:
        image.save(buf, format=fmt.upper())
    return buf.getvalue()


def caption_from_name(stem: str) -> str:
    """'red_car-02' -> 'red car 02': the file name as words, the caption of last resort."""
    return " ".join(stem.replace("_", " ").replace("-", " ").split())


# -- folder input ------------------------------------------------------------------------------------


def find_images(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursive), sorted by relative path for a stable order."""
    root = Path(folder)
    if not root.is_dir():
        raise MakeShardsError(f"input folder {root} does not exist or is not a folder")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES)


def folder_samples(
    paths: Sequence[Path], root: str | Path, min_size: int, max_size: int | None, quality: int,
) -> Iterator[Sample | None]:
    """One sample per image file, or None for a file that is skipped (unreadable or too small).

    Images are stored as they are unless --max-size asks for a downscale; the caption comes from a
    sidecar ``NAME.txt`` next to the image when there is one, else from the file name.
    """
    root = Path(root)
    for path in paths:
        rel = path.relative_to(root).as_posix()
        try:
            with Image.open(path) as img:
                img.load()
                width, height = img.size
                data = None
                if max_size is not None and max(width, height) > max_size:
                    img.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
                    data = _encode(img.convert("RGB"), "jpg", quality)
                    stored = img.size
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            log.warning("skipping %s: not a readable image (%s)", rel, exc)
            yield None
            continue
        if min(width, height) < min_size:
            log.info("skipping %s: %dx%d is below --min-size %d", rel, width, height, min_size)
            yield None
            continue
        sidecar = path.with_suffix(".txt")
        caption = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else caption_from_name(path.stem)
        meta = {"source": rel, "width": width, "height": height}
        if data is None:
            data, ext = path.read_bytes(), FOLDER_SUFFIXES[path.suffix.lower()]
        else:
            ext = "jpg"
            meta["stored_size"] = [stored[1], stored[0]]
        yield Sample(key="", image=data, ext=ext, caption=caption, meta=meta)


# -- bundled sample photos ---------------------------------------------------------------------------


def _load_photo(name: str) -> Image.Image:
    from latentae.sample_photos import sample_photo_path

    with Image.open(sample_photo_path(name)) as img:
        return img.convert("RGB")


def sample_crops(
    count: int, seed: int, min_size: int, split: str = "all", fmt: str = "jpg", quality: int = 95,
) -> Iterator[Sample]:
    """`count` random crops of the bundled photos: every photo equally often, in a seeded random order.

    A crop covers 15-100% of the photo's area at one of SAMPLE_ASPECTS, is mirrored half the time, and
    is downscaled to at most SAMPLE_MAX_SIDE on its long side; its short side is at least `min_size`.
    """
    # The photo set and its train/held-out split are the ones the tiny weights were trained with.
    from latentae.sample_photos import HELDOUT_PHOTOS, SAMPLE_PHOTOS, SampleDataMissing, photo_names

    try:
        names = photo_names(split)
    except ValueError:
        raise MakeShardsError(f"--split must be 'all', 'train' or 'heldout', not {split!r}") from None
    try:
        photos = {name: _load_photo(name) for name in names}
    except SampleDataMissing as exc:
        raise MakeShardsError(str(exc)) from None
    small = [n for n, img in photos.items() if min(img.size) < min_size]
    if small:
        raise MakeShardsError(f"--min-size {min_size} is larger than the sample photos {small}")
    rng = np.random.default_rng(seed)
    order: list[str] = []
    for i in range(count):
        if i % len(names) == 0:
            order.extend(rng.permutation(names).tolist())
        name = order[i]
        img = photos[name]
        w, h = img.size
        aspect = float(rng.choice(SAMPLE_ASPECTS))
        area = rng.uniform(0.15, 1.0) * w * h
        cw = int(min(w, round(math.sqrt(area * aspect))))
        ch = int(min(h, round(math.sqrt(area / aspect))))
        # Keep the short side at least min_size without leaving the photo.
        if min(cw, ch) < min_size:
            grow = min_size / min(cw, ch)
            cw, ch = min(w, math.ceil(cw * grow)), min(h, math.ceil(ch * grow))
        left = int(rng.integers(0, w - cw + 1))
        top = int(rng.integers(0, h - ch + 1))
        crop = img.crop((left, top, left + cw, top + ch))
        flip = bool(rng.random() < 0.5)
        if flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        scale = min(1.0, SAMPLE_MAX_SIDE / max(cw, ch))
        if scale < 1.0:
            size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
            if min(size) < min_size:  # extreme aspect: keep the short side, let the long side exceed
                scale = min_size / min(cw, ch)
                size = (max(min_size, round(cw * scale)), max(min_size, round(ch * scale)))
            crop = crop.resize(size, Image.Resampling.LANCZOS)
        meta = {
            "photo": name,
            "split": "heldout" if name in HELDOUT_PHOTOS else "train",
            "source_size": [h, w],
            "crop_box": [top, left, ch, cw],  # top, left, height, width in the source photo
            "flip": flip,
            "width": crop.size[0],
            "height": crop.size[1],
        }
        yield Sample(key="", image=_encode(crop, fmt, quality), ext=fmt, caption=SAMPLE_PHOTOS[name], meta=meta)


# -- writing -----------------------------------------------------------------------------------------


def _write_tar(path: str, samples: Iterable[Sample]) -> int:
    """Write samples to a tar at `path`; fixed mtime/owner so equal input gives byte-equal shards."""
    n = 0
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext, data in sample.members().items():
                info = tarfile.TarInfo(f"{sample.key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
            n += 1
    return n


def write_shards(
    samples: Iterable[Sample | None],
    out: str,
    per_shard: int,
    max_samples: int | None = None,
    storage_options: dict | None = None,
) -> tuple[list[str], int, int]:
    """Pack samples into shards of `per_shard` under `out` (a folder or any fsspec URL).

    Keys are the global sample index (9 digits), unique across shards. None entries count as skipped.
    Returns (shard urls, samples written, samples skipped). Each shard is built in a local temporary file
    and published whole, so a reader never sees half a shard.
    """
    if per_shard <= 0:
        raise MakeShardsError(f"--per-shard must be positive, got {per_shard}")
    urls: list[str] = []
    written = skipped = 0
    batch: list[Sample] = []

    def flush() -> None:
        name = SHARD_PATTERN.format(len(urls))
        url = storage.join(out, name)
        # A private folder rather than mkstemp: the shard keeps the usual umask permissions when moved.
        with tempfile.TemporaryDirectory(prefix="make-shards-") as tmp:
            _write_tar(os.path.join(tmp, name), batch)
            storage.put_file(os.path.join(tmp, name), url, storage_options, move=True)
        log.info("wrote %s (%d samples)", storage.redact(url), len(batch))
        urls.append(url)
        batch.clear()

    for sample in samples:
        if sample is None:
            skipped += 1
            continue
        if max_samples is not None and written >= max_samples:
            break
        sample.key = f"{written:09d}"
        batch.append(sample)
        written += 1
        if len(batch) == per_shard:
            flush()
    if batch:
        flush()
    return urls, written, skipped


def _check_stale(out: str, keep: int, storage_options: dict | None) -> None:
    """Refuse to leave shards of an earlier, larger run next to the new ones (a *.tar glob would read them)."""
    names = storage.list_files(out, storage_options)
    stale = sorted(
        n for n in names
        if n.endswith(".tar") and n[:-4].isdigit() and len(n) == 9 and int(n[:-4]) >= keep
    )
    if stale:
        raise MakeShardsError(
            f"{storage.redact(out)} already holds shards this run would not overwrite ({', '.join(stale[:5])}"
            f"{', ...' if len(stale) > 5 else ''}); remove them or choose another --out"
        )


# -- command line ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline make-shards",
        description="Turn a folder of images (or the bundled sample photos) into WebDataset tar shards.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("input", nargs="?", help="folder of images (searched recursively)")
    src.add_argument("--sample", action="store_true",
                     help="random crops of the photos bundled with scikit-image (the demo data)")
    p.add_argument("--out", required=True, help="output folder or fsspec URL for 00000.tar, 00001.tar, ...")
    p.add_argument("--shards", type=int, default=None,
                   help="number of shards (--sample: default 4; folder: split the images evenly)")
    p.add_argument("--per-shard", type=int, default=None,
                   help="samples per shard (--sample: default 64; folder: default 1000)")
    p.add_argument("--seed", type=int, default=0, help="random seed of --sample crops and of --shuffle")
    p.add_argument("--min-size", type=int, default=128,
                   help="minimum short side in pixels: smaller folder images are skipped; "
                        "--sample crops are at least this large (default: %(default)s)")
    p.add_argument("--max-size", type=int, default=None,
                   help="folder: downscale images whose long side exceeds this (re-encoded as JPEG)")
    p.add_argument("--shuffle", action="store_true", help="folder: shuffle the image order with --seed")
    p.add_argument("--split", choices=("all", "train", "heldout"), default="all",
                   help="--sample: which photos (default all; 'heldout' = photos the tiny model never saw)")
    p.add_argument("--format", choices=("jpg", "png"), default="jpg", help="--sample image format")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    p.add_argument("--storage-options", default=None,
                   help="JSON object of fsspec storage options for a remote --out (e.g. an S3 endpoint)")
    return p


def _positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise MakeShardsError(f"{name} must be positive, got {value}")


def make_shards(args: argparse.Namespace) -> tuple[list[str], int, int]:
    """Run make-shards for parsed arguments; returns (shard urls, samples written, skipped)."""
    for name in ("shards", "per_shard", "min_size", "max_size", "quality"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    try:
        so = json.loads(args.storage_options) if args.storage_options else None
    except json.JSONDecodeError as exc:
        raise MakeShardsError(f"--storage-options is not valid JSON: {exc}") from None
    if args.sample:
        shards = args.shards or 4
        per_shard = args.per_shard or 64
        _check_stale(args.out, shards, so)
        samples: Iterable[Sample | None] = sample_crops(
            shards * per_shard, args.seed, args.min_size, args.split, args.format, args.quality,
        )
        return write_shards(samples, args.out, per_shard, storage_options=so)
    paths = find_images(args.input)
    if not paths:
        raise MakeShardsError(f"no image files ({', '.join(sorted(FOLDER_SUFFIXES))}) under {args.input}")
    if args.shuffle:
        paths = [paths[i] for i in np.random.default_rng(args.seed).permutation(len(paths))]
    max_samples = None
    if args.shards is not None and args.per_shard is not None:
        max_samples = args.shards * args.per_shard
        per_shard = args.per_shard
    elif args.shards is not None:
        # Skipped images are only known while reading, so even split is computed over all candidates.
        per_shard = math.ceil(len(paths) / args.shards)
    else:
        per_shard = args.per_shard or 1000
    _check_stale(args.out, args.shards or math.ceil(len(paths) / per_shard), so)
    samples = folder_samples(paths, args.input, args.min_size, args.max_size, args.quality)
    return write_shards(samples, args.out, per_shard, max_samples=max_samples, storage_options=so)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m pipeline make-shards ...`; returns the exit code (0 ok, 2 bad input)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        urls, written, skipped = make_shards(args)
    except MakeShardsError as exc:
        print(f"make-shards: error: {exc}", file=sys.stderr)
        return 2
    if written == 0:
        print(f"make-shards: error: no usable images ({skipped} skipped)", file=sys.stderr)
        return 2
    extra = f", {skipped} skipped" if skipped else ""
    print(f"wrote {len(urls)} shards with {written} samples{extra} to {storage.redact(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
