"""MLflow wiring: one parent run per pipeline invocation, one child run per executed stage.

The library (`lawm/`) never imports MLflow; stages get plain callables (`log_metrics`, `log_artifact`)
from here. Default store: a sqlite file in the run's root folder; MLFLOW_TRACKING_URI overrides it.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import mlflow
import yaml

REPO = Path(__file__).resolve().parents[1]


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').absolute()}"


def git_commit() -> str:
    if os.environ.get("LAWM_GIT_COMMIT"):
        return os.environ["LAWM_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def setup(root: Path, experiment: str) -> str:
    """Point MLflow at the run's store and experiment; artifacts of a local store live beside it."""
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        location = (root / "mlartifacts").absolute().as_uri() if uri.startswith("sqlite:") else None
        mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment)
    return uri


def start_parent(name: str, tags: dict[str, str]):
    return mlflow.start_run(run_name=name, tags=tags)


def start_stage(stage: str, config: dict[str, Any], tags: dict[str, str]):
    run = mlflow.start_run(run_name=stage, nested=True, tags={"lawm.stage": stage, **tags})
    params = {k: str(v)[:500] for k, v in flatten(config).items()}
    for i in range(0, len(params), 90):  # MLflow takes at most 100 params per call
        mlflow.log_params(dict(list(params.items())[i:i + 90]))
    mlflow.log_text(yaml.safe_dump(config, sort_keys=False), "config.yaml")
    return run


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path)
    elif path.exists():
        mlflow.log_artifact(str(path), artifact_path)


def set_tag(key: str, value: str) -> None:
    mlflow.set_tag(key, value)


def end_run(status: str = "FINISHED") -> None:
    mlflow.end_run(status=status)
