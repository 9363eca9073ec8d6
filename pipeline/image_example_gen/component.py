"""Builds the FileBasedExampleGen that runs `ImageFolderExecutor` over chosen split folders."""

from collections.abc import Sequence

from tfx.components import FileBasedExampleGen
from tfx.dsl.components.base import executor_spec
from tfx.proto import example_gen_pb2

from pipeline.image_example_gen.executor import (
    SPLIT_PATTERN_SUFFIX,
    ImageFolderExecutor,
    make_custom_config,
)


def make_image_example_gen(
    data_dir: str,
    splits: Sequence[str],
    *,
    labels_file: str | None = None,
    max_bad_fraction: float = 0.01,
    max_images_per_class: int | None = None,
) -> FileBasedExampleGen:
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
    return FileBasedExampleGen(
        input_base=data_dir,
        input_config=input_config,
        output_config=example_gen_pb2.Output(),
        custom_config=make_custom_config(
            labels_file=labels_file,
            max_bad_fraction=max_bad_fraction,
            max_images_per_class=max_images_per_class,
        ),
        custom_executor_spec=executor_spec.BeamExecutorSpec(ImageFolderExecutor),
    )
