"""The pipeline definition: what each component is handed, the gates, nothing read at compile."""

import json

import pytest
import tensorflow as tf

from pipeline import configs
from pipeline import pipeline as pipeline_lib


def _build(config, layout, tmp_path):
    return pipeline_lib.create_pipeline(
        config,
        layout,
        pipeline_root=str(tmp_path / "root"),
        metadata_path="",
        push_dir=str(tmp_path / "push"),
        beam_pipeline_args=[],
    )


def _layout(**kwargs):
    values = dict(
        data_dir="gs://bucket/tfrecords",
        data_format="tfrecord",
        splits=("train", "validation"),
        train_split="train",
        eval_split="validation",
    )
    return pipeline_lib.DataLayout(**{**values, **kwargs})


def test_labels_file_on_gcs_is_not_read_while_building(tmp_path, monkeypatch):
    def no_reads(*args, **kwargs):
        raise AssertionError(f"read while building the pipeline: {args}")

    monkeypatch.setattr(tf.io.gfile, "GFile", no_reads)
    config = configs.SimCLRConfig()
    config.data.labels_file = "gs://bucket/labels.txt"
    config.eval.min_top1 = 0.1
    built = _build(config, _layout(), tmp_path)
    [transform] = [c for c in built.components if c.id == "Transform"]
    custom = json.loads(transform.exec_properties["custom_config"])
    assert custom["labels_file"] == "gs://bucket/labels.txt" and "label_names" not in custom


def test_each_trainer_is_handed_its_own_config_and_a_stable_checkpoint_root(tmp_path):
    config = configs.SimCLRConfig()
    built = _build(config, _layout(num_classes=10), tmp_path)
    trainers = {c.id: c for c in built.components if c.id.endswith("_trainer")}
    assert set(trainers) == {"pretrain_trainer", "finetune_trainer"}
    for stage in ("pretrain", "finetune"):
        custom = json.loads(trainers[f"{stage}_trainer"].exec_properties["custom_config"])
        assert set(custom) == {"trainer", "checkpoint_root"}
        assert custom["checkpoint_root"] == str(tmp_path / "root" / "checkpoints")
        assert custom["trainer"] == configs.trainer_config(config, stage).to_json()


@pytest.mark.parametrize(
    "min_top1, classes, dataset, floor",
    [
        (-1.0, 10, "folder", 0.2),
        (-1.0, 2, "folder", 0.75),
        (0.35, 10, "folder", 0.35),
        (-1.0, None, "imagenet2012", 0.002),
    ],
)
def test_top1_floor(min_top1, classes, dataset, floor):
    config = configs.SimCLRConfig()
    config.eval.min_top1, config.data.dataset = min_top1, dataset
    assert pipeline_lib.min_top1(config, classes) == pytest.approx(floor)
    gate = pipeline_lib.eval_config(config, floor).metrics_specs[0].metrics[1]
    bound = gate.per_slice_thresholds[0].threshold.value_threshold.lower_bound.value
    assert bound == pytest.approx(floor)


def test_unknown_class_count_needs_an_explicit_floor():
    config = configs.SimCLRConfig()
    config.data.dataset = "folder"
    with pytest.raises(ValueError, match="^--min_top1: the number of classes is unknown"):
        pipeline_lib.min_top1(config, None)
