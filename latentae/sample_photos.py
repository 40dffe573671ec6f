"""The sample photo set: natural photos bundled with scikit-image, captioned, with a held-out split.

One list for everything that uses the photos: the training recipe of the ``tiny`` preset
(`latentae.train`), which never sees the held-out ones, and ``python -m pipeline make-shards
--sample``, which builds the demo shards from all of them and marks the held-out ones, so the demo's
QA report covers photos the model never saw.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "SAMPLE_PHOTOS",
    "HELDOUT_PHOTOS",
    "SampleDataMissing",
    "photo_names",
    "sample_photo_dir",
    "sample_photo_path",
    "load_rgb",
    "sample_photos",
]

# Natural photos among scikit-image's bundled data files (file stem -> caption). Synthetic images
# (colour wheel, phantom, logo, silhouettes, chessboards) are left out: the demo is about photos.
SAMPLE_PHOTOS: dict[str, str] = {
    "astronaut": "a portrait of an astronaut in a spacesuit in front of a flag",
    "brick": "a black and white photo of a brick wall",
    "camera": "a black and white photo of a man with a camera on a tripod",
    "cell": "a microscope image of a cell",
    "chelsea": "a photo of a tabby cat",
    "clock_motion": "a motion-blurred photo of a wall clock",
    "coffee": "a photo of a cup of coffee on a saucer",
    "coins": "a black and white photo of old coins",
    "grass": "a black and white photo of grass",
    "gravel": "a black and white photo of gravel",
    "hubble_deep_field": "a telescope image of distant galaxies",
    "ihc": "a microscope image of stained tissue",
    "moon": "a black and white photo of the moon's surface",
    "motorcycle_left": "a photo of a motorcycle in a workshop",
    "motorcycle_right": "a photo of a motorcycle in a workshop, seen from the right",
    "page": "a scan of a printed book page",
    "retina": "a fundus photo of a human retina",
    "rocket": "a photo of a rocket on its launch pad",
    "text": "a photo of handwritten text on a board",
}

# Held out from training; colour photos of subjects that no training photo shows.
HELDOUT_PHOTOS: tuple[str, ...] = ("chelsea", "coffee", "rocket")

_SPLITS = ("all", "train", "heldout")


class SampleDataMissing(RuntimeError):
    """The bundled sample photos (scikit-image's ``skimage/data``) are not available."""


def photo_names(split: str = "all") -> list[str]:
    """Names of the photos of `split` ("all", "train" or "heldout"), sorted."""
    if split not in _SPLITS:
        raise ValueError(f"split must be 'all', 'train' or 'heldout', not {split!r}")
    names = sorted(SAMPLE_PHOTOS)
    if split == "train":
        return [n for n in names if n not in HELDOUT_PHOTOS]
    if split == "heldout":
        return [n for n in names if n in HELDOUT_PHOTOS]
    return names


def sample_photo_dir() -> Path:
    """Folder holding scikit-image's bundled photos, found without importing scikit-image."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise SampleDataMissing(
            "scikit-image is not installed, and the sample photos ship inside it: "
            "run `pip install scikit-image` (or `pip install -e '.[dev]'`)"
        )
    folder = Path(spec.origin).parent / "data"
    if not folder.is_dir():
        raise SampleDataMissing(f"scikit-image has no bundled data folder at {folder}")
    return folder


def sample_photo_path(name: str) -> Path:
    """Path of the bundled photo `name` (a key of SAMPLE_PHOTOS)."""
    if name not in SAMPLE_PHOTOS:
        raise KeyError(f"unknown sample photo {name!r}; known: {', '.join(sorted(SAMPLE_PHOTOS))}")
    folder = sample_photo_dir()
    for ext in (".png", ".jpg"):
        path = folder / f"{name}{ext}"
        if path.is_file():
            return path
    raise SampleDataMissing(f"sample photo {name!r} is missing from {folder}")


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 [H, W, 3]."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def sample_photos(split: str = "all") -> list[tuple[str, np.ndarray]]:
    """The bundled photos of `split` ("all", "train" or "heldout") as (name, RGB uint8 array), sorted by name."""
    return [(name, load_rgb(sample_photo_path(name))) for name in photo_names(split)]
