"""ExampleGen executor for class-folder image trees: `<input_base>/<split>/<class>/<image file>`.

An unlabeled pool (`<input_base>/unlabeled/`, or any folder given by its full path) is one more
split, listed at any depth: its sub-folders are not classes, and every record carries label -1
(no class) and an empty label_name, as TFDS stores STL-10's `unlabelled` split. Downstream
components then see one schema for all splits; stages choose what they read by split and label.

Each image becomes a tf.Example that carries the untouched encoded file bytes, so decoding and
augmentation stay inside the Transform/Trainer graphs. Files that cannot serve as training images
are skipped and listed in `image_report.json` next to the splits; a split with too many of them
fails the run, because training on a silently shrunken dataset is worse than stopping. For the
same reason a class folder without image files stops the run before anything is read (or, with
the `drop_empty_class_folders` option, is left out with a warning).
"""

import hashlib
import io
import json
import posixpath
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import tensorflow as tf
from absl import logging
from google.protobuf import json_format, struct_pb2
from PIL import Image
from tfx.components.example_gen.base_example_gen_executor import BaseExampleGenExecutor
from tfx.proto import example_gen_pb2
from tfx.types import artifact, artifact_utils, standard_component_specs
from tfx.utils import proto_utils

from models.config import UNLABELED_SPLIT
from pipeline.names import IMAGE_REPORT_FILE

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".gif", ".bmp")
REPORT_FILE = IMAGE_REPORT_FILE
SPLIT_PATTERN_SUFFIX = "/*/*"
# The unlabeled pool: one split read recursively (`<folder>/**`), every record labeled -1.
POOL_PATTERN_SUFFIX = "/**"
UNLABELED_LABEL = -1

# Formats tf.io.decode_image reads (MPO is a JPEG with extra frames from cameras).
_DECODABLE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "BMP"})
_SKIPPED_TAG = "skipped"
_TMP_DIR_NAME = "_image_report_tmp"
# Private exec_properties entries through which `Do` hands its results to the Beam transform.
_TMP_DIR_KEY = "_image_report_tmp_dir"
_CLASS_IDS_KEY = "_image_class_ids"
_CLASS_FOLDERS_KEY = "_image_class_folders"
# Option (and flag) that drops class folders without image files instead of stopping.
DROP_EMPTY_OPTION = "drop_empty_class_folders"
# The digest of this package's code: read by no executor, it makes an edit of the ingestion
# code part of the component's cache key (the executor is named by import path only).
CODE_DIGEST_OPTION = "code_digest"
_OPTION_NAMES = (
    "labels_file",
    "max_bad_fraction",
    "max_images_per_class",
    DROP_EMPTY_OPTION,
    CODE_DIGEST_OPTION,
)
# Class folders are listed concurrently: one listing per class is slow on GCS (ImageNet: 2,000).
_LISTING_THREADS = 32


class ImageDataError(ValueError):
    """The image tree cannot produce a trustworthy dataset (too many bad files, empty split...)."""


@dataclass(frozen=True)
class _Options:
    labels_file: str | None = None
    max_bad_fraction: float = 0.01
    max_images_per_class: int | None = None
    drop_empty_class_folders: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.max_images_per_class is not None and self.max_images_per_class < 1:
            raise ValueError(
                f"max_images_per_class must be >= 1 or None, got {self.max_images_per_class}"
            )


def make_custom_config(
    *,
    labels_file: str | None = None,
    max_bad_fraction: float = 0.01,
    max_images_per_class: int | None = None,
    drop_empty_class_folders: bool = False,
    code_digest: str = "",
) -> example_gen_pb2.CustomConfig:
    """Packs the executor options as a Struct in the ExampleGen's CustomConfig proto.

    FileBasedExampleGen only accepts a CustomConfig (a protobuf Any); a Struct keeps the options
    a plain JSON dict in the compiled pipeline.
    """
    options = _Options(
        labels_file, max_bad_fraction, max_images_per_class, drop_empty_class_folders
    )
    struct = struct_pb2.Struct()
    struct.update(
        {
            "labels_file": options.labels_file,
            "max_bad_fraction": options.max_bad_fraction,
            "max_images_per_class": options.max_images_per_class,
            DROP_EMPTY_OPTION: options.drop_empty_class_folders,
            CODE_DIGEST_OPTION: code_digest,
        }
    )
    config = example_gen_pb2.CustomConfig()
    config.custom_config.Pack(struct)
    return config


