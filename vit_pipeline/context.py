"""What every stage is handed: the typed config and a logger bound to one MLflow run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vit_pipeline import tracking
from vit_pipeline.config import PipelineConfig


@dataclass(frozen=True)
class StageContext:
    """One run's stage context.

    Attributes:
        cfg: The validated config of the run.
        log: Logs to the run (metrics, params, tags, artifacts); its lifecycle
            (RUNNING, FINISHED, ...) belongs to ``vit_pipeline.runs``, not to stages.
    """

    cfg: PipelineConfig
    log: tracking.RunLogger

    @classmethod
    def open(cls, cfg: PipelineConfig, run_id: str) -> StageContext:
        return cls(cfg, tracking.RunLogger.open(cfg, run_id))

    @property
    def run_id(self) -> str:
        return self.log.run_id

    @property
    def work_dir(self) -> Path:
        """The run's folder for stage outputs (prepared data, checkpoints, exports)."""
        return tracking.work_dir(self.run_id)
