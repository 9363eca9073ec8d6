"""Builds the FileBasedExampleGen that runs `ImageFolderExecutor` over chosen split folders."""

from collections.abc import Sequence

from tfx.components import FileBasedExampleGen
from tfx.dsl.components.base import executor_spec
from tfx.proto import example_gen_pb2

from pipeline.image_example_gen.driver import ImageFolderDriver
from pipeline.image_example_gen.executor import (
    SPLIT_PATTERN_SUFFIX,
    ImageFolderExecutor,
    make_custom_config,
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
) -> ImageFolderExampleGen:
    """ExampleGen emitting one output split per folder in `splits` (e.g. ['train', 'test']).

    The output config is given explicitly with no split_config: left unset, TFX would hash a
    single input split into train/eval instead of keeping the folder splits.
    """
    if not splits:
        raise ValueError("make_image_example_gen needs at least one split folder name")
    input_config = example_gen_pb2.Input(
        splits=[
            example_gen_pb2.Input.Split(name=split, pattern=f"{split}{SPLIT_PATTERN_SUFFIX}")
            for split in splits
        ]
    )
    return ImageFolderExampleGen(
        input_base=data_dir,
        input_config=input_config,
        output_config=example_gen_pb2.Output(),
        custom_config=make_custom_config(
            labels_file=labels_file,
            max_bad_fraction=max_bad_fraction,
            max_images_per_class=max_images_per_class,
            drop_empty_class_folders=drop_empty_class_folders,
        ),
        custom_executor_spec=executor_spec.BeamExecutorSpec(ImageFolderExecutor),
    ).with_id(COMPONENT_ID)