def _parse_options(custom_config_json: str | None) -> _Options:
    if not custom_config_json:
        return _Options()
    config = example_gen_pb2.CustomConfig()
    proto_utils.json_to_proto(custom_config_json, config)
    if not config.HasField("custom_config"):
        return _Options()
    struct = struct_pb2.Struct()
    if not config.custom_config.Unpack(struct):
        raise ValueError(
            f"custom_config must hold a google.protobuf.Struct, got {config.custom_config.type_url}"
        )
    values = json_format.MessageToDict(struct)
    unknown = sorted(set(values) - set(_OPTION_NAMES))
    if unknown:
        raise ValueError(f"Unknown image ExampleGen options: {unknown}")
    max_per_class = values.get("max_images_per_class")
    return _Options(
        labels_file=values.get("labels_file") or None,
        max_bad_fraction=float(values.get("max_bad_fraction", 0.01)),
        # Struct numbers are doubles.
        max_images_per_class=None if max_per_class is None else int(max_per_class),
        drop_empty_class_folders=bool(values.get(DROP_EMPTY_OPTION, False)),
    )


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _subdirs(path: str) -> list[str]:
    """Sorted non-hidden sub-folder names of `path` (works for local and gs:// paths)."""
    names = (name.rstrip("/") for name in tf.io.gfile.listdir(path))
    return sorted(
        name
        for name in names
        if not _is_hidden(name) and tf.io.gfile.isdir(posixpath.join(path, name))
    )


def discover_splits(data_dir: str) -> list[str]:
    """Sorted sub-folders of `data_dir` that hold class folders, e.g. ['test', 'train'].

    `unlabeled/` is never one of them: its sub-folders are not classes (see `pool_pattern`).
    """
    if not tf.io.gfile.isdir(data_dir):
        raise ValueError(f"Image data folder {data_dir} does not exist")
    splits = [
        name
        for name in _subdirs(data_dir)
        if name != UNLABELED_SPLIT and _subdirs(posixpath.join(data_dir, name))
    ]
    if not splits:
        raise ValueError(
            f"No split folders with class sub-folders (<split>/<class>/<image>) in {data_dir}"
        )
    return splits


def pool_pattern(folder: str) -> str:
    """The input split pattern of an unlabeled pool: relative to input_base, or a full path
    (`/data/photos`, `gs://bucket/photos`) for a pool kept elsewhere."""
    return folder.rstrip("/") + POOL_PATTERN_SUFFIX


def is_pool_pattern(split_pattern: str) -> bool:
    return split_pattern.endswith(POOL_PATTERN_SUFFIX)


def _split_dir(input_base: str, split_pattern: str) -> str:
    suffix = POOL_PATTERN_SUFFIX if is_pool_pattern(split_pattern) else SPLIT_PATTERN_SUFFIX
    folder = split_pattern[: -len(suffix)]
    if not split_pattern.endswith(suffix) or not folder or "*" in folder:
        raise ValueError(
            f"Image split pattern must be '<split folder>{SPLIT_PATTERN_SUFFIX}' or "
            f"'<unlabeled folder>{POOL_PATTERN_SUFFIX}', got {split_pattern!r}"
        )
    if "://" in folder or folder.startswith("/"):
        return folder
    return posixpath.join(input_base, folder)


def _split_key(split_pattern: str) -> str:
    """Name of a split's folder of interim results (the transform only sees the pattern)."""
    return hashlib.sha1(split_pattern.encode()).hexdigest()[:16]


def _read_labels_file(labels_file: str) -> list[str]:
    with tf.io.gfile.GFile(labels_file, "r") as f:
        names = [line.strip() for line in f.read().splitlines()]
    if not names or "" in names or len(set(names)) != len(names):
        raise ValueError(
            f"Labels file {labels_file} must list one distinct class name per line, no blanks"
        )
    return names


