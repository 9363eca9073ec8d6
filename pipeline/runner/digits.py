"""Embedded default dataset: scikit-learn's handwritten digits as a class-folder PNG tree.

The 1,797 real 8x8 digit scans ship inside scikit-learn, so the pipeline can run end to end with
no download, through the same image ExampleGen used for CIFAR-10 and ImageNet folders.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

MARKER_FILE = "DATASET.json"
_SOURCE = "sklearn.datasets.load_digits"
_MAX_PIXEL = 16.0  # load_digits pixel values run from 0 to 16


def _render(pixels: np.ndarray, image_size: int) -> Image.Image:
    """Grey digit upscaled smoothly to image_size x image_size, stored as RGB like photos are."""
    grey = np.round(pixels * (255.0 / _MAX_PIXEL)).astype(np.uint8)
    resized = Image.fromarray(grey).resize((image_size, image_size), Image.Resampling.BILINEAR)
    return resized.convert("RGB")


def _split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    train, test = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
    )
    return {"train": np.sort(train), "test": np.sort(test)}


def _counts(root: Path) -> dict[str, dict[str, int]]:
    return {
        split.name: {c.name: len(list(c.glob("*.png"))) for c in sorted(split.iterdir())}
        for split in sorted(root.iterdir())
        if split.is_dir()
    }


def write_digits_dataset(
    root: str | Path, *, image_size: int = 32, test_fraction: float = 0.2, seed: int = 0
) -> Path:
    """Writes `root/{train,test}/<digit>/NNNN.png` (NNNN: index in load_digits) and returns root.

    The split is stratified by digit and fixed by `seed`. A `DATASET.json` marker records the
    parameters and per-class counts; calling again with the same parameters on a complete tree
    is a no-op, while a root holding anything else raises instead of mixing datasets. The tree is
    built in a sibling temporary folder and renamed into place, so an interrupted run leaves no
    half-written root behind.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    root = Path(root)
    params = {
        "source": _SOURCE,
        "image_size": image_size,
        "test_fraction": test_fraction,
        "seed": seed,
    }
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        marker = root / MARKER_FILE
        if marker.is_file():
            recorded = json.loads(marker.read_text())
            if recorded.get("params") == params and recorded.get("counts") == _counts(root):
                return root
        raise ValueError(
            f"{root} already holds something other than the digits dataset with {params}; "
            "use an empty or new folder"
        )

    digits = load_digits()
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the renamed root should not be
    try:
        for split, indices in _split_indices(digits.target, test_fraction, seed).items():
            for index in indices:
                class_dir = staging / split / str(digits.target[index])
                class_dir.mkdir(parents=True, exist_ok=True)
                _render(digits.images[index], image_size).save(class_dir / f"{index:04d}.png")
        counts = _counts(staging)
        (staging / MARKER_FILE).write_text(
            json.dumps({"params": params, "counts": counts}, indent=1, sort_keys=True)
        )
        os.replace(staging, root)  # an empty existing root is replaced atomically
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
