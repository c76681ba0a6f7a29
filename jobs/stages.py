"""The stage registry, in pipeline order. Later stages join the list; each is one function of
(config section, context) → outputs, written into its own folder."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from pipelines.ingest import IngestConfig, run_ingest
from pipelines.sources import discover

from lawm_datasets.simulate import SimulateConfig, run_simulate

from pipelines.encode import EncodeConfig, run_encode

from jobs.eval_planning import run_eval_planning
from jobs.eval_stages import run_eval_leakage, run_eval_probe, run_eval_transfer
from jobs.report import report_inputs, run_report
from jobs.generate import run_generate
from jobs.plots import trajectories
from jobs.runner import Stage, StageContext
from jobs.train_stages import run_train_controller, run_train_decoder, run_train_lam, run_train_wm_action


def _ingest_input(cfg: IngestConfig, ctx: StageContext) -> str:
    return cfg.input or ctx.upstream("generate", "manifest")


def run_ingest_stage(cfg: IngestConfig, ctx: StageContext) -> dict:
    cfg = dataclasses.replace(cfg, input=_ingest_input(cfg, ctx))
    summary = run_ingest(cfg, ctx.out_dir)
    ctx.log_artifact(ctx.out_dir / "summary.json")
    ctx.log_artifact(ctx.out_dir / "failures.parquet")
    metrics = {k: summary[k] for k in ("inputs", "sources_ok", "sources_failed", "clips", "hours_in", "hours_out",
                                       "frames_out_per_s")}
    return {"shards": str(ctx.out_dir / "shards"), "clips": str(ctx.out_dir / "clips.parquet"),
            "summary": str(ctx.out_dir / "summary.json"), "metrics": metrics}


def _input_identity(cfg: IngestConfig):
    """What ingest reads from outside the pipeline: every listed file's path, size and mtime, and what a manifest
    says of it (segment, split, extra columns). Stat only: a listed FIFO must not block here."""
    if not cfg.input:
        return None
    sources = discover(cfg.input, tuple(cfg.extensions))
    files = [Path(s.path) for s in sources]
    stat = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) if p.exists() else (str(p), -1, -1) for p in files]
    return {"input": cfg.input, "files": stat, "listing": [s.to_dict() for s in sources]}


def run_simulate_stage(cfg: SimulateConfig, ctx: StageContext) -> dict:
    outputs = run_simulate(cfg, ctx.out_dir)
    manifests = {k.split("_")[0]: v for k, v in outputs.items() if k.endswith("_manifest") and v}
    if manifests:
        ctx.log_artifact(trajectories(manifests, ctx.out_dir / "trajectories.png"), "plots")
    counts = {k: v for k, v in outputs.items() if not k.endswith("_manifest") and isinstance(v, (int, float))}
    return {**{k: v for k, v in outputs.items() if k.endswith("_manifest")}, "metrics": counts}


@dataclass(kw_only=True)
class IngestSimConfig(IngestConfig):
    """`ingest_sim`: the same ingest, with defaults for the controller's clips: 8 frames at the simulators' 4 fps."""
    clip_frames: int = 8
    stride: int = 4
    size: int = 64


def run_ingest_sim_stage(cfg: IngestSimConfig, ctx: StageContext) -> dict:
    """Shards the simulated, action-labelled episodes: one shard set per domain (nav, manip)."""
    outputs: dict = {"metrics": {}}
    for domain in ("nav", "manip"):
        manifest = ctx.upstream("simulate", f"{domain}_manifest")
        if manifest is None:
            continue
        summary = run_ingest(dataclasses.replace(cfg, input=manifest), ctx.out_dir / domain)
        outputs[f"{domain}_shards"] = str(ctx.out_dir / domain / "shards")
        outputs["metrics"].update({f"{domain}_clips": summary["clips"], f"{domain}_failed": summary["sources_failed"]})
    return outputs


def run_encode_stage(cfg: EncodeConfig, ctx: StageContext) -> dict:
    """Features for the in-the-wild clips and, when simulated data exists, for each action-labelled domain."""
    sets = {"wild": ctx.upstream("ingest", "shards")}
    for domain in ("nav", "manip"):
        if "ingest_sim" in ctx.inputs and ctx.inputs["ingest_sim"]["outputs"].get(f"{domain}_shards"):
            sets[domain] = ctx.upstream("ingest_sim", f"{domain}_shards")
    outputs: dict = {"metrics": {}}
    for name, shards in sets.items():
        summary = run_encode(cfg, shards, ctx.out_dir / name)
        outputs["features" if name == "wild" else f"{name}_features"] = summary["features"]
        outputs["metrics"].update({f"{name}_clips_per_s": summary["metrics"]["clips_per_s"],
                                   **{f"{name}_{split}_clips": n for split, n in summary["counts"].items()}})
        outputs.update({k: summary[k] for k in ("dim", "grid_h", "grid_w", "tubelet", "encoder")})
    return outputs


STAGES: list[Stage] = [
    Stage("generate", run_generate),
    Stage("ingest", run_ingest_stage, inputs=lambda c: [] if c.ingest.input else ["generate"],
          external=_input_identity, resumable=True, reads=lambda c: [c.input] if c.input else []),
    Stage("simulate", run_simulate_stage),
    Stage("ingest_sim", run_ingest_sim_stage, inputs=lambda c: ["simulate"], resumable=True),
    Stage("encode", run_encode_stage, inputs=lambda c: ["ingest", "ingest_sim"], resumable=True),
    Stage("train_lam", run_train_lam, inputs=lambda c: ["encode"], resumable=True),
    Stage("train_decoder", run_train_decoder, inputs=lambda c: ["ingest", "encode", "train_lam"], resumable=True),
    # version 1: the checkpoints record the action scale they were trained with (eval_planning reads it there)
    Stage("train_controller", run_train_controller, inputs=lambda c: ["encode", "train_lam"], resumable=True,
          version=1),
    Stage("train_wm_action", run_train_wm_action, inputs=lambda c: ["encode"], resumable=True, version=1),
    Stage("eval_leakage", run_eval_leakage, inputs=lambda c: ["encode", "train_lam"] + (
        ["ingest", "train_decoder"] if c.eval_leakage.pixels else [])),
    Stage("eval_transfer", run_eval_transfer, inputs=lambda c: ["encode", "train_lam", "ingest"] + (
        ["train_decoder"] if c.eval_transfer.gif_pairs else []) + ([] if c.ingest.input else ["generate"])),
    Stage("eval_probe", run_eval_probe, inputs=lambda c: ["encode", "train_lam"]),
    Stage("eval_planning", run_eval_planning,  # after eval_probe, before report
          inputs=lambda c: ["encode", "simulate", "ingest_sim", "train_lam", "train_controller", "train_wm_action"]),
    Stage("report", run_report, inputs=lambda c: report_inputs(STAGE_NAMES)),
]

STAGE_NAMES = [s.name for s in STAGES]

# Stages renamed since users started typing them: the old name still works in --stages, in a config's `stages:` list,
# as a config section and in overrides. `train_wm` trained the whole latent action model (IDM + regulariser + world
# model), not only its inner world model `wm`; its outputs now live in <root>/train_lam/.
RENAMED_STAGES = {"train_wm": "train_lam"}


def canonical_stages(names: list[str]) -> list[str]:
    return [RENAMED_STAGES.get(n, n) for n in names]
