"""Runs pipeline stages in order: skip what is done, record everything in MLflow.

A stage's outputs live in `<root>/<stage>/`; `_stage.json` there is written last, atomically, and holds
the config hash and the hash of the inputs it was made from. A stage whose marker matches is skipped
(a tag on the parent run says so, no old run is rewritten). `_pending.json` records what an unfinished
attempt was configured with, so a resumable stage resumes only work made with the same settings.

With an object-store root (lawm/storage.py) the runner keeps the store the record: it pulls a marker before reading
it and the upstream outputs before a stage runs (a resumed stage also its own folder), pushes the stage's folder
when it ends or fails, and pushes `_stage.json` after everything else, so the store too gets the marker last.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lawm.config import ConfigError, config_hash, to_dict
from lawm import provenance, storage
from lawm.files import atomic_write_json, read_json_object

from jobs import tracking


@dataclass(kw_only=True)
class StageContext:
    name: str
    out_dir: Path
    root: Path
    inputs: dict[str, dict]  # upstream stage → its _stage.json record (outputs under "outputs")
    seed: int
    tracking_uri: str = ""
    mlflow_run_id: str = ""
    log_metrics: Callable[[dict, int | None], None] = lambda metrics, step=None: None
    log_artifact: Callable[..., None] = lambda path, artifact_path=None: None

    def upstream(self, stage: str, key: str) -> Any:
        if stage not in self.inputs:
            raise RuntimeError(f"stage {self.name} needs the outputs of `{stage}`, which has not run")
        return self.inputs[stage]["outputs"][key]


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Any, StageContext], dict]
    inputs: Callable[[Any], list[str]] = lambda cfg: []  # upstream stages, given the whole pipeline config
    external: Callable[[Any], Any] = lambda section: None  # identity of inputs from outside the pipeline
    resumable: bool = False
    section: str = ""  # config section; the stage name when empty
    reads: Callable[[Any], list[str]] = lambda section: []  # paths outside the pipeline that the stage reads
    # raised when what the stage writes changes meaning: outputs of an older version are not trusted (it reruns, and
    # so does every stage after it); 0 adds nothing to the identity, so raising it leaves every other stage's identity
    # as it was
    version: int = 0


@dataclass
class StageResult:
    name: str
    status: str  # ran | skipped | failed
    outputs: dict = field(default_factory=dict)
    seconds: float = 0.0


def marker(root: Path, name: str) -> dict | None:
    storage.pull(root / name / "_stage.json")
    return read_json_object(root / name / "_stage.json")


def check_inputs(cfg: Any, stages: list[Stage], selected: list[str]) -> None:
    """Fail before any work when a selected stage needs one that is neither selected nor done."""
    root = storage.working_root(cfg.run.root)
    for stage in (s for s in stages if s.name in selected):
        # a rerun deletes the stage's folder first: it must never hold what the stage reads
        out_dir = (root / stage.name).resolve()
        for path in stage.reads(getattr(cfg, stage.section or stage.name)):
            where = Path(path).absolute().resolve()
            if where == out_dir or out_dir in where.parents:
                raise ConfigError(f"{stage.section or stage.name}.input: {path} is inside {out_dir}, which the stage "
                                  "replaces when it reruns; move the input elsewhere")
        for name in stage.inputs(cfg):
            if name not in selected and marker(root, name) is None:
                raise ConfigError(f"stages: `{stage.name}` needs `{name}` first: run it (or include it in --stages)")


def run_pipeline(cfg: Any, stages: list[Stage], selected: list[str], force: bool = False,
                 echo: Callable[[str], None] = print) -> list[StageResult]:
    """Run `selected` stages (in registry order). Each executed stage is a child MLflow run."""
    import torch  # its thread count is a run's tag: a sweep's trials share CPUs (jobs/sweep.trial_env)

    root = storage.working_root(cfg.run.root)
    root.mkdir(parents=True, exist_ok=True)
    uri = tracking.setup(root, cfg.run.experiment)
    commit = tracking.git_commit()
    results: list[StageResult] = []
    parent = tracking.start_parent(f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                   {"lawm.config_hash": config_hash(cfg), "lawm.git_commit": commit,
                                    "mlflow.source.git.commit": commit, "lawm.stages": ",".join(selected),
                                    "lawm.root": tracking.root_name(cfg.run.root),
                                    "lawm.torch_threads": str(torch.get_num_threads()),
                                    **({"lawm.sweep": cfg.run.sweep} if cfg.run.sweep else {})})
    try:
        for stage in (s for s in stages if s.name in selected):
            results.append(_run_one(cfg, stage, root, force, commit, uri, parent.info.run_id, echo))
    except BaseException:
        tracking.end_run("FAILED")
        raise
    tracking.end_run()
    return results


def _run_one(cfg: Any, stage: Stage, root: Path, force: bool, commit: str, uri: str, parent_id: str,
             echo: Callable[[str], None]) -> StageResult:
    section = getattr(cfg, stage.section or stage.name)
    upstream = {}
    for name in stage.inputs(cfg):
        done = marker(root, name)
        if done is None:
            raise RuntimeError(f"stage `{stage.name}` needs `{name}` first: run it (or include it in --stages)")
        upstream[name] = done
    chash = config_hash(section, cfg.run.seed)
    # An upstream stage's identity is the execution that made its outputs (its MLflow run id), not only its settings:
    # a forced or changed upstream stage makes every dependant rerun instead of trusting outputs made from the old.
    ihash = config_hash({n: (m["config_hash"], m["inputs_hash"], m["mlflow_run_id"]) for n, m in upstream.items()},
                        stage.external(section))
    identity = provenance.digest(chash, ihash, *([f"version {stage.version}"] if stage.version else []))
    out_dir = root / stage.name
    done = marker(root, stage.name)
    if not force and provenance.record_matches(done, identity):
        echo(f"[{stage.name}] skipped: outputs in {out_dir} match this config and inputs ({chash})")
        tracking.set_tag(f"lawm.skipped.{stage.name}", done.get("mlflow_run_id", ""))
        return StageResult(stage.name, "skipped", done["outputs"])
    pending_path = out_dir / "_pending.json"
    storage.pull(pending_path)
    keep = stage.resumable and not force and provenance.matches(pending_path, identity)
    if keep:
        storage.pull(out_dir)  # what the unfinished attempt left, wherever it ran
    else:
        storage.remove(out_dir)
    for name in upstream:
        storage.pull(root / name)
    provenance.record(pending_path, identity, config_hash=chash, inputs_hash=ihash)
    storage.remove(out_dir / "_stage.json")
    storage.push(pending_path)

    echo(f"[{stage.name}] running → {out_dir}")
    run = tracking.start_stage(stage.name, to_dict(section), {
        "lawm.config_hash": chash, "lawm.inputs_hash": ihash, "lawm.git_commit": commit,
        "mlflow.source.git.commit": commit, "lawm.output_dir": str(out_dir)},
        system_metrics=stage.name.startswith("train_"))
    tracking.log_stage_fields(cfg, stage=stage.name, upstream=list(upstream))
    if stage.name not in ("generate", "ingest", "simulate", "ingest_sim"):  # stages that read the clips
        tracking.log_clip_tables({"clips/wild": root / "ingest" / "clips.parquet",
                                  **{f"clips/{d}": root / "ingest_sim" / d / "clips.parquet" for d in ("nav", "manip")}})
    ctx = StageContext(name=stage.name, out_dir=out_dir, root=root, inputs=upstream, seed=cfg.run.seed,
                       tracking_uri=uri, mlflow_run_id=run.info.run_id, log_metrics=tracking.log_metrics,
                       log_artifact=tracking.log_artifact)
    t0 = time.perf_counter()
    try:
        outputs = stage.run(section, ctx) or {}
    except BaseException as err:
        tracking.set_tag("lawm.error", f"{err.__class__.__name__}: {err}"[:5000])
        tracking.end_run("FAILED")
        echo(f"[{stage.name}] failed: {err.__class__.__name__}: {err}")
        try:
            storage.push(out_dir)  # a resumable stage's progress, for a rerun on any node
        except Exception as push_err:  # noqa: BLE001 - the stage's own error is the one to raise
            echo(f"[{stage.name}] could not push its partial outputs: {push_err}")
        raise
    seconds = time.perf_counter() - t0
    tracking.log_metrics({"stage_seconds": seconds, **outputs.get("metrics", {})})
    record = {"hash": identity, "stage": stage.name, "config_hash": chash, "inputs_hash": ihash, "outputs": outputs,
              "mlflow_run_id": run.info.run_id, "parent_run_id": parent_id, "git_commit": commit,
              "seconds": seconds, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    storage.push(out_dir)
    atomic_write_json(out_dir / "_stage.json", record)
    storage.push(out_dir / "_stage.json")  # last: the store holds every output before it says the stage is done
    tracking.log_artifact(out_dir / "_stage.json")
    tracking.end_run()
    storage.remove(pending_path)
    echo(f"[{stage.name}] done in {seconds:.1f}s")
    return StageResult(stage.name, "ran", outputs, seconds)
