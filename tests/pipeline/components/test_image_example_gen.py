"""Image class-folder ExampleGen: examples, skip report, thresholds, label maps, subsets."""

import io
import json
import logging
import pathlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tfx.proto import example_gen_pb2
from tfx.types import standard_artifacts, standard_component_specs
from tfx.utils import proto_utils

from pipeline.components.image_example_gen import (
    REPORT_FILE,
    ImageDataError,
    ImageFolderExecutor,
    discover_splits,
    make_custom_config,
    make_image_example_gen,
)
from pipeline.components.image_example_gen.executor import check_class_folders


def _encode(mode: str, fmt: str, seed: int, size: tuple[int, int] = (12, 10)) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "P": 1}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels)
    if mode == "P":
        image = image.convert("P")
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


GOOD_FILES = {
    "train/cat/a.jpg": _encode("RGB", "JPEG", 0),
    "train/cat/b.PNG": _encode("L", "PNG", 1),
    "train/dog/c.png": _encode("RGBA", "PNG", 2),
    "train/dog/d.gif": _encode("P", "GIF", 3),
    "train/bird/e.bmp": _encode("RGB", "BMP", 4),
    "train/bird/f.JPEG": _encode("RGB", "JPEG", 5),
    "test/cat/g.jpeg": _encode("RGB", "JPEG", 6),
    "test/fish/h.png": _encode("RGB", "PNG", 7),
}
_big_jpeg = _encode("RGB", "JPEG", 8, size=(64, 64))
BAD_FILES = {
    "train/cat/broken.jpg": (_big_jpeg[: len(_big_jpeg) * 2 // 3], "not a decodable image"),
    "train/dog/empty.png": (b"", "empty file"),
    "train/bird/notes.txt": (b"hello", "unsupported extension .txt"),
    "train/dog/folder.jpg": (None, "unreadable:"),  # a folder named like an image
}
HIDDEN_FILES = {"train/cat/.hidden.jpg": b"junk", "train/.DS_Store": b"junk"}
# Sorted union of class folders over both splits: 'fish' exists in test only.
SORTED_IDS = {"bird": 0, "cat": 1, "dog": 2, "fish": 3}


@pytest.fixture
def image_tree(tmp_path: pathlib.Path) -> pathlib.Path:
    root = tmp_path / "images"
    files = {**GOOD_FILES, **{k: v[0] for k, v in BAD_FILES.items()}, **HIDDEN_FILES}
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            path.mkdir()
        else:
            path.write_bytes(data)
    return root


def _run(data_dir: pathlib.Path, out_dir: pathlib.Path, splits: list[str], **options) -> str:
    return _run_splits(data_dir, out_dir, [(s, f"{s}/*/*") for s in splits], **options)


def _read_split(out_dir: pathlib.Path, split: str) -> dict[str, dict]:
    files = sorted(str(p) for p in (out_dir / f"Split-{split}").glob("*.gz"))
    assert files, f"no TFRecord files for split {split}"
    records = {}
    for serialized in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        feature = tf.train.Example.FromString(serialized.numpy()).features.feature
        filename = feature["filename"].bytes_list.value[0].decode()
        records[filename] = {
            "image": feature["image"].bytes_list.value[0],
            "label": list(feature["label"].int64_list.value),
            "label_name": feature["label_name"].bytes_list.value[0].decode(),
        }
    return records


def _report(out_dir: pathlib.Path) -> dict:
    return json.loads((out_dir / REPORT_FILE).read_text())


def test_examples_and_report(image_tree: pathlib.Path, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out"
    split_names = _run(image_tree, out, ["train", "test"], max_bad_fraction=0.5)
    assert json.loads(split_names) == ["train", "test"]

    for split in ("train", "test"):
        expected = {k.split("/", 1)[1]: v for k, v in GOOD_FILES.items() if k.startswith(split)}
        records = _read_split(out, split)
        assert sorted(records) == sorted(expected)
        for filename, record in records.items():
            class_name = filename.split("/")[0]
            assert record["image"] == expected[filename]  # original bytes, untouched
            assert record["label"] == [SORTED_IDS[class_name]]
            assert record["label_name"] == class_name
            # Whatever passed the check must decode downstream in TensorFlow.
            decoded = tf.io.decode_image(record["image"], channels=3, expand_animations=False)
            assert decoded.shape == (10, 12, 3)

    report = _report(out)
    assert report["class_names"] == sorted(SORTED_IDS)
    train, test = report["splits"]["train"], report["splits"]["test"]
    assert (train["total_files"], train["written"], train["skipped"]) == (10, 6, 4)
    assert (test["total_files"], test["written"], test["skipped"]) == (2, 2, 0)
    assert train["folder"] == str(image_tree / "train")
    reasons = {r["path"]: r["reason"] for r in train["skipped_files"]}
    assert sorted(reasons) == sorted(k.split("/", 1)[1] for k in BAD_FILES)
    for relative, (_, reason) in BAD_FILES.items():
        assert reasons[relative.split("/", 1)[1]].startswith(reason)
    assert "truncated" in reasons["cat/broken.jpg"]
    assert not (out / "_image_report_tmp").exists()


def test_too_many_bad_files_raises_after_writing_report(
    image_tree: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    out = tmp_path / "out"
    with pytest.raises(ImageDataError) as error:
        _run(image_tree, out, ["train"], max_bad_fraction=0.2)
    message = str(error.value)
    assert "\n" not in message
    assert "split 'train'" in message and "4 of 10" in message
    assert str(out / REPORT_FILE) in message
    assert _report(out)["splits"]["train"]["skipped"] == 4


def test_split_without_images_raises(image_tree: pathlib.Path, tmp_path: pathlib.Path) -> None:
    # An image file that is empty: the class folder passes the early check, the split has
    # nothing usable after reading.
    (image_tree / "extra" / "cat").mkdir(parents=True)
    (image_tree / "extra" / "cat" / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    with pytest.raises(ImageDataError, match=r"split 'extra' has no usable images in .*extra"):
        _run(image_tree, out, ["test", "extra"])
    assert _report(out)["splits"]["extra"]["total_files"] == 1


def _add_empty_class(image_tree: pathlib.Path, split: str = "train") -> pathlib.Path:
    """A class folder 'cow' (sorting between cat and dog) with no image file in it."""
    folder = image_tree / split / "cow"
    folder.mkdir()
    (folder / ".hidden.jpg").write_bytes(GOOD_FILES["train/cat/a.jpg"])
    (folder / "notes.txt").write_bytes(b"not an image")
    (folder / "sub.png").mkdir()  # a sub-folder only named like an image... still no file
    return folder


def test_empty_class_folder_stops_before_anything_is_read(
    image_tree: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    empty = _add_empty_class(image_tree)
    out = tmp_path / "out"
    with pytest.raises(ImageDataError) as error:
        _run(image_tree, out, ["train", "test"], max_bad_fraction=0.5)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"Class folder {empty} has no image files")
    assert "drop_empty_class_folders" in message
    assert not out.exists()  # stopped before Beam wrote anything


def test_empty_class_folder_dropped_when_asked(
    image_tree: pathlib.Path, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    empty = _add_empty_class(image_tree)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        _run(
            image_tree,
            out,
            ["train", "test"],
            max_bad_fraction=0.5,
            drop_empty_class_folders=True,
        )
    assert any(str(empty) in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    report = _report(out)
    # No class, no id: 'dog' keeps id 2 instead of moving to 3 behind 'cow'.
    assert report["class_names"] == sorted(SORTED_IDS)
    for filename, record in _read_split(out, "train").items():
        assert record["label"] == [SORTED_IDS[filename.split("/")[0]]]
    # The dropped folder is not listed either: its notes.txt is not a skipped file.
    assert report["splits"]["train"]["total_files"] == 10


def test_check_class_folders(image_tree: pathlib.Path) -> None:
    assert check_class_folders(str(image_tree), ["train", "test"]) == {
        "train": ["bird", "cat", "dog"],
        "test": ["cat", "fish"],
    }
    with pytest.raises(ImageDataError, match=r"Split 'val': image folder .*val does not exist"):
        check_class_folders(str(image_tree), ["train", "val"])
    first = _add_empty_class(image_tree, "test")
    second = _add_empty_class(image_tree, "train")
    with pytest.raises(ImageDataError) as error:
        check_class_folders(str(image_tree), ["test", "train"])
    assert "\n" not in str(error.value)
    assert str(error.value).startswith(f"Class folder {first} has no image files")
    assert f"(and 1 more: {second})" in str(error.value)
    assert check_class_folders(str(image_tree), ["test", "train"], drop_empty=True) == {
        "test": ["cat", "fish"],
        "train": ["bird", "cat", "dog"],
    }


def test_labels_file_and_max_images_per_class(
    image_tree: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    labels = ["zebra", "dog", "fish", "cat", "bird"]
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("\n".join(labels) + "\n")
    out = tmp_path / "out"
    _run(image_tree, out, ["train", "test"], labels_file=str(labels_file), max_images_per_class=1)
    train = _read_split(out, "train")
    # First file per class in sorted name order: bird/e.bmp < bird/f.JPEG < bird/notes.txt,
    # cat/.hidden.jpg is ignored so cat/a.jpg comes first, dog/c.png < dog/d.gif < dog/empty.png.
    assert sorted(train) == ["bird/e.bmp", "cat/a.jpg", "dog/c.png"]
    for filename, record in train.items():
        assert record["label"] == [labels.index(filename.split("/")[0])]
    assert _read_split(out, "test")["fish/h.png"]["label"] == [2]
    assert _report(out)["class_names"] == labels


def test_labels_file_missing_a_class_folder(
    image_tree: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("cat\ndog\nbird\n")
    with pytest.raises(ImageDataError, match=r"Split 'test'.*\['fish'\].*not in labels file"):
        _run(image_tree, tmp_path / "out", ["train", "test"], labels_file=str(labels_file))


def test_discover_splits(image_tree: pathlib.Path, tmp_path: pathlib.Path) -> None:
    (image_tree / "notes").mkdir()  # no class folders inside: not a split
    assert discover_splits(str(image_tree)) == ["test", "train"]
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="No split folders"):
        discover_splits(str(tmp_path / "flat"))


def test_make_image_example_gen(image_tree: pathlib.Path) -> None:
    component = make_image_example_gen(
        str(image_tree), ["train"], max_images_per_class=7, code_digest="abc"
    )
    params = component.exec_properties
    assert params["input_base"] == str(image_tree)
    assert json.loads(params["input_config"]) == {
        "splits": [{"name": "train", "pattern": "train/*/*"}]
    }
    assert json.loads(params["output_config"]) == {}  # keeps the folder split, no hashing
    assert json.loads(params["custom_config"])["custom_config"]["value"] == {
        "labels_file": None,
        "max_bad_fraction": 0.01,
        "max_images_per_class": 7,
        "drop_empty_class_folders": False,
        "code_digest": "abc",
    }
    assert component.executor_spec.executor_class is ImageFolderExecutor
    with pytest.raises(ValueError, match="max_bad_fraction"):
        make_image_example_gen(str(image_tree), ["train"], max_bad_fraction=1.5)


def _record_classes(out_dir: pathlib.Path, split: str) -> list[str]:
    """Class names of a split's records in the order they were written."""
    files = sorted(str(p) for p in (out_dir / f"Split-{split}").glob("*.gz"))
    return [
        tf.train.Example.FromString(s.numpy())
        .features.feature["label_name"]
        .bytes_list.value[0]
        .decode()
        for s in tf.data.TFRecordDataset(files, compression_type="GZIP")
    ]


def test_records_are_written_in_one_seeded_mixed_order(tmp_path: pathlib.Path) -> None:
    """Listing goes class folder by class folder; the written split must not, or a Trainer's
    shuffle window sees two or three classes at a time. The order is the same on every run."""
    root = tmp_path / "images"
    for c in range(4):
        for i in range(8):
            path = root / "train" / f"class{c}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_encode("RGB", "PNG", 10 * c + i, size=(4, 4)))
    _run(root, tmp_path / "a", ["train"])
    _run(root, tmp_path / "b", ["train"])
    first, second = (
        _record_classes(tmp_path / "a", "train"),
        _record_classes(tmp_path / "b", "train"),
    )
    assert sorted(first) == sorted(f"class{c}" for c in range(4) for _ in range(8))
    assert first == second
    # Runs of one class: 4 in listing order, about 24 expected for a random order of 32.
    runs = 1 + sum(a != b for a, b in zip(first[:-1], first[1:], strict=True))
    assert runs >= 14, first


def test_a_large_listing_is_ordered_in_bounded_shards_never_in_one_element(
    tmp_path: pathlib.Path,
) -> None:
    """1,000 files with shards of 64: 16 shards, none near the whole listing, each written as
    one block in its seeded order; every file once; the same order on every run, and not the
    listing's class-by-class order."""
    import itertools

    import apache_beam as beam

    from pipeline.components.image_example_gen import executor

    files = [(f"c{c}", f"/d/c{c}/{i}.jpg", f"c{c}/{i}.jpg") for c in range(10) for i in range(100)]

    def run() -> list[tuple[str, str, str]]:
        out = tmp_path / "order.json"
        with beam.Pipeline() as p:
            _ = (
                p
                | beam.Create(files)
                | executor.SeededShards(shard_files=64)
                | beam.combiners.ToList()  # only to read the order back in the test
                | beam.Map(lambda entries: out.write_text(json.dumps(entries)))
            )
        return [tuple(e) for e in json.loads(out.read_text())]

    first = run()
    assert sorted(first) == sorted(files) and first != files
    shard_of = [executor._to_shard(e, len(files), 64) for e in first]
    blocks = [list(group) for _, group in itertools.groupby(shard_of, key=lambda s: s[0])]
    assert len(blocks) == 16 == len({s[0] for s in shard_of})  # one block per shard
    assert max(len(b) for b in blocks) < 3 * 64
    for block in blocks:
        keys = [key for _, (key, _) in block]
        assert keys == sorted(keys)
    within = [e for e in first if e[0] == "c0"]
    assert within != sorted(within)  # mixed inside a class too
    assert run() == first


# ----- the unlabeled pool -----

POOL_FILES = {
    "top.png": _encode("RGB", "PNG", 20),
    "phone/2024/deep.jpg": _encode("RGB", "JPEG", 21),
    "cat/named_like_a_class.png": _encode("RGB", "PNG", 22),  # not a label
}


def _run_splits(
    data_dir: pathlib.Path, out_dir: pathlib.Path, splits: list[tuple[str, str]], **options
) -> str:
    """Runs the executor on (split name, file pattern) pairs; returns the split names."""
    examples = standard_artifacts.Examples()
    examples.uri = str(out_dir)
    input_config = example_gen_pb2.Input(
        splits=[example_gen_pb2.Input.Split(name=n, pattern=p) for n, p in splits]
    )
    ImageFolderExecutor().Do(
        {},
        {standard_component_specs.EXAMPLES_KEY: [examples]},
        {
            standard_component_specs.INPUT_BASE_KEY: str(data_dir),
            standard_component_specs.INPUT_CONFIG_KEY: proto_utils.proto_to_json(input_config),
            standard_component_specs.OUTPUT_CONFIG_KEY: proto_utils.proto_to_json(
                example_gen_pb2.Output()
            ),
            standard_component_specs.CUSTOM_CONFIG_KEY: proto_utils.proto_to_json(
                make_custom_config(**options)
            ),
        },
    )
    return examples.split_names


def _write(root: pathlib.Path, files: dict[str, bytes]) -> None:
    for relative, data in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)


@pytest.mark.parametrize("where", ["in_tree", "elsewhere"])
def test_unlabeled_pool_at_any_depth_is_one_split_of_label_minus_one(
    image_tree: pathlib.Path, tmp_path: pathlib.Path, where: str
) -> None:
    pool = image_tree / "unlabeled" if where == "in_tree" else tmp_path / "photos"
    _write(pool, {**POOL_FILES, ".hidden/x.png": b"junk", "broken.jpg": b"not an image"})
    pattern = "unlabeled/**" if where == "in_tree" else f"{pool}/**"
    out = tmp_path / "out"
    _run_splits(
        image_tree,
        out,
        [("train", "train/*/*"), ("test", "test/*/*"), ("unlabeled", pattern)],
        max_bad_fraction=0.5,
    )
    records = _read_split(out, "unlabeled")
    assert sorted(records) == sorted(POOL_FILES)  # paths relative to the pool
    for filename, record in records.items():
        assert record["label"] == [-1] and record["label_name"] == ""
        assert record["image"] == POOL_FILES[filename]
    # Class ids come from the class-folder splits alone ('cat' in the pool changes nothing).
    assert {r["label"][0] for r in _read_split(out, "train").values()} <= set(SORTED_IDS.values())
    report = _report(out)
    assert report["class_names"] == sorted(SORTED_IDS)
    stats = report["splits"]["unlabeled"]
    assert stats["folder"] == str(pool)
    assert (stats["total_files"], stats["written"], stats["skipped"]) == (4, 3, 1)
    assert (stats["labeled"], stats["unlabeled"]) == (0, 3)
    assert stats["skipped_files"][0]["path"] == "broken.jpg"
    assert (report["splits"]["train"]["labeled"], report["splits"]["train"]["unlabeled"]) == (6, 0)


def test_unlabeled_pool_with_too_many_bad_files_stops(
    image_tree: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    _write(image_tree / "unlabeled", {**POOL_FILES, "a/empty.png": b""})
    out = tmp_path / "out"
    with pytest.raises(ImageDataError, match=r"split 'unlabeled': 1 of 4 files skipped"):
        _run_splits(image_tree, out, [("test", "test/*/*"), ("unlabeled", "unlabeled/**")])
    assert _report(out)["splits"]["unlabeled"]["skipped_files"][0]["reason"] == "empty file"


def test_unlabeled_folder_is_not_a_class_folder_split(image_tree: pathlib.Path) -> None:
    _write(image_tree / "unlabeled", POOL_FILES)
    assert discover_splits(str(image_tree)) == ["test", "train"]
    component = make_image_example_gen(str(image_tree), ["train"], unlabeled_dir="unlabeled")
    assert json.loads(component.exec_properties["input_config"])["splits"] == [
        {"name": "train", "pattern": "train/*/*"},
        {"name": "unlabeled", "pattern": "unlabeled/**"},
    ]
    with pytest.raises(ValueError, match="unlabeled pool"):
        make_image_example_gen(str(image_tree), ["train", "unlabeled"])
