"""The pipeline's configuration: one typed section per stage, plus `run` (where and how)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from lawm.config import require
from pipelines.ingest import IngestConfig

from lawm_datasets.simulate import SimulateConfig

from pipelines.encode import EncodeConfig

from jobs.generate import GenerateConfig
from jobs.stages import IngestSimConfig
from jobs.train_stages import TrainControllerConfig, TrainDecoderConfig, TrainWMActionConfig, TrainWMConfig


@dataclass
class RunConfig:
    root: str = "runs/demo"  # every stage writes <root>/<stage>/; MLflow's sqlite store sits in <root>
    name: str = "lawm"  # the parent MLflow run is named <name>-<timestamp>
    experiment: str = "lawm"
    seed: int = 0
    num_cpus: Optional[int] = None  # local Ray only; a cluster (RAY_ADDRESS) brings its own

    def validate(self) -> None:
        require(bool(self.root), "root", "must not be empty")


@dataclass
class PipelineConfig:
    run: RunConfig = field(default_factory=RunConfig)
    stages: list[str] = field(default_factory=list)  # empty = every registered stage
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    ingest_sim: IngestSimConfig = field(default_factory=IngestSimConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    train_wm: TrainWMConfig = field(default_factory=TrainWMConfig)
    train_decoder: TrainDecoderConfig = field(default_factory=TrainDecoderConfig)
    train_controller: TrainControllerConfig = field(default_factory=TrainControllerConfig)
    train_wm_action: TrainWMActionConfig = field(default_factory=TrainWMActionConfig)
