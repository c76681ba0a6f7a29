"""MLflow wiring: one parent run per pipeline invocation, one child run per executed stage.

The library (`lawm/`) never imports MLflow; stages get plain callables (`log_metrics`, `log_artifact`)
from here. Default store: a sqlite file in the run's root folder; MLFLOW_TRACKING_URI overrides it.

What a run carries, so that MLflow's runs table and compare view tell runs apart:
- the experiment: the tag `mlflow.experimentKind = custom_model_development` (set by `setup`), MLflow 3's own mark
  of a model-training experiment. Measured with headless Chromium against mlflow 3.17.2: its UI ignores that tag and
  lays every experiment out by a per-browser switch (GenAI | Model training, default GenAI: an empty trace overview).
  A link with `?workflowType=machine_learning` opens the runs table; `ui_url` makes such links, so print those.
- every child run: the tag `lawm.stage` and the parent run's name (`start_stage`), and, from `log_stage_fields`,
  the tag `lawm.pipeline` plus the params `lawm.seed`, `lawm.data`, `lawm.root` and, where the stage or a stage it
  reads from has them, `lawm.encoder`, `lawm.regulariser`, `lawm.capacity_knob`, `lawm.capacity`. Params, not only
  tags: the compare view's parallel-coordinates, scatter and contour plots take params and metrics as axes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable

import mlflow
import yaml

from lawm import storage
from lawm.models.encoders import EncoderConfig
from lawm.models.regularizers import RegConfig

REPO = Path(__file__).resolve().parents[1]

# MLflow 3's mark of an experiment's kind, and the value its UI writes when a user picks "model training" (read from
# mlflow 3.17.2's server/js bundle; the Python package has no constant for it). Kept although 3.17.2's UI lays pages
# out by MODEL_TRAINING_VIEW instead: it is the experiment's own record of what it holds.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
# The URL query that switches the 3.17 UI to its model-training layout (same bundle: the `workflowType` parameter).
MODEL_TRAINING_VIEW = "workflowType=machine_learning"

# Each regulariser's capacity knob: the one RegConfig field that the paper's tables sweep (see RegConfig's comments).
CAPACITY_KNOB = {"sparse": "l1", "noisy": "beta", "discrete": "codebook_size", "none": None}


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').absolute()}"


def ui_url(server: str, experiment_id: str | None = None) -> str:
    """The MLflow UI page that shows runs: an experiment's runs table, or the experiment list, in the training layout.

    `server` is the UI's base URL (a tracking server's http URI, or `mlflow ui`'s address for a sqlite store).
    """
    page = f"experiments/{experiment_id}/runs" if experiment_id else "experiments"
    return f"{server.rstrip('/')}/#/{page}?{MODEL_TRAINING_VIEW}"


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


def _template_path() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lawm" / f"mlflow-{mlflow.__version__}.db"


def seed_sqlite_store(uri: str) -> None:
    """Start a new sqlite store as a copy of an empty one made once per machine and MLflow version: MLflow creates a
    store by running its ~60 schema migrations, 1.7 s on a quiet 2-core machine (~10 s with other work on the cores),
    where a copy takes 0.04 s (measured with mlflow 3.17.2); every new run root, and every test, makes one.

    The template and the copy are made under temporary names; the copy is linked into place only where no store is
    (a store another process made meanwhile is never replaced). A copy that does not read as a store (a damaged
    template) is dropped with the template, and a cache that cannot be written (a read-only home) is passed over:
    MLflow then makes the store itself. Nothing for an existing store or another kind of URI."""
    import sqlite3

    from lawm.files import temporary_name

    if not uri.startswith("sqlite:///"):
        return
    target = Path(uri[len("sqlite:///"):])
    if target.exists():
        return
    template = _template_path()
    tmp = temporary_name(target)
    try:
        if not template.exists():
            template.parent.mkdir(parents=True, exist_ok=True)
            # a name never used before: MLflow keeps a store (and its open file) per URI for the life of the process
            work = Path(tempfile.mkdtemp(prefix=".build-", dir=template.parent))
            try:
                mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}").search_experiments()  # the migrations, once
                os.replace(work / "mlflow.db", template)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, tmp)
        # MLflow's "Default" experiment: its artifacts beside this store, not where the template was made
        with contextlib.closing(sqlite3.connect(tmp)) as db, db:
            db.execute("SELECT version_num FROM alembic_version").fetchone()
            db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                       ((target.parent / "mlartifacts" / "0").absolute().as_uri(),))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.link(tmp, target)  # fails, and changes nothing, where a store appeared meanwhile
    except sqlite3.DatabaseError:
        template.unlink(missing_ok=True)
    except OSError:
        pass  # no cache (or a store appeared meanwhile): MLflow makes or opens the store as before
    finally:
        tmp.unlink(missing_ok=True)


def setup(root: Path, experiment: str) -> str:
    """Point MLflow at the run's store and experiment; artifacts of a local store live beside it."""
    user = os.environ.get("MLFLOW_TRACKING_URI")
    uri = tracking_uri(root)
    seed_sqlite_store(uri)
    mlflow.set_tracking_uri(uri)
    # MLflow 3 also writes the URI into MLFLOW_TRACKING_URI; left there, it would pass for the user's choice and send
    # the next pipeline of this process (a notebook, a test session, a sweep) into this run's store
    if user is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start/stop lines, every training run
    if mlflow.get_experiment_by_name(experiment) is None:
        location = (root / "mlartifacts").absolute().as_uri() if uri.startswith("sqlite:") else None
        mlflow.create_experiment(experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    exp = mlflow.set_experiment(experiment)
    # Experiments made before this tag existed (or switched in the UI) are set back: lawm's runs are model training.
    if exp.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:
        mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return uri


def start_parent(name: str, tags: dict[str, str]):
    return mlflow.start_run(run_name=name, tags=tags)


def start_stage(stage: str, config: dict[str, Any], tags: dict[str, str], *, system_metrics: bool = False):
    """A child run of the active parent. `system_metrics`: MLflow samples this process's host (CPU, memory, disk,
    network, GPUs) every 10 s into `system/*` metrics while the run is open: the driver's node."""
    parent = mlflow.active_run()
    parent_tags = {"lawm.parent_run_name": parent.info.run_name} if parent is not None else {}
    run = mlflow.start_run(run_name=stage, nested=True, tags={"lawm.stage": stage, **parent_tags, **tags},
                           log_system_metrics=system_metrics)
    params = {k: str(v)[:500] for k, v in flatten(config).items()}
    for i in range(0, len(params), 90):  # MLflow takes at most 100 params per call
        mlflow.log_params(dict(list(params.items())[i:i + 90]))
    mlflow.log_text(yaml.safe_dump(config, sort_keys=False), "config.yaml")
    return run


def _find(obj: Any, kind: type) -> Any:
    """The first instance of `kind` in a config dataclass tree (depth first, in field order), else None."""
    if isinstance(obj, kind):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            found = _find(getattr(obj, f.name), kind)
            if found is not None:
                return found
    return None


def _encoder_name(e: EncoderConfig) -> str:
    detail = {"patch": f"patch{e.patch_size}", "timm": e.timm_name, "vjepa2": str(e.weights)}[e.kind]
    return f"{e.kind}:{detail}@{e.image_size}"


def stage_fields(cfg: Any, *, stage: str, upstream: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(tags, params) that place a stage's run in the pipeline's design: what it ran on and with which settings.

    `cfg` is the whole pipeline config; `upstream` names the stages whose outputs this one reads. The regulariser and
    the encoder are the stage's own when its section has them, else those of the first upstream stage that does
    (the controller is described by the latent action model it was trained on).
    """
    sections = [getattr(cfg, stage, None), *(getattr(cfg, name, None) for name in upstream)]
    tags = {"lawm.pipeline": str(cfg.run.name)}
    params = {"lawm.seed": str(cfg.run.seed), "lawm.root": root_name(cfg.run.root),
              "lawm.data": cfg.ingest.input or "generate"}  # ingest's input; empty = the pipeline's own `generate`
    encoder = next((e for e in (_find(s, EncoderConfig) for s in sections) if e is not None), None)
    if encoder is not None:
        params["lawm.encoder"] = _encoder_name(encoder)
    reg = next((r for r in (_find(s, RegConfig) for s in sections) if r is not None), None)
    if reg is not None:
        knob = CAPACITY_KNOB[reg.kind]
        params["lawm.regulariser"] = reg.kind
        params["lawm.capacity_knob"] = knob or "none"
        params["lawm.capacity"] = str(getattr(reg, knob)) if knob else "none"
    return tags, params


def root_name(root: str) -> str:
    """How a run root is recorded: a URI as given, a path made absolute."""
    return root if storage.is_uri(root) else str(Path(root).absolute())


def log_stage_fields(cfg: Any, *, stage: str, upstream: Iterable[str]) -> dict[str, str]:
    """Tag the active (child) run with `stage_fields` and log them as params; returns them all."""
    tags, params = stage_fields(cfg, stage=stage, upstream=upstream)
    mlflow.set_tags(tags)
    mlflow.log_params(params)
    return {**tags, **params}


def log_clip_tables(tables: dict[str, Path]) -> list[str]:
    """Each clip table (ingest's `clips.parquet`: one row per clip, its source video, split and time span) becomes an
    input dataset of the active run, so MLflow's Dataset column and compare view show which data a run saw. Tables
    that do not exist (a stage not run in this pipeline) are left out; returns the names logged. With an object-store
    root, each is pulled first (the stage may not read ingest's folder) and named by its URI."""
    import mlflow.data
    import pandas as pd

    logged = []
    for name, path in tables.items():
        storage.pull(path)
        if path.is_file():
            frame = pd.read_parquet(path)
            source = storage.remote_of(path) or str(path)
            with warnings.catch_warnings():  # MLflow's hints on guessing a source type and on integer columns
                warnings.simplefilter("ignore", UserWarning)
                mlflow.log_input(mlflow.data.from_pandas(frame, source=source, name=name), context="clips")
            logged.append(name)
    return logged


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
