"""pipeline/components/tfrecord_example_gen.py: the pool's records without a label get -1,
nothing else changes."""

import pathlib

import tensorflow as tf
from tfx.proto import example_gen_pb2
from tfx.types import standard_artifacts, standard_component_specs

from pipeline.components.tfrecord_example_gen import (
    COMPONENT_ID,
    PoolImportExecutor,
    make_tfrecord_example_gen,
    with_label,
)


def _example(label: int | None, tag: bytes) -> tf.train.Example:
    feature = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[tag]))}
    if label is not None:
        feature["label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))
    return tf.train.Example(features=tf.train.Features(feature=feature))


def _write(path: pathlib.Path, examples: list[tf.train.Example]) -> None:
    with tf.io.TFRecordWriter(str(path)) as writer:
        for example in examples:
            writer.write(example.SerializeToString())


def _read(folder: pathlib.Path) -> dict[bytes, list[int]]:
    files = [str(p) for p in folder.glob("*.gz")]
    out = {}
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        feature = tf.train.Example.FromString(record.numpy()).features.feature
        out[feature["image"].bytes_list.value[0]] = list(feature["label"].int64_list.value)
    return out


def test_with_label_adds_minus_one_only_where_the_label_is_missing():
    kept = _example(3, b"a")
    assert with_label(kept) is kept
    added = with_label(_example(None, b"b"))
    assert list(added.features.feature["label"].int64_list.value) == [-1]
    assert added.features.feature["image"].bytes_list.value == [b"b"]


def test_only_the_unlabeled_split_is_labeled(tmp_path):
    data = tmp_path / "stl10"
    data.mkdir()
    _write(data / "stl10-train.tfrecord-00000-of-00001", [_example(0, b"t0"), _example(1, b"t1")])
    _write(
        data / "stl10-unlabelled.tfrecord-00000-of-00001",
        [_example(None, b"u0"), _example(-1, b"u1")],
    )
    component = make_tfrecord_example_gen(
        str(data),
        example_gen_pb2.Input(
            splits=[
                example_gen_pb2.Input.Split(name="train", pattern="*-train.tfrecord*"),
                example_gen_pb2.Input.Split(name="unlabeled", pattern="*-unlabelled.tfrecord*"),
            ]
        ),
    )
    assert component.id == COMPONENT_ID
    examples = standard_artifacts.Examples()
    examples.uri = str(tmp_path / "out")
    PoolImportExecutor().Do(
        {}, {standard_component_specs.EXAMPLES_KEY: [examples]}, component.exec_properties
    )
    assert _read(tmp_path / "out" / "Split-unlabeled") == {b"u0": [-1], b"u1": [-1]}
    assert _read(tmp_path / "out" / "Split-train") == {b"t0": [0], b"t1": [1]}
