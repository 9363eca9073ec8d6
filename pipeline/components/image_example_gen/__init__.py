"""File-based TFX ExampleGen for class-folder image trees (`<root>/<split>/<class>/<image>`)."""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"

from pipeline.components.image_example_gen.component import make_image_example_gen
from pipeline.components.image_example_gen.executor import (
    REPORT_FILE,
    ImageDataError,
    ImageFolderExecutor,
    discover_splits,
    make_custom_config,
)

__all__ = [
    "REPORT_FILE",
    "ImageDataError",
    "ImageFolderExecutor",
    "discover_splits",
    "make_custom_config",
    "make_image_example_gen",
]
