"""Training stages: train_lam, train_decoder, train_controller, train_wm_action — each a Ray Train fit (jobs/ray_train.py)
of a lawm objective, reading only its declared upstream outputs (feature shards, model checkpoints)."""
from __future__ import annotations

import dataclasses
import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lawm.checkpoint import load_checkpoint, load_model
from lawm.config import require
from lawm.data.clips import shard_urls
from lawm.files import atomic_write_json
from lawm.models.action_wm import ActionWMConfig
from lawm.models.controllers import ControllerConfig
from lawm.models.decoder import DecoderConfig
from lawm.models.encoders import EncoderConfig, build_encoder
from lawm.models.lam import LAMConfig
from lawm.training.builders import build_action_wm, build_controllers, build_decoder, build_lam
from lawm.training.loop import TrainConfig

from jobs.plots import plot_progress
from jobs.runner import StageContext
from jobs.ray_train import ScalingSection, TrainJob, fit, fit_all, fits_at_once

DOMAINS = ("nav", "manip")


@dataclass(kw_only=True)
class TrainLAMConfig:
    model: LAMConfig = field(default_factory=LAMConfig)  # feat_dim and grid come from the encode stage
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    window: int = 0  # steps per training sample, a random run inside each clip; 0 = the whole clip
    run_name: str = "lam"  # rerunning with the same name resumes from the last checkpoint