def _has_image_file(class_dir: str) -> bool:
    """Whether a class folder holds at least one non-hidden file named like an image.

    Stops at the first one, so a folder of a million images costs one listing and one stat.
    """
    return any(
        not _is_hidden(name)
        and not name.endswith("/")  # GCS listings mark sub-folders this way
        and name.lower().endswith(IMAGE_EXTENSIONS)
        and not tf.io.gfile.isdir(posixpath.join(class_dir, name))
        for name in tf.io.gfile.listdir(class_dir)
    )


def _class_folders(split_dirs: dict[str, str], drop_empty: bool) -> dict[str, list[str]]:
    """Split name -> its class folder names, after checking that each one holds images.

    A folder without image files would otherwise become a class with an id and no examples: a
    head unit that never trains, and usually a copy or extraction that went wrong. So it stops
    the run, naming the folder, unless `drop_empty` asks to leave such folders out.
    """
    entries = [
        (split, name, posixpath.join(path, name))
        for split, path in split_dirs.items()
        for name in _subdirs(path)
    ]
    with ThreadPoolExecutor(max_workers=max(1, min(_LISTING_THREADS, len(entries)))) as pool:
        has_images = list(pool.map(_has_image_file, (path for _, _, path in entries)))
    empty = [path for (_, _, path), ok in zip(entries, has_images, strict=True) if not ok]
    if empty and not drop_empty:
        more = ""
        if len(empty) > 1:
            listed = ", ".join(empty[1:4]) + (", ..." if len(empty) > 4 else "")
            more = f" (and {len(empty) - 1} more: {listed})"
        raise ImageDataError(
            f"Class folder {empty[0]} has no image files ({'/'.join(IMAGE_EXTENSIONS)}){more}; "
            f"add images, remove the folder, or set {DROP_EMPTY_OPTION} to leave empty class "
            "folders out"
        )
    if empty:
        logging.warning(
            "Leaving out %d class folder(s) without image files (%s): %s",
            len(empty),
            DROP_EMPTY_OPTION,
            ", ".join(empty),
        )
    folders: dict[str, list[str]] = {split: [] for split in split_dirs}
    for (split, name, _), ok in zip(entries, has_images, strict=True):
        if ok:
            folders[split].append(name)
    return folders


def check_class_folders(
    data_dir: str, splits: Sequence[str], *, drop_empty: bool = False
) -> dict[str, list[str]]:
    """Split -> its class folder names under `<data_dir>/<split>/`, checked before any run.

    Raises a one-line ImageDataError when a split folder is missing or a class folder has no
    image files (or leaves such folders out with a warning when `drop_empty`). The ExampleGen
    executor runs the same check; a runner calls this first so a broken tree fails in seconds
    rather than after the pipeline has started.
    """
    split_dirs = {split: posixpath.join(data_dir, split) for split in splits}
    _check_split_dirs(split_dirs)
    return _class_folders(split_dirs, drop_empty)


def _check_split_dirs(split_dirs: dict[str, str]) -> None:
    """A missing split folder would otherwise surface as an obscure listing error."""
    for name, path in split_dirs.items():
        if not tf.io.gfile.isdir(path):
            raise ImageDataError(f"Split {name!r}: image folder {path} does not exist")


def _class_ids(
    split_dirs: dict[str, str], folders: dict[str, list[str]], labels_file: str | None
) -> dict[str, int]:
    """Class folder name -> label id, identical for all splits.

    Without a labels file ids follow the sorted union of class folders over all splits, so a
    class seen only in the test split still gets a stable id.
    """
    if labels_file is None:
        all_classes = sorted({c for classes in folders.values() for c in classes})
        return {name: i for i, name in enumerate(all_classes)}
    class_ids = {name: i for i, name in enumerate(_read_labels_file(labels_file))}
    for split, classes in folders.items():
        missing = [c for c in classes if c not in class_ids]
        if missing:
            raise ImageDataError(
                f"Split {split!r}: class folder(s) {missing[:5]} of {split_dirs[split]} "
                f"are not in labels file {labels_file}"
            )
    return class_ids


