"""Trainer stages as tasks: one module each, declared in `registry.py`, run by `models/driver.py`.

Importing this package loads no TensorFlow: the command line reads the registry. The Task
classes load on first use (`TASKS`, `Task`, `StageInputs`).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "TASKS":
        from models.tasks import registry

        return {stage.name: stage.task_class() for stage in registry.stages()}
    if name in ("Task", "StageInputs"):
        from models.tasks import base

        return getattr(base, name)
    raise AttributeError(f"module 'models.tasks' has no attribute {name!r}")


__all__ = ["TASKS", "StageInputs", "Task"]
