"""A miniature ImageNet in the raw ILSVRC folder layout, made from real photographs.

    <root>/train/<synset>/<synset>_<n>.JPEG
    <root>/val/<synset>/ILSVRC2012_val_<8 digits>.JPEG

Each synset is one photograph (scikit-learn's and matplotlib's bundled samples), cut into crops of
varied size and aspect ratio and rescaled to full ImageNet-like resolutions, so decoding,
resizing and re-encoding see realistic JPEGs without any download.
"""

from __future__ import annotations

import pathlib

import matplotlib
import numpy as np
import sklearn.datasets
from PIL import Image

SYNSETS = ("n01440764", "n01443537", "n01484850")


def photographs() -> list[Image.Image]:
    """Three real RGB photographs: china.jpg, flower.jpg (427x640) and grace_hopper.jpg."""
    images_dir = pathlib.Path(sklearn.datasets.__file__).parent / "images"
    sample_dir = pathlib.Path(matplotlib.get_data_path()) / "sample_data"
    paths = [images_dir / "china.jpg", images_dir / "flower.jpg", sample_dir / "grace_hopper.jpg"]
    return [Image.open(p).convert("RGB") for p in paths]


def _variant(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop (aspect 0.6-1.7, at least half the photo) with its shorter side scaled to
    256-520 px, the range of most ImageNet training images."""
    width, height = photo.size
    aspect = float(rng.uniform(0.6, 1.7))
    crop_h = int(rng.uniform(0.5, 1.0) * min(height, width / aspect))
    crop_w = int(crop_h * aspect)
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    scale = int(rng.integers(256, 521)) / min(crop_w, crop_h)
    size = (max(1, round(crop_w * scale)), max(1, round(crop_h * scale)))
    return photo.crop((left, top, left + crop_w, top + crop_h)).resize(size, Image.BICUBIC)


def write_imagenet_fixture(
    root: pathlib.Path, train_per_class: int = 4, val_per_class: int = 2, seed: int = 0
) -> pathlib.Path:
    """Writes the folder tree under `root` and returns `root`."""
    rng = np.random.default_rng(seed)
    val_index = 0
    for synset, photo in zip(SYNSETS, photographs(), strict=True):
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            folder = root / split / synset
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                if split == "train":
                    name = f"{synset}_{1000 + i}.JPEG"
                else:
                    val_index += 1
                    name = f"ILSVRC2012_val_{val_index:08d}.JPEG"
                _variant(photo, rng).save(folder / name, "JPEG", quality=90)
    return root


def write_subset_list(root: pathlib.Path, path: pathlib.Path, per_class: int) -> list[str]:
    """A labeled-subset list in the published format (base names, one a line).

    It names the first `per_class` training files of each synset plus files that are not in the
    fixture, as the real 1% list names files of all of ImageNet. Returns the names present.
    """
    present = []
    for synset in SYNSETS:
        files = sorted((root / "train" / synset).iterdir())[:per_class]
        present.extend(f.name for f in files)
    absent = ["n09999999_1.JPEG", "n01440764_999999.JPEG"]
    path.write_text("\n".join(present + absent) + "\n")
    return present
