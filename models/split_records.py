"""How many records a stage trains on, and how many of them are unlabeled, without reading them.

On ImageNet the train split is over a million records and tens of GB on GCS: passing every image
through the Trainer at start (and again on every restart) only to count them costs more than
many training steps. StatisticsGen has already counted every split exactly, and its label
minimum and maximum tell whether a split holds unlabeled (-1) records; the pipeline hands those
sizes to the Trainer (`pipeline/components/trainer.py`). Records are read only when a label
subset needs their keys, or when no statistics are at hand (a stage run outside the pipeline).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from models import data as data_lib
from models.config import UNLABELED_SPLIT

# The Trainer's custom_config key under which the pipeline passes every split's size.
SPLIT_SIZES_KEY = "split_sizes"


@dataclass(frozen=True)
class SplitSize:
    """One split as the statistics saw it: its record count and the range of its integer
    labels (None when the statistics do not give it: labels that are strings, or missing)."""

    examples: int
    min_label: int | None = None
    max_label: int | None = None

    def unlabeled(self) -> int | None:
        """Records labeled -1, when the label range settles it (all or none); else None."""
        if self.min_label is None or self.max_label is None:
            return None
        if self.max_label < 0:
            return self.examples
        return 0 if self.min_label >= 0 else None

    @classmethod
    def from_json(cls, value: Mapping) -> SplitSize:
        return cls(int(value["examples"]), value.get("min_label"), value.get("max_label"))


def sizes_from_json(value: Mapping[str, Mapping] | None) -> dict[str, SplitSize]:
    return {split: SplitSize.from_json(v) for split, v in (value or {}).items()}


class SplitRecords:
    """A stage's training files (one pattern per split) and what is known about them.

    `sizes` holds every split of the pipeline's data (the pool included, also for a stage that
    does not read it); without it every answer comes from reading the records once.
    """

    def __init__(self, files: Sequence[str], sizes: Mapping[str, SplitSize] | None = None):
        self.files = list(files)
        self.sizes = dict(sizes or {})
        self.splits = [data_lib.split_name(f) for f in self.files]
        self.reads = 0  # passes over the records (start-up cost; tests and the benchmark)

    @property
    def sized(self) -> bool:
        """Whether the statistics size every split read (counting reads no record)."""
        return bool(self.sizes) and all(s in self.sizes for s in self.splits)

    @functools.cached_property
    def labels_and_keys(self) -> tuple[np.ndarray, np.ndarray]:
        """Every record's (label, key): one pass over all of them, images included."""
        self.reads += 1
        return data_lib.read_labels_and_keys(self.files)

    @functools.cached_property
    def count(self) -> int:
        if self.sized:
            return sum(self.sizes[s].examples for s in self.splits)
        return len(self.labels_and_keys[0])

    @functools.cached_property
    def unlabeled(self) -> int:
        """Records labeled -1 (the unlabeled pool, or any in a labeled split)."""
        if self.sized:
            parts = [self.sizes[s].unlabeled() for s in self.splits]
            if None not in parts:
                return sum(parts)
        return int((self.labels_and_keys[0] < 0).sum())

    def unread_pool_size(self) -> int:
        """Records of the unlabeled pool when this stage does not read it (0 when it does, as
        `count` holds them): fine-tuning's semi-supervised recipe needs the size of everything
        pretraining read."""
        if UNLABELED_SPLIT in self.splits:
            return 0
        if self.sizes:
            size = self.sizes.get(UNLABELED_SPLIT)
            return size.examples if size else 0
        pool = data_lib.pool_files_beside(self.files)
        if not pool:
            return 0
        self.reads += 1
        return data_lib.count_records(pool)