@dataclass(kw_only=True)
class TrainDecoderConfig:
    model: DecoderConfig = field(default_factory=DecoderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run_name: str = "decoder"


@dataclass(kw_only=True)
class ActionData:
    domains: list[str] = field(default_factory=lambda: list(DOMAINS))
    # per-domain scale bringing actions near unit size (Panda deltas are centimetres)
    action_scale: dict[str, float] = field(default_factory=lambda: {"nav": 1.0, "manip": 25.0})

    def validate(self) -> None:
        require(set(self.domains) <= set(DOMAINS), "domains", f"must be among {list(DOMAINS)}")
        require(set(self.domains) <= set(self.action_scale), "action_scale", "needs a scale for every domain")
        require(all(v > 0 for v in self.action_scale.values()), "action_scale", "must be positive")


@dataclass(kw_only=True)
class TrainControllerConfig:
    controller: ControllerConfig = field(default_factory=ControllerConfig)  # sizes; both kinds are trained
    data: ActionData = field(default_factory=ActionData)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run_name: str = "controller"


@dataclass(kw_only=True)
class TrainWMActionConfig:
    model: ActionWMConfig = field(default_factory=ActionWMConfig)
    data: ActionData = field(default_factory=ActionData)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run_name: str = "action_wm"


def _encoded(ctx: StageContext) -> dict:
    return ctx.inputs["encode"]["outputs"]


def _job(ctx: StageContext, *, stage_dir: Path, name: str, build, kwargs: dict, train: TrainConfig,
         scaling: ScalingSection, shards: str | Path, kind: str, labels: bool, metric_prefix: str = "") -> TrainJob:
    stage_dir.mkdir(parents=True, exist_ok=True)
    return TrainJob(stage=name, build=build, build_kwargs=kwargs, train=train, scaling=scaling,
                    train_urls=shard_urls(shards, "train"), val_urls=_maybe_urls(shards, "val"), data_kind=kind,
                    labels=labels, out_dir=str(stage_dir), seed=ctx.seed, tracking_uri=ctx.tracking_uri,
                    mlflow_run_id=ctx.mlflow_run_id, metric_prefix=metric_prefix)


def _log_fit(ctx: StageContext, job: TrainJob, result: dict) -> dict:
    """The driver's share of a fit: its curves and exported models as artifacts of the stage's run (main thread:
    MLflow's active run is per thread)."""
    stage_dir = Path(job.out_dir)
    picture = plot_progress(stage_dir / "progress.jsonl", stage_dir / "training_curves.png", title=job.stage)
    ctx.log_artifact(picture, "plots")
    ctx.log_artifact(stage_dir / "result.json", job.stage)
    where = stage_dir.relative_to(ctx.out_dir).as_posix()  # per-domain stages: nav/models, manip/models
    for path in result["models"].values():  # the exported models, loadable with lawm.checkpoint.load_model
        ctx.log_artifact(path, "models" if where == "." else f"{where}/models")
    return result


def _maybe_urls(shards: str | Path, split: str) -> list[str]:
    try:
        return shard_urls(shards, split)
    except FileNotFoundError:
        return []


def run_train_lam(cfg: TrainLAMConfig, ctx: StageContext) -> dict:
    enc = _encoded(ctx)
    lam_cfg = dataclasses.replace(cfg.model, feat_dim=enc["dim"], grid_h=enc["grid_h"], grid_w=enc["grid_w"])
    job = _job(ctx, stage_dir=ctx.out_dir, name="train_lam", build=build_lam,
               kwargs={"lam_cfg": lam_cfg, "window": cfg.window}, train=cfg.train, scaling=cfg.scaling,
               shards=enc["features"], kind="features", labels=False)
    result = _log_fit(ctx, job, fit(job, cfg.run_name))
    return {"model": result["models"]["lam"], "checkpoint": result["checkpoint"], "metrics": result["eval"]}


def run_train_decoder(cfg: TrainDecoderConfig, ctx: StageContext) -> dict:
    enc = _encoded(ctx)
    enc_cfg = EncoderConfig(**enc["encoder"])
    dec_cfg = dataclasses.replace(cfg.model, feat_dim=enc["dim"], grid_h=enc["grid_h"], grid_w=enc["grid_w"],
                                  image_size=enc_cfg.image_size, tubelet=enc["tubelet"])
    shards = ctx.upstream("ingest", "shards")
    job = _job(ctx, stage_dir=ctx.out_dir, name="train_decoder", build=build_decoder,
               kwargs={"dec_cfg": dec_cfg, "enc_cfg": enc_cfg}, train=cfg.train, scaling=cfg.scaling,
               shards=shards, kind="clips", labels=False)
    result = _log_fit(ctx, job, fit(job, cfg.run_name))
    picture = prediction_picture(result["models"]["decoder"], ctx.upstream("train_lam", "model"), enc_cfg, shards,
                                 ctx.out_dir / "predictions.png")
    ctx.log_artifact(picture, "plots")
    return {"model": result["models"]["decoder"], "predictions": str(picture), "metrics": result["eval"]}


def prediction_picture(decoder_path: str, lam_path: str, enc_cfg: EncoderConfig, shards: str | Path, png: Path,
                       clips: int = 2) -> Path:
    """Validation clips as frames, decoded representations, and the world model's open-loop rollout from the first
    frame driven by the IDM's latents, decoded: what a person checks first."""
    import torch

    from lawm.data.clips import clip_dataset

    from jobs.plots import frame_grid

    decoder, lam, encoder = load_model(decoder_path).eval(), load_model(lam_path).eval(), build_encoder(enc_cfg)
    split = "val" if _maybe_urls(shards, "val") else "train"
    rows = {}
    with torch.no_grad():
        for i, sample in zip(range(clips), clip_dataset(shards, split=split, shuffle=0)):
            frames = encoder.resize(sample["frames"][None])
            s = encoder(frames)
            z = lam.infer_latents(s)
            rollout = torch.cat([s[:, :1], lam.rollout(s[:, :1], z)], dim=1)
            to_img = lambda x: x[0].permute(0, 2, 3, 1).numpy()  # noqa: E731
            rows[f"clip {i}: frames"] = to_img(frames)
            rows[f"clip {i}: decoded"] = to_img(decoder(s))
            rows[f"clip {i}: world model"] = to_img(decoder(rollout))
    return frame_grid(rows, png, title="world model rollouts with IDM latents (decoded)")


def action_dim(shards: str | Path) -> int:
    """The `action` width of the first labelled clip in a shard folder."""
    with tarfile.open(shard_urls(shards, "train")[0]) as tar:
        for member in tar:
            if member.name.endswith(".labels.npz"):
                with np.load(io.BytesIO(tar.extractfile(member).read())) as npz:
                    return int(npz["action"].shape[-1])
    raise ValueError(f"no action labels in {shards}")


def _per_domain(cfg, ctx: StageContext, stage: str, build, kwargs_for) -> dict:
    """One fit per domain with data, side by side when the cluster holds them (`fits_at_once`); each logs its step
    metrics into the stage's run as `<domain>/<metric>`."""
    enc = _encoded(ctx)
    jobs: dict[str, TrainJob] = {}
    for domain in cfg.data.domains:
        shards = enc.get(f"{domain}_features")
        if not shards:
            continue
        kwargs = kwargs_for(enc, domain, action_dim(shards), cfg.data.action_scale[domain])
        jobs[domain] = _job(ctx, stage_dir=ctx.out_dir / domain, name=f"{stage}_{domain}", build=build, kwargs=kwargs,
                            train=cfg.train, scaling=cfg.scaling, shards=shards, kind="features", labels=True,
                            metric_prefix=f"{domain}/")
    results = fit_all({d: (job, f"{cfg.run_name}_{d}") for d, job in jobs.items()},
                      at_once=fits_at_once(len(jobs), cfg.scaling))
    outputs: dict = {"metrics": {}}
    for domain, result in results.items():
        _log_fit(ctx, jobs[domain], result)
        outputs.update({f"{domain}_{name}": path for name, path in result["models"].items()})
        outputs["metrics"].update({f"{domain}_{k}": v for k, v in result["eval"].items()})
        outputs["metrics"][f"{domain}_fit_seconds"] = result["seconds"]
    atomic_write_json(ctx.out_dir / "summary.json", outputs)  # a crash leaves the old file or none, never half
    return outputs


def run_train_controller(cfg: TrainControllerConfig, ctx: StageContext) -> dict:
    lam_path = ctx.upstream("train_lam", "model")
    latent_dim = load_checkpoint(lam_path)["config"]["latent_dim"]

    def kwargs(enc, domain, adim, scale):
        ctrl = dataclasses.replace(cfg.controller, action_dim=adim, latent_dim=latent_dim, feat_dim=enc["dim"],
                                   grid_h=enc["grid_h"], grid_w=enc["grid_w"])
        return {"lam_path": lam_path, "ctrl_cfg": ctrl, "tubelet": enc["tubelet"], "scale": scale}

    return {**_per_domain(cfg, ctx, "train_controller", build_controllers, kwargs), "lam": lam_path}


def run_train_wm_action(cfg: TrainWMActionConfig, ctx: StageContext) -> dict:
    def kwargs(enc, domain, adim, scale):
        model = dataclasses.replace(cfg.model, feat_dim=enc["dim"], grid_h=enc["grid_h"], grid_w=enc["grid_w"],
                                    action_dim=adim)
        return {"model_cfg": model, "tubelet": enc["tubelet"], "scale": scale}

    return _per_domain(cfg, ctx, "train_wm_action", build_action_wm, kwargs)