def _list_class_files(
    class_entry: tuple[str, str], max_images_per_class: int | None
) -> Iterator[tuple[str, str, str]]:
    """(class name, file path, relative path) for the non-hidden files of one class folder, in
    name order."""
    class_name, class_dir = class_entry
    names = sorted(n for n in tf.io.gfile.listdir(class_dir) if not _is_hidden(n))
    for name in names[:max_images_per_class]:
        name = name.rstrip("/")
        yield class_name, posixpath.join(class_dir, name), f"{class_name}/{name}"


def _list_pool_files(pool_dir: str) -> Iterator[tuple[str, str, str]]:
    """('', file path, path relative to the pool) for every non-hidden file below `pool_dir`,
    at any depth (hidden folders are not entered). The class name '' marks no class."""
    root = pool_dir.rstrip("/")
    for folder, subfolders, files in tf.io.gfile.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not _is_hidden(d.rstrip("/")))
        relative_folder = folder.rstrip("/")[len(root) :].lstrip("/")
        for name in sorted(files):
            if _is_hidden(name):
                continue
            relative = posixpath.join(relative_folder, name) if relative_folder else name
            yield "", posixpath.join(folder, name), relative


# Fixed, so the same tree is always written in the same order (reproducible training streams).
ORDER_SEED = 20200213


# At most about this many file entries (~1 MB of paths) travel in one element: a split's listing
# is never gathered into one element, whatever its size (ImageNet's train split: 1.28 M paths).
SHARD_FILES = 10_000


def _order_key(entry: tuple[str, str, str]) -> bytes:
    """A file's place in the seeded order: a hash of the seed and its relative path."""
    return hashlib.sha256(f"{ORDER_SEED}:{entry[2]}".encode()).digest()[:8]


