"""Builds the FileBasedExampleGen that runs `ImageFolderExecutor` over chosen split folders."""

from collections.abc import Sequence

from tfx.components import FileBasedExampleGen
from tfx.dsl.components.base import executor_spec
from tfx.proto import example_gen_pb2

from pipeline.components.image_example_gen.driver import ImageFolderDriver
from pipeline.components.image_example_gen.executor import (
    SPLIT_PATTERN_SUFFIX,
    UNLABELED_SPLIT,
    ImageFolderExecutor,
    make_custom_config,
    pool_pattern,
)

# The component id runners, reports and tests know the ExampleGen by.
COMPONENT_ID = "FileBasedExampleGen"


class ImageFolderExampleGen(FileBasedExampleGen):
    """FileBasedExampleGen whose driver fingerprints the input from folder listings.

    TFX's driver would stat every image file before the executor starts (see driver.py).
    """

    DRIVER_CLASS = ImageFolderDriver


def make_image_example_gen(
    data_dir: str,
    splits: Sequence[str],
    *,
    labels_file: str | None = None,
    max_bad_fraction: float = 0.01,
    max_images_per_class: int | None = None,
    drop_empty_class_folders: bool = False,
    unlabeled_dir: str | None = None,
    code_digest: str = "",
) -> ImageFolderExampleGen:
    """ExampleGen emitting one output split per folder in `splits` (e.g. ['train', 'test']).

    `unlabeled_dir` adds the split 'unlabeled' (label -1 on every record): a folder relative to
    data_dir ('unlabeled') or a full path/URI of a pool kept elsewhere, read at any depth.
    The output config is given explicitly with no split_config: left unset, TFX would hash a
    single input split into train/eval instead of keeping the folder splits.
    """
    if not splits:
        raise ValueError("make_image_example_gen needs at least one split folder name")
    if UNLABELED_SPLIT in splits:
        raise ValueError(f"'{UNLABELED_SPLIT}' is the unlabeled pool, not a class-folder split")
    input_splits = [
        example_gen_pb2.Input.Split(name=split, pattern=f"{split}{SPLIT_PATTERN_SUFFIX}")
        for split in splits
    ]
    if unlabeled_dir:
        input_splits.append(
            example_gen_pb2.Input.Split(name=UNLABELED_SPLIT, pattern=pool_pattern(unlabeled_dir))
        )
    input_config = example_gen_pb2.Input(splits=input_splits)
    return ImageFolderExampleGen(
        input_base=data_dir,
        input_config=input_config,
        output_config=example_gen_pb2.Output(),
        custom_config=make_custom_config(
            labels_file=labels_file,
            max_bad_fraction=max_bad_fraction,
            max_images_per_class=max_images_per_class,
            drop_empty_class_folders=drop_empty_class_folders,
            code_digest=code_digest,
        ),
        custom_executor_spec=executor_spec.BeamExecutorSpec(ImageFolderExecutor),
    ).with_id(COMPONENT_ID)
