"""Embedded digits dataset: counts, stratification, rendering, determinism, idempotence."""

import json
import math
import pathlib

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.runner.digits import MARKER_FILE, write_digits_dataset

N_IMAGES = 1797


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return data.images, data.target


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_digits_dataset(tmp_path_factory.mktemp("digits") / "root")


def _files(root: pathlib.Path) -> dict[str, list[pathlib.Path]]:
    return {split: sorted((root / split).glob("*/*.png")) for split in ("train", "test")}


def test_counts_and_stratified_split(dataset: pathlib.Path, digits) -> None:
    _, target = digits
    files = _files(dataset)
    n_test = math.ceil(N_IMAGES * 0.2)
    assert (len(files["train"]), len(files["test"])) == (N_IMAGES - n_test, n_test)
    indices = {split: [int(p.stem) for p in paths] for split, paths in files.items()}
    assert sorted(indices["train"] + indices["test"]) == list(range(N_IMAGES))
    for paths in files.values():
        assert {p.parent.name for p in paths} == {str(d) for d in range(10)}
        for path in paths:
            assert path.parent.name == str(target[int(path.stem)])
    for digit in range(10):
        in_test = sum(1 for p in files["test"] if p.parent.name == str(digit))
        assert abs(in_test - 0.2 * np.sum(target == digit)) <= 1
    marker = json.loads((dataset / MARKER_FILE).read_text())
    assert sum(marker["counts"]["test"].values()) == n_test


def test_images_are_grey_rgb_upscaled_digits(dataset: pathlib.Path, digits) -> None:
    images, _ = digits
    for path in _files(dataset)["test"][::40]:
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
            pixels = np.asarray(image, dtype=np.float64)
        assert np.array_equal(pixels[..., 0], pixels[..., 1])
        assert np.array_equal(pixels[..., 0], pixels[..., 2])
        # Averaging 4x4 blocks undoes the upscaling up to blur: compare with the 0..16 source.
        blocks = pixels[..., 0].reshape(8, 4, 8, 4).mean(axis=(1, 3))
        source = images[int(path.stem)] * 255.0 / 16.0
        assert np.corrcoef(blocks.ravel(), source.ravel())[0, 1] > 0.9
        assert abs(blocks.mean() - source.mean()) < 8.0
        assert pixels.max() > 200 and pixels.min() < 10


def test_deterministic_for_a_seed(dataset: pathlib.Path, tmp_path: pathlib.Path) -> None:
    again = write_digits_dataset(tmp_path / "again", image_size=32, test_fraction=0.2, seed=0)
    first, second = _files(dataset), _files(again)
    for split in ("train", "test"):
        assert [p.relative_to(dataset) for p in first[split]] == [
            p.relative_to(again) for p in second[split]
        ]
    for a, b in zip(first["test"][::25], second["test"][::25], strict=True):
        assert a.read_bytes() == b.read_bytes()
    other = write_digits_dataset(tmp_path / "other", seed=1, image_size=8)
    assert {p.name for p in _files(other)["test"]} != {p.name for p in first["test"]}


def test_idempotent_and_refuses_foreign_content(
    dataset: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    probe = _files(dataset)["train"][0]
    mtime = probe.stat().st_mtime_ns
    assert write_digits_dataset(dataset) == dataset
    assert probe.stat().st_mtime_ns == mtime

    with pytest.raises(ValueError, match="already holds something other"):
        write_digits_dataset(dataset, seed=3)
    foreign = tmp_path / "foreign"
    (foreign / "train" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="already holds something other"):
        write_digits_dataset(foreign)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_digits_dataset(empty, image_size=8) == empty
    assert len(list(empty.glob("*/*/*.png"))) == N_IMAGES

    next(empty.glob("test/*/*.png")).unlink()  # marker present, tree no longer complete
    with pytest.raises(ValueError, match="already holds something other"):
        write_digits_dataset(empty, image_size=8)