def _to_shard(
    entry: tuple[str, str, str], total: int, shard_files: int
) -> tuple[int, tuple[bytes, tuple[str, str, str]]]:
    shards = max(1, -(-total // shard_files))
    key = _order_key(entry)
    return int.from_bytes(key, "big") % shards, (key, entry)


def _in_seeded_order(
    shard: tuple[int, Iterable[tuple[bytes, tuple[str, str, str]]]],
) -> Iterator[tuple[str, str, str]]:
    for _, entry in sorted(shard[1]):
        yield entry


@beam.ptransform_fn
def SeededShards(  # noqa: N802 - a PTransform, named as Beam's are
    files: beam.pvalue.PCollection, shard_files: int = SHARD_FILES
) -> beam.pvalue.PCollection:
    """Every (class, path, relative path) of a split, in a seeded random order within shards of
    about `shard_files` entries.

    Listing yields one class folder after another. Written in that order, the records reach the
    Trainer sorted by class, and a shuffle window smaller than the split then gives batches of
    two or three classes. Each file goes to shard hash(seed, path) mod ceil(files / shard_files)
    and each shard is sorted by that hash, so no element ever holds the whole listing; a split
    of at most `shard_files` files is one shard in one seeded order. Order is kept by the local
    runner's writes, so mixing it here mixes the files; on Dataflow the shards mix it further.
    """
    total = files | "CountFiles" >> beam.combiners.Count.Globally()
    return (
        files
        | "ToShard" >> beam.Map(_to_shard, beam.pvalue.AsSingleton(total), shard_files)
        | "GroupShards" >> beam.GroupByKey()
        | "SeededOrder" >> beam.FlatMap(_in_seeded_order)
    )


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


def _decode_problem(data: bytes) -> str | None:
    """Why `data` is not a fully decodable image, or None when it is."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format
            image.verify()  # Structure and checksums; cannot catch truncated pixel data.
        if image_format not in _DECODABLE_FORMATS:
            return f"{image_format} images are not supported"
        with Image.open(io.BytesIO(data)) as image:
            if image_format in ("JPEG", "MPO"):
                # Reduced-scale DCT still reads the whole entropy-coded stream (so truncation is
                # caught) at a fraction of the cost of a full decode.
                image.draft("RGB", (1, 1))
            image.load()
    except Exception as error:  # PIL signals bad data with many exception types.
        return _one_line(error)
    return None


def _bytes_feature(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _to_example(
    entry: tuple[str, str, str], class_ids: dict[str, int]
) -> Iterator[tf.train.Example | beam.pvalue.TaggedOutput]:
    """Reads and checks one file: yields its tf.Example, or a skip record on the side output.

    A file of the unlabeled pool (class name '') gets label -1 and an empty label_name.
    """
    class_name, path, relative_path = entry
    label = class_ids[class_name] if class_name else UNLABELED_LABEL

    def skip(reason: str) -> beam.pvalue.TaggedOutput:
        return beam.pvalue.TaggedOutput(_SKIPPED_TAG, {"path": relative_path, "reason": reason})

    if not path.lower().endswith(IMAGE_EXTENSIONS):
        yield skip(f"unsupported extension {posixpath.splitext(path)[1] or '(none)'}")
        return
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            data = f.read()
    except (tf.errors.OpError, OSError) as error:
        yield skip(f"unreadable: {_one_line(error)}")
        return
    if not data:
        yield skip("empty file")
        return
    problem = _decode_problem(data)
    if problem is not None:
        yield skip(f"not a decodable image: {problem}")
        return
    yield tf.train.Example(
        features=tf.train.Features(
            feature={
                "image": _bytes_feature(data),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                "label_name": _bytes_feature(class_name.encode()),
                "filename": _bytes_feature(relative_path.encode()),
            }
        )
    )


@beam.ptransform_fn
@beam.typehints.with_input_types(beam.Pipeline)
@beam.typehints.with_output_types(tf.train.Example)
def _ImageFolderToExample(
    pipeline: beam.Pipeline, exec_properties: dict[str, Any], split_pattern: str
) -> beam.pvalue.PCollection:
    """One split's image files as tf.Examples; skips and counts go to interim files.

    Class folders are listed in parallel, the files put in a seeded random order in shards of
    bounded size (see `SeededShards`) and reshuffled before reading, so a tree with a million
    files spreads over workers instead of being listed into, and read from, one element.
    """
    options = _parse_options(exec_properties.get(standard_component_specs.CUSTOM_CONFIG_KEY))
    class_ids = json.loads(exec_properties[_CLASS_IDS_KEY])
    split_dir = _split_dir(exec_properties[standard_component_specs.INPUT_BASE_KEY], split_pattern)
    out_dir = posixpath.join(exec_properties[_TMP_DIR_KEY], _split_key(split_pattern))
    if is_pool_pattern(split_pattern):
        files = (
            pipeline
            | "ListPool" >> beam.Create([split_dir])
            | "ListFiles" >> beam.FlatMap(_list_pool_files)
        )
    else:
        # The folders `Do` checked: left-out empty ones are not listed again.
        class_names = json.loads(exec_properties[_CLASS_FOLDERS_KEY])[split_pattern]
        class_entries = [(name, posixpath.join(split_dir, name)) for name in class_names]
        files = (
            pipeline
            | "ListClassFolders" >> beam.Create(class_entries)
            | "ListFiles" >> beam.FlatMap(_list_class_files, options.max_images_per_class)
        )

    results = (
        files
        | "SeededShards" >> SeededShards()
        | "Spread" >> beam.Reshuffle()
        | "ReadAndCheck"
        >> beam.FlatMap(_to_example, class_ids)
        .with_output_types(tf.train.Example)
        .with_outputs(_SKIPPED_TAG, main="examples")
    )
    _ = (
        results[_SKIPPED_TAG]
        | "SkippedToJson" >> beam.Map(json.dumps, sort_keys=True)
        | "WriteSkipped" >> beam.io.WriteToText(posixpath.join(out_dir, "skipped"))
    )
    _ = (
        results.examples
        | "CountWritten" >> beam.combiners.Count.Globally()
        | "WriteCount" >> beam.io.WriteToText(posixpath.join(out_dir, "written"))
    )
    return results.examples


def _read_lines(pattern: str) -> Iterable[str]:
    for path in sorted(tf.io.gfile.glob(pattern)):
        with tf.io.gfile.GFile(path, "r") as f:
            yield from (line for line in f.read().splitlines() if line)


class ImageFolderExecutor(BaseExampleGenExecutor):
    """Turns `<input_base>/<split>/<class>/<image>` trees into tf.Examples, with a skip report.

    Input splits need patterns `<split folder>/*/*`. Options come from the CustomConfig made by
    `make_custom_config`.
    """

    def GetInputSourceToExamplePTransform(self) -> beam.PTransform:
        return _ImageFolderToExample

    def Do(
        self,
        input_dict: dict[str, list[artifact.Artifact]],
        output_dict: dict[str, list[artifact.Artifact]],
        exec_properties: dict[str, Any],
    ) -> None:
        options = _parse_options(exec_properties.get(standard_component_specs.CUSTOM_CONFIG_KEY))
        input_config = example_gen_pb2.Input()
        proto_utils.json_to_proto(
            exec_properties[standard_component_specs.INPUT_CONFIG_KEY], input_config
        )
        input_base = exec_properties[standard_component_specs.INPUT_BASE_KEY]
        split_dirs = {s.name: _split_dir(input_base, s.pattern) for s in input_config.splits}
        _check_split_dirs(split_dirs)
        pools = {s.name for s in input_config.splits if is_pool_pattern(s.pattern)}
        labeled_dirs = {name: path for name, path in split_dirs.items() if name not in pools}
        folders = _class_folders(labeled_dirs, options.drop_empty_class_folders)
        class_ids = _class_ids(labeled_dirs, folders, options.labels_file)

        examples_uri = artifact_utils.get_single_uri(
            output_dict[standard_component_specs.EXAMPLES_KEY]
        )
        tmp_dir = posixpath.join(examples_uri, _TMP_DIR_NAME)
        super().Do(
            input_dict,
            output_dict,
            {
                **exec_properties,
                _TMP_DIR_KEY: tmp_dir,
                _CLASS_IDS_KEY: json.dumps(class_ids),
                _CLASS_FOLDERS_KEY: json.dumps(
                    {s.pattern: folders[s.name] for s in input_config.splits if s.name in folders}
                ),
            },
        )

        report = {
            "class_names": sorted(class_ids, key=class_ids.get),
            "max_bad_fraction": options.max_bad_fraction,
            "splits": {},
        }
        for split in input_config.splits:
            split_tmp = posixpath.join(tmp_dir, _split_key(split.pattern))
            skipped = sorted(
                (json.loads(line) for line in _read_lines(f"{split_tmp}/skipped*")),
                key=lambda record: record["path"],
            )
            written = sum(int(line) for line in _read_lines(f"{split_tmp}/written*"))
            labeled = split.name not in pools
            report["splits"][split.name] = {
                "folder": split_dirs[split.name],
                "total_files": written + len(skipped),
                "written": written,
                "skipped": len(skipped),
                # Every record of a class-folder split has a label, none of the pool's.
                "labeled": written if labeled else 0,
                "unlabeled": 0 if labeled else written,
                "skipped_files": skipped,
            }
        report_path = posixpath.join(examples_uri, REPORT_FILE)
        with tf.io.gfile.GFile(report_path, "w") as f:
            f.write(json.dumps(report, indent=1))
        tf.io.gfile.rmtree(tmp_dir)

        problems = []
        for name, stats in report["splits"].items():
            logging.info(
                "ExampleGen: split '%s': %d images written, %d skipped (report: %s)",
                name,
                stats["written"],
                stats["skipped"],
                report_path,
            )
            if stats["written"] == 0:
                problems.append(
                    f"split '{name}' has no usable images in {stats['folder']} "
                    f"({stats['skipped']} files skipped)"
                )
            elif stats["skipped"] > options.max_bad_fraction * stats["total_files"]:
                problems.append(
                    f"split '{name}': {stats['skipped']} of {stats['total_files']} files skipped "
                    f"({stats['skipped'] / stats['total_files']:.2%} > max_bad_fraction "
                    f"{options.max_bad_fraction:.2%})"
                )
        if problems:
            raise ImageDataError(f"ExampleGen: {'; '.join(problems)}; see report {report_path}")
