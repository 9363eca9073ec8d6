"""The supervised baseline: the same network from random initialization, trained on exactly the
labeled examples fine-tuning reads, so a team can see whether pretraining paid off on its data.

Its budget, by default, is as many optimizer steps as the stages that produced the candidate
(pretraining and fine-tuning, and distillation when it runs) took together, each counted over
what that stage reads, as that stage counts it (`TrainerConfig.matched`).
"""

from __future__ import annotations

from models.config import MatchedStage, TrainerConfig
from models.model import SimCLRModel
from models.schedule import total_train_steps
from models.tasks.base import StageInputs, Task, fit_batch
from models.tasks.finetune import FinetuneTask


class BaselineTask(FinetuneTask):
    """Fine-tuning's data and loss, without a base model and with its own budget."""

    def __init__(self, config: TrainerConfig, inputs: StageInputs, num_replicas: int = 1):
        super().__init__(config, inputs, num_replicas)
        self.matched_steps: dict[str, int] = {}
        if config.matched and not config.train.train_steps:
            self.matched_steps = {m.stage: self._steps_of(m, num_replicas) for m in config.matched}
            self.total_steps = max(1, sum(self.matched_steps.values()))
            self.train_epochs = max(
                1, round(self.total_steps * self.batch_size / self.num_examples)
            )
            matched = " + ".join(f"{s} {n}" for s, n in self.matched_steps.items())
            print(
                f"baseline: {self.total_steps} steps, as many as the candidate's stages took "
                f"({matched})",
                flush=True,
            )

    def _steps_of(self, stage: MatchedStage, num_replicas: int) -> int:
        """The steps `stage` trains, counted the way its own Task counts them: over the labeled
        split and the pool, or over the labeled examples this baseline reads too."""
        read = self.pretraining_read if stage.reads_unlabeled else self.num_examples
        batch = fit_batch(stage.train_batch_size, read, num_replicas)
        epochs = stage.train_epochs
        if stage.recipe_epochs and not stage.train_steps:
            epochs = self.recipe_epochs()
        return total_train_steps(read, batch, epochs, stage.train_steps)

    @property
    def eval_label(self) -> str:
        return "baseline (supervised, random initialization)"

    # A fresh supervised network, not fine-tuning's (which may import a released backbone).
    build_model = Task.build_model

    def initialize(self, model: SimCLRModel) -> None:
        """Nothing to load: the baseline starts from random initialization."""

    def write_results(self, path: str, metrics: dict[str, float], seconds: dict) -> None:
        budget = {"budget": "steps" if self.matched_steps else "epochs"}
        if self.matched_steps:
            budget["matched_steps"] = self.matched_steps
        super().write_results(path, {**metrics, **budget}, seconds)
