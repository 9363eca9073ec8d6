"""The supervised baseline: the same network from random initialization, trained on exactly the
labeled examples fine-tuning reads, so a team can see whether pretraining paid off on its data.

Its budget, by default, is as many optimizer steps as the stages that produced the candidate
(pretraining and fine-tuning, and distillation when it runs) took together, each counted over
what that stage reads, as that stage counts it (`TrainerConfig.matched`).
"""

from __future__ import annotations

from models import data as data_lib
from models.config import MatchedStage, TrainerConfig, semi_supervised_epochs
from models.model import SimCLRModel
from models.schedule import total_train_steps
from models.tasks.base import StageInputs
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
        """The steps `stage` trains, counted the way its own Task counts them."""
        labeled = self.num_examples
        read = labeled
        if stage.reads_unlabeled:
            pool = data_lib.pool_files_beside(self.inputs.train_files)
            read = len(self.all_keys) + (data_lib.count_records(pool) if pool else 0)
        batch = stage.train_batch_size
        if batch > read:
            batch = max(num_replicas, read // num_replicas * num_replicas)
        epochs = stage.train_epochs
        if stage.recipe_epochs and not stage.train_steps:
            pool = data_lib.pool_files_beside(self.inputs.train_files)
            pretraining_read = len(self.all_keys) + (data_lib.count_records(pool) if pool else 0)
            epochs = semi_supervised_epochs(labeled / max(1, pretraining_read))
        return total_train_steps(read, batch, epochs, stage.train_steps)

    @property
    def eval_label(self) -> str:
        return "baseline (supervised, random initialization)"

    def build_model(self) -> SimCLRModel:
        return SimCLRModel(
            self.config.model,
            self.inputs.num_classes,
            self.config.input.image_size,
            pretraining=False,
        )

    def initialize(self, model: SimCLRModel) -> None:
        """Nothing to load: the baseline starts from random initialization."""

    def write_results(self, path: str, metrics: dict[str, float], seconds: dict) -> None:
        budget = {"budget": "steps" if self.matched_steps else "epochs"}
        if self.matched_steps:
            budget["matched_steps"] = self.matched_steps
        super().write_results(path, {**metrics, **budget}, seconds)
