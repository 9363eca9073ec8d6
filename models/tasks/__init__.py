"""Trainer stages as tasks: one module each, run by `models/driver.py`."""

from models.tasks.base import StageInputs, Task
from models.tasks.distill import DistillTask
from models.tasks.finetune import FinetuneTask
from models.tasks.pretrain import PretrainTask

TASKS: dict[str, type[Task]] = {
    "pretrain": PretrainTask,
    "finetune": FinetuneTask,
    "distill": DistillTask,
}

__all__ = ["TASKS", "StageInputs", "Task"]
