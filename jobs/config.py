"""The pipeline's configuration: one typed section per stage, plus `run` (where and how)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lawm import storage
from lawm.config import ConfigError, require
from pipelines.ingest import IngestConfig

from lawm_datasets.simulate import SimulateConfig

from pipelines.encode import EncodeConfig

from jobs.eval_planning import EvalPlanningConfig
from jobs.eval_stages import EvalLeakageConfig, EvalProbeConfig, EvalTransferConfig
from jobs.generate import GenerateConfig
from jobs.report import ReportConfig
from jobs.stages import IngestSimConfig
from jobs.train_stages import TrainControllerConfig, TrainDecoderConfig, TrainWMActionConfig, TrainLAMConfig


@dataclass(kw_only=True)
class RunConfig:
    # every stage writes <root>/<stage>/; MLflow's sqlite store sits in <root>. A path, or an s3:// or gs:// URI
    # (then MLFLOW_TRACKING_URI must be set, and the stages work in a mirror of it: lawm/storage.py)
    root: str = "runs/demo"
    name: str = "lawm"  # the parent MLflow run is named <name>-<timestamp>
    experiment: str = "lawm"
    seed: int = 0
    num_cpus: Optional[int] = None  # local Ray only; a cluster (RAY_ADDRESS) brings its own
    sweep: str = ""  # set by jobs/sweep.py on its trials: the parent run's `lawm.sweep` tag

    def validate(self) -> None:
        require(bool(self.root), "root", "must not be empty")
        if storage.is_uri(self.root):  # worked in through a mirror on each node (lawm/storage.py)
            try:
                storage.split_uri(self.root)
            except ValueError as err:
                raise ConfigError(f"run.root: {err}") from None
            # MLflow's default store is a sqlite file (and artifacts) in the root: in a node's mirror they would be lost
            require(os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")), "root",
                    f"{self.root!r} is in an object store, where MLflow's sqlite file cannot live: set "
                    "MLFLOW_TRACKING_URI to a tracking server (http://..., e.g. `make mlflow-server`)")
            return
        # Under `ray job submit` the driver runs in Ray's temporary copy of --working-dir: a relative root would put
        # every output and the MLflow store there, and they would vanish with the cluster.
        require(not (in_ray_job() and not Path(self.root).is_absolute()), "root",
                f"{self.root!r} is relative, and this is a Ray job whose working directory is Ray's temporary copy; "
                "set run.root to an absolute path on storage every node sees (e.g. run.root=/mnt/lawm/runs/x)")


def in_ray_job() -> bool:
    """True in the driver of a job started by `ray job submit` (Ray hands it its job config in this variable)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


@dataclass(kw_only=True)
class PipelineConfig:
    run: RunConfig = field(default_factory=RunConfig)
    stages: list[str] = field(default_factory=list)  # empty = every registered stage
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    ingest_sim: IngestSimConfig = field(default_factory=IngestSimConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    train_lam: TrainLAMConfig = field(default_factory=TrainLAMConfig)
    train_decoder: TrainDecoderConfig = field(default_factory=TrainDecoderConfig)
    train_controller: TrainControllerConfig = field(default_factory=TrainControllerConfig)
    train_wm_action: TrainWMActionConfig = field(default_factory=TrainWMActionConfig)
    eval_leakage: EvalLeakageConfig = field(default_factory=EvalLeakageConfig)
    eval_transfer: EvalTransferConfig = field(default_factory=EvalTransferConfig)
    eval_probe: EvalProbeConfig = field(default_factory=EvalProbeConfig)
    eval_planning: EvalPlanningConfig = field(default_factory=EvalPlanningConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
