"""Stage `eval_planning`: plan with the latent action world model through the controller, against baselines.

Inputs: `encode` (held-out feature shards of the simulated domains, the encoder config), `simulate` (the size the
episodes were rendered at), `train_lam` (the latent action world model), `train_controller` (real action -> latent),
`train_wm_action` (the action-conditioned world model, the upper bound). Per domain:

- **manip offline** (jepa-wms DROID protocol): 4-frame windows at 4 fps cut from held-out episodes; context = the
  first frame's representation, goal = the last frame's; CEM 300 samples / 10 elites / 15 iterations over 3 actions,
  L2 cost between the predicted and goal representation at the horizon. `planning/manip/delta_xyz` = mean over
  windows of |Σ a_plan - Σ a_true|_1 over xyz, in metres; `_zero_action`, `_random_action`, `_action_wm` beside it.
- **nav offline** (NWM protocol): 4 context frames, goal = the representation 8 steps after the last one; 120
  candidates, each ONE (v, ω) held for the 8 steps (the unicycle's straight line; ω = 0 is straight), one CEM
  iteration; cost L1 or L2 in representation space. Planned commands are integrated with the simulator's own
  kinematics (`sim_nav.unicycle`) from the true pose at the last context frame; ATE/RPE (`lawm.planning.metrics`)
  over the H + 1 poses from that start, positions in waypoint units: `waypoint_spacing` metres, by default the
  distance driven at full speed in one step (max_v / 4 Hz = 0.2 m; RECON's is 0.25 m).
- **closed loop** in pybullet (`NavEnv`, `ManipEnv`): plan, execute the first action, render, encode with the
  frozen encoder the encode stage used (built from its recorded config), replan, until the goal radius or the step
  limit. `planning/<domain>/closed_loop_success` and `…/closed_loop_final_distance` (metres), same baselines.

Actions: real units in the planner, multiplied before entering a model by the scale that model was trained with
(recorded in its checkpoint: `trained_action_scale`), exactly as training did (`batch_actions`); one action per
representation transition (tubelet 1; `check_tubelet`). The world models run on `device`, the search on the CPU.

Outputs (in `<run.root>/eval_planning/`): `nav/trajectories.parquet` (episode, step, gt_x, gt_y, gt_yaw, plan_x,
plan_y, plan_yaw: positions in waypoint units, yaw in radians, in the frame of the start pose),
`nav/episodes.parquet` (episode, ate, rpe, + baselines), `manip/episodes.parquet`, `closed_loop.parquet`,
`metrics.json`, `nav_trajectories.png`, `table.png`. Every file is written to a temporary name and renamed; the
runner writes `_stage.json` last, so a crash leaves nothing a rerun would trust.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from lawm.checkpoint import load_model, load_model_with_extra
from lawm.config import require
from lawm.files import atomic_write_json, atomic_write_parquet
from lawm.data.features import feature_dataset
from lawm.planning.cem import CEMConfig
from lawm.planning.closed_loop import run_closed_loop
from lawm.planning.metrics import ate, delta_xyz, rpe
from lawm.planning.planner import ActionWMRollout, ControllerRollout, Planner, check_tubelet
from lawm.models.encoders import EncoderConfig
from lawm.training.objectives import trained_action_scale
from lawm_datasets import sim_manip, sim_nav
from lawm_datasets.simcommon import CONTROL_HZ

from jobs.runner import StageContext

DOMAINS = ("nav", "manip")


@dataclass(kw_only=True)
class ManipPlanningConfig:
    episodes: int = 64  # 4-frame windows (the paper: 64 from 16 validation videos)
    frames: int = 4  # context frame + 3 actions + goal frame
    cem: CEMConfig = field(default_factory=lambda: CEMConfig(samples=300, elites=10, iterations=15, horizon=3))
    cost: Literal["l1", "l2"] = "l2"  # the paper's DROID cost is L2

    def validate(self) -> None:
        require(self.episodes >= 1, "episodes", "must be >= 1")
        require(self.frames == self.cem.horizon + 1, "frames", "must be cem.horizon + 1 (goal at the horizon)")
        self.cem.validate()


@dataclass(kw_only=True)
class NavPlanningConfig:
    episodes: int = 64
    context: int = 4  # NWM: 4 context frames
    cem: CEMConfig = field(default_factory=lambda: CEMConfig(samples=120, elites=5, iterations=1, horizon=8,
                                                             hold=True))
    cost: Literal["l1", "l2"] = "l2"  # the paper does not state its RECON cost; NWM uses LPIPS on pixels
    waypoint_spacing: float = 0.0  # metres per waypoint unit; 0 = nav_env.max_v / 4 Hz (0.2 m by default)

    def validate(self) -> None:
        require(self.episodes >= 1, "episodes", "must be >= 1")
        require(self.context >= 1, "context", "must be >= 1")
        require(self.waypoint_spacing >= 0, "waypoint_spacing", "must be >= 0 (0 = max_v / 4 Hz)")
        self.cem.validate()


@dataclass(kw_only=True)
class ClosedLoopConfig:
    episodes: int = 8  # per domain and method
    nav_max_steps: int = 24  # three times the goal's 8 steps
    manip_max_steps: int = 9  # three times the goal's 3 steps
    nav_goal_radius: float = 0.5  # metres (NavEnv's default)
    manip_goal_radius: float = 0.03  # metres (ManipEnv's default)
    nav_cem: CEMConfig = field(default_factory=lambda: CEMConfig(samples=120, elites=5, iterations=1, horizon=8,
                                                                 hold=True))
    manip_cem: CEMConfig = field(default_factory=lambda: CEMConfig(samples=300, elites=10, iterations=15,
                                                                   horizon=3))
    seed_offset: int = 1000  # env seeds: seed_offset + episode (the training episodes used small seeds)

    def validate(self) -> None:
        require(self.episodes >= 0, "episodes", "must be >= 0 (0 = no closed loop)")
        require(self.nav_max_steps >= 1 and self.manip_max_steps >= 1, "nav_max_steps", "step limits must be >= 1")
        require(self.nav_goal_radius > 0 and self.manip_goal_radius > 0, "nav_goal_radius", "radii must be > 0")
        self.nav_cem.validate()
        self.manip_cem.validate()


@dataclass(kw_only=True)
class EvalPlanningConfig:
    domains: list[str] = field(default_factory=lambda: list(DOMAINS))
    controller: Literal["cross_attention", "mlp"] = "cross_attention"  # the paper plans through cross-attention
    manip: ManipPlanningConfig = field(default_factory=ManipPlanningConfig)
    nav: NavPlanningConfig = field(default_factory=NavPlanningConfig)
    closed_loop: ClosedLoopConfig = field(default_factory=ClosedLoopConfig)
    # the simulators for the closed loop: must match `simulate` (width/height are checked against its manifest)
    nav_env: sim_nav.NavConfig = field(default_factory=sim_nav.NavConfig)
    manip_env: sim_manip.ManipConfig = field(default_factory=sim_manip.ManipConfig)
    # live frames are first scaled (short side, bilinear, centre crop) to the size ingest_sim gave the training clips:
    # on the demo's val episodes this cut the live-vs-cached feature gap (L1) from 0.017 to 0.010 for manip
    # (one step of motion changes features by 0.010) and 0.0100 to 0.0080 for nav; the rest is H.264 in ingest
    frame_size: int = 64  # = ingest_sim.size; 0 = hand frames to the encoder as rendered
    threads: int = 0  # torch intra-op threads while planning; 0 = leave torch's setting
    # where the world models run (the CEM search and the simulators stay on the CPU); auto = cuda when there is one
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def validate(self) -> None:
        require(set(self.domains) <= set(DOMAINS), "domains", f"must be among {list(DOMAINS)}")
        require(self.threads >= 0, "threads", "must be >= 0")
        require(self.device != "cuda" or torch.cuda.is_available(), "device", "cuda asked for, none is visible")
        require(self.frame_size >= 0, "frame_size", "must be >= 0 (0 = as rendered)")
        self.manip.validate()
        self.nav.validate()
        self.closed_loop.validate()


# ------------------------------------------------------------------------------------------------ data


def held_out_episodes(features: str, domain: str) -> list[dict]:
    """The held-out (val) clips of a domain stitched back into contiguous episodes: {"feats" (T, N, D),
    "labels": {name: (T, ...)}, "source": str}. Clips overlap (stride < length); the first clip to cover a frame
    gives it. A gap (a clip that failed ingest) splits the episode."""
    try:
        samples = list(feature_dataset(features, split="val", shuffle=0))
    except FileNotFoundError:
        raise ValueError(f"eval_planning: no held-out (val) {domain} clips in {features}; "
                         f"set simulate.{domain}.val_fraction > 0") from None
    by_source: dict[str, list[dict]] = {}
    for s in samples:
        by_source.setdefault(s["meta"]["sid"], []).append(s)
    episodes = []
    for sid, clips in sorted(by_source.items()):
        frames: dict[int, tuple[torch.Tensor, dict]] = {}
        for clip in sorted(clips, key=lambda c: c["meta"]["start"]):
            first = int(round(clip["meta"]["start"] * clip["meta"]["fps"]))
            for i in range(clip["feats"].shape[0]):
                if first + i not in frames:
                    frames[first + i] = (clip["feats"][i], {k: v[i] for k, v in clip["labels"].items()})
        idx = sorted(frames)
        runs, start = [], 0
        for j in range(1, len(idx) + 1):
            if j == len(idx) or idx[j] != idx[j - 1] + 1:
                runs.append(idx[start:j])
                start = j
        for run in runs:
            labels = {k: torch.stack([frames[i][1][k] for i in run]) for k in frames[run[0]][1]}
            episodes.append({"feats": torch.stack([frames[i][0] for i in run]), "labels": labels, "source": sid})
    return episodes


def windows(episodes: list[dict], length: int, count: int, seed: int) -> list[tuple[int, int]]:
    """`count` (episode, start) windows of `length` frames, non-overlapping within an episode, drawn without
    replacement (seeded) and spread over episodes: every episode gives one before any gives two."""
    per = [[(e, s) for s in range(0, len(ep["feats"]) - length + 1, length)] for e, ep in enumerate(episodes)]
    rng = np.random.default_rng(seed)
    for p in per:
        rng.shuffle(p)
    order = []
    for rank in range(max((len(p) for p in per), default=0)):  # round robin over episodes
        order += [p[rank] for p in per if rank < len(p)]
    if not order:
        raise ValueError(f"eval_planning: no held-out episode has {length} frames")
    return order[:count]


# ------------------------------------------------------------------------------------------------ models


@dataclass
class DomainModels:
    latent: Planner
    action_wm: Planner
    low: torch.Tensor
    high: torch.Tensor


def planning_device(cfg: EvalPlanningConfig) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device


def _planners(ctx: StageContext, cfg: EvalPlanningConfig, *, domain: str, cem: CEMConfig, cost: str,
              device: str) -> DomainModels:
    ctrl_key = f"{domain}_controller_{cfg.controller}"
    lam = load_model(ctx.upstream("train_lam", "model"), device)
    ctrl_path = ctx.upstream("train_controller", ctrl_key)
    wm_path = ctx.upstream("train_wm_action", f"{domain}_action_wm")
    (controller, ctrl_extra), (action_wm, wm_extra) = (load_model_with_extra(p, device) for p in (ctrl_path, wm_path))
    ctrl_scale, wm_scale = trained_action_scale(ctrl_extra, ctrl_path), trained_action_scale(wm_extra, wm_path)
    if domain == "nav":
        env = cfg.nav_env
        low, high = torch.tensor([-env.max_v, -env.max_w]), torch.tensor([env.max_v, env.max_w])
    else:
        d = cfg.manip_env.max_delta
        low, high = torch.tensor([-d, -d, -d, 0.0]), torch.tensor([d, d, d, 1.0])
    if controller.cfg.action_dim != len(low) or action_wm.cfg.action_dim != len(low):
        raise ValueError(f"eval_planning: {domain} models take {controller.cfg.action_dim}-d actions, "
                         f"the simulator's are {len(low)}-d")
    return DomainModels(
        latent=Planner(rollout=ControllerRollout(lam, controller, ctrl_scale), cem=cem, low=low, high=high, cost=cost,
                       device=device),
        action_wm=Planner(rollout=ActionWMRollout(action_wm, wm_scale), cem=cem, low=low, high=high, cost=cost,
                          device=device),
        low=low, high=high)


def _gen(*key: int) -> torch.Generator:
    """The same candidates for every method on one episode (common random numbers), independent across episodes."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


# ------------------------------------------------------------------------------------------------ offline


def eval_manip(cfg: EvalPlanningConfig, models: DomainModels, episodes: list[dict], seed: int) -> pd.DataFrame:
    m = cfg.manip
    rows = []
    rng = np.random.default_rng([seed, 7])
    for k, (e, s) in enumerate(windows(episodes, m.frames, m.episodes, seed)):
        ep = episodes[e]
        feats, true = ep["feats"][s : s + m.frames], ep["labels"]["action"][s : s + m.frames - 1].numpy()
        row = {"episode": k, "source": ep["source"], "start": s}
        for name, planner in (("latent", models.latent), ("action_wm", models.action_wm)):
            t0 = time.perf_counter()
            res = planner.plan(feats[:1], torch.zeros(0, len(models.low)), feats[-1], generator=_gen(seed, k))
            row[name] = delta_xyz(res.actions.numpy(), true)
            row[f"{name}_seconds"] = time.perf_counter() - t0
        row["zero_action"] = delta_xyz(np.zeros_like(true), true)
        rand = rng.uniform(models.low.numpy(), models.high.numpy(), size=true.shape)
        row["random_action"] = delta_xyz(rand, true)
        row["true_sum_x"], row["true_sum_y"], row["true_sum_z"] = true[:, :3].sum(0)
        rows.append(row)
    return pd.DataFrame(rows)


def integrate(start: np.ndarray, commands: np.ndarray) -> np.ndarray:
    """Poses (H + 1, 3) from `start` under each (v, ω) held for one 4 Hz step: the simulator's own kinematics."""
    poses = [np.asarray(start, dtype=np.float64)]
    for v, w in commands:
        poses.append(sim_nav.unicycle(poses[-1], float(v), float(w), 1.0 / CONTROL_HZ))
    return np.stack(poses)


def to_start_frame(poses: np.ndarray, start: np.ndarray, spacing: float) -> np.ndarray:
    """Poses expressed in the frame of `start`, positions in waypoint units, yaw wrapped to [-π, π)."""
    d = poses[:, :2] - start[:2]
    c, s = np.cos(start[2]), np.sin(start[2])
    xy = np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]], axis=1) / spacing
    yaw = (poses[:, 2] - start[2] + np.pi) % (2 * np.pi) - np.pi
    return np.concatenate([xy, yaw[:, None]], axis=1)


def eval_nav(cfg: EvalPlanningConfig, models: DomainModels, episodes: list[dict], seed: int, spacing: float
             ) -> tuple[pd.DataFrame, pd.DataFrame]:
    n, h = cfg.nav, cfg.nav.cem.horizon
    episode_rows, traj_rows = [], []
    for k, (e, s) in enumerate(windows(episodes, n.context + h, n.episodes, seed)):
        ep = episodes[e]
        c = s + n.context - 1  # the last context frame: where planning starts
        feats, actions = ep["feats"], ep["labels"]["action"]
        pose = ep["labels"]["pose"].numpy().astype(np.float64)
        gt = to_start_frame(pose[c : c + h + 1], pose[c], spacing)
        row = {"episode": k, "source": ep["source"], "start": s}
        plans = {}
        for name, planner in (("latent", models.latent), ("action_wm", models.action_wm)):
            t0 = time.perf_counter()
            res = planner.plan(feats[s : c + 1], actions[s:c].float(), feats[c + h], generator=_gen(seed, k))
            plans[name] = to_start_frame(integrate(pose[c], res.actions.numpy()), pose[c], spacing)
            row[f"{name}_seconds"] = time.perf_counter() - t0
        plans["zero_action"] = np.zeros_like(gt)
        for name, plan in plans.items():
            prefix = "" if name == "latent" else f"_{name}"
            row[f"ate{prefix}"], row[f"rpe{prefix}"] = ate(plan, gt), rpe(plan, gt)  # already in waypoint units
        episode_rows.append(row)
        for step in range(h + 1):
            traj_rows.append({"episode": k, "step": step, "gt_x": gt[step, 0], "gt_y": gt[step, 1],
                              "gt_yaw": gt[step, 2], "plan_x": plans["latent"][step, 0],
                              "plan_y": plans["latent"][step, 1], "plan_yaw": plans["latent"][step, 2],
                              "action_wm_x": plans["action_wm"][step, 0], "action_wm_y": plans["action_wm"][step, 1]})
    return pd.DataFrame(episode_rows), pd.DataFrame(traj_rows)


# ------------------------------------------------------------------------------------------------ closed loop


def _encoder(ctx: StageContext):
    from pipelines.encode import make_encoder  # the encode stage's own builder: the same (seeded) weights

    enc = ctx.inputs["encode"]["outputs"]
    return make_encoder(EncoderConfig(**enc["encoder"])).eval()


def as_ingested(frame: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> what ingest makes of it: short side scaled to `size` (bilinear, as its ffmpeg scale
    filter), centre crop, 8-bit levels. H.264 is not imitated."""
    if size <= 0:
        return frame
    import torch.nn.functional as F

    h, w = frame.shape[-2:]
    nh, nw = (size, max(size, round(w * size / h))) if h <= w else (max(size, round(h * size / w)), size)
    x = F.interpolate(frame[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return (x[:, top : top + size, left : left + size].clamp(0, 1) * 255).round() / 255


def eval_closed_loop(cfg: EvalPlanningConfig, domain: str, models: DomainModels, encoder, seed: int) -> pd.DataFrame:
    cl = cfg.closed_loop
    if domain == "nav":
        env = sim_nav.NavEnv(cfg.nav_env, max_steps=cl.nav_max_steps, goal_radius=cl.nav_goal_radius)
        context = cfg.nav.context
    else:
        env = sim_manip.ManipEnv(cfg.manip_env, max_steps=cl.manip_max_steps, goal_radius=cl.manip_goal_radius)
        context = 1  # jepa-wms plans from the current frame alone

    @torch.no_grad()
    def encode(frame: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).float().div(255.0)
        return encoder(as_ingested(x, cfg.frame_size)[None, None])[0, 0].float()  # (N, D)

    observe = lambda obs, info: encode(obs)  # noqa: E731
    goal = lambda info: encode(info["goal_image"])  # noqa: E731
    rng = np.random.default_rng([seed, 11])

    def planned(planner: Planner, key: tuple):
        gen = _gen(*key)

        def plan(states, actions, goal_s):
            ctx_a = torch.tensor(np.array(actions), dtype=torch.float32).reshape(len(actions), len(models.low))
            return planner.plan(torch.stack(states), ctx_a, goal_s, generator=gen).actions[0].numpy()
        return plan

    rows = []
    try:
        for k in range(cl.episodes):
            env_seed = cl.seed_offset + k
            methods = {"latent": planned(models.latent, (seed, env_seed, 1)),
                       "action_wm": planned(models.action_wm, (seed, env_seed, 1)),
                       "zero_action": lambda s, a, g: np.zeros(len(models.low)),  # manip: hold still, open
                       "random_action": lambda s, a, g: rng.uniform(models.low.numpy(), models.high.numpy())}
            for name, plan in methods.items():
                t0 = time.perf_counter()
                res = run_closed_loop(env, seed=env_seed, observe=observe, goal=goal, plan=plan, context=context)
                rows.append({"domain": domain, "method": name, "episode": k, "env_seed": env_seed,
                             "success": res["success"], "final_distance": res["final_distance"],
                             "initial_distance": res["initial_distance"], "steps": res["steps"],
                             "seconds": time.perf_counter() - t0})
    finally:
        env.close()
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ outputs


def check_env(manifest: str | Path, domain: str, env_cfg) -> None:
    """The closed loop's simulator must render what the models were trained on (the `simulate` manifest): same
    frame size and, for manip, the same camera (a manifest from before `view` existed was the exterior view)."""
    table = pd.read_parquet(manifest)
    w, h = int(table["width"].iloc[0]), int(table["height"].iloc[0])
    if (env_cfg.width, env_cfg.height) != (w, h):
        raise ValueError(f"eval_planning.{domain}_env: {env_cfg.width}x{env_cfg.height} differs from the simulated "
                         f"training episodes' {w}x{h}; set it to match simulate.{domain}")
    if domain == "manip":
        cam0 = table[table["camera"] == 0] if "camera" in table else table
        view = str(cam0["view"].iloc[0]) if "view" in cam0 else "exterior"
        if env_cfg.view != view:
            raise ValueError(f"eval_planning.manip_env.view: {env_cfg.view!r} differs from the simulated training "
                             f"episodes' {view!r}; set it to match simulate.manip.view")


def nav_picture(traj: pd.DataFrame, png: Path, spacing: float, count: int = 6) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = sorted(traj["episode"].unique())[:count]
    fig, axes = plt.subplots(1, max(1, len(eps)), figsize=(2.6 * max(1, len(eps)), 2.8), squeeze=False)
    for ax, e in zip(axes[0], eps):
        t = traj[traj["episode"] == e]
        ax.plot(t["gt_x"], t["gt_y"], "k.-", label="true")
        ax.plot(t["plan_x"], t["plan_y"], "r.-", label="latent + controller")
        ax.plot(t["action_wm_x"], t["action_wm_y"], "b.--", label="action WM", alpha=0.7)
        ax.plot([0], [0], "go")
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_title(f"episode {e}", fontsize=8)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"nav: planned vs true paths (start frame, units of {spacing:g} m)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def table_picture(metrics: dict, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(k for k in metrics if k.startswith("planning/") and not k.endswith("_seconds"))
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(keys) + 0.8))
    ax.axis("off")
    ax.table(cellText=[[k, f"{metrics[k]:.4g}"] for k in keys], colLabels=["metric", "value"], loc="center",
             cellLoc="left", colWidths=[0.8, 0.2])
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def run_eval_planning(cfg: EvalPlanningConfig, ctx: StageContext) -> dict:
    cfg.validate()
    enc = ctx.inputs["encode"]["outputs"]
    check_tubelet(int(enc["tubelet"]))
    before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    metrics: dict[str, float] = {}
    out: dict = {}
    closed: list[pd.DataFrame] = []
    spacing = cfg.nav.waypoint_spacing or cfg.nav_env.max_v / CONTROL_HZ
    device = planning_device(cfg)
    try:
        encoder = _encoder(ctx) if cfg.closed_loop.episodes else None
        for domain in cfg.domains:
            features = enc.get(f"{domain}_features")
            if not features:
                raise ValueError(f"eval_planning: no {domain} features from `encode` (simulate.{domain} disabled?); "
                                 f"drop {domain} from eval_planning.domains")
            check_env(ctx.upstream("simulate", f"{domain}_manifest"), domain,
                      cfg.nav_env if domain == "nav" else cfg.manip_env)
            episodes = held_out_episodes(features, domain)
            section = cfg.nav if domain == "nav" else cfg.manip
            models = _planners(ctx, cfg, domain=domain, cem=section.cem, cost=section.cost, device=device)
            key = f"planning/{domain}"
            if domain == "manip":
                table = eval_manip(cfg, models, episodes, ctx.seed)
                for col, name in (("latent", ""), ("zero_action", "_zero_action"),
                                  ("random_action", "_random_action"), ("action_wm", "_action_wm")):
                    metrics[f"{key}/delta_xyz{name}"] = float(table[col].mean())
                out["manip_episodes"] = str(atomic_write_parquet(ctx.out_dir / "manip" / "episodes.parquet", table))
                head = "delta_xyz"
            else:
                table, traj = eval_nav(cfg, models, episodes, ctx.seed, spacing)
                for col in ("ate", "rpe", "ate_zero_action", "rpe_zero_action", "ate_action_wm", "rpe_action_wm"):
                    metrics[f"{key}/{col}"] = float(table[col].mean())
                out["nav_episodes"] = str(atomic_write_parquet(ctx.out_dir / "nav" / "episodes.parquet", table))
                out["nav_trajectories"] = str(atomic_write_parquet(ctx.out_dir / "nav" / "trajectories.parquet", traj))
                ctx.log_artifact(nav_picture(traj, ctx.out_dir / "nav_trajectories.png", spacing), "plots")
                head = "ate"
            ours = metrics[f"{key}/{head}"]
            # issue 13's planning targets: within 1.3x of the action WM, >= 1.5x better than zero action
            metrics[f"{key}/{head}_vs_action_wm"] = ours / max(metrics[f"{key}/{head}_action_wm"], 1e-12)
            metrics[f"{key}/{head}_zero_over_ours"] = metrics[f"{key}/{head}_zero_action"] / max(ours, 1e-12)
            metrics[f"{key}/seconds_per_episode"] = float(table["latent_seconds"].mean())
            metrics[f"{key}/episodes"] = float(len(table))
            if cfg.closed_loop.episodes:
                cem = cfg.closed_loop.nav_cem if domain == "nav" else cfg.closed_loop.manip_cem
                cl_models = dataclasses.replace(models, latent=dataclasses.replace(models.latent, cem=cem),
                                                action_wm=dataclasses.replace(models.action_wm, cem=cem))
                loop = eval_closed_loop(cfg, domain, cl_models, encoder, ctx.seed)
                closed.append(loop)
                for method, grp in loop.groupby("method"):
                    suffix = "" if method == "latent" else f"_{method}"
                    metrics[f"{key}/closed_loop_success{suffix}"] = float(grp["success"].mean())
                    metrics[f"{key}/closed_loop_final_distance{suffix}"] = float(grp["final_distance"].mean())
    finally:
        torch.set_num_threads(before)
    if closed:
        out["closed_loop"] = str(atomic_write_parquet(ctx.out_dir / "closed_loop.parquet",
                                                     pd.concat(closed, ignore_index=True)))
    bad = [k for k, v in metrics.items() if not np.isfinite(v)]
    if bad:
        raise ValueError(f"eval_planning: non-finite metrics {bad}")
    metrics["planning/nav/waypoint_spacing_m"] = float(spacing)
    atomic_write_json(ctx.out_dir / "metrics.json", dict(sorted(metrics.items())))
    ctx.log_artifact(table_picture(metrics, ctx.out_dir / "table.png"), "plots")
    for path in ctx.out_dir.rglob("*.parquet"):
        ctx.log_artifact(path, f"tables/{path.parent.name}" if path.parent != ctx.out_dir else "tables")
    return {**out, "metrics_file": str(ctx.out_dir / "metrics.json"), "metrics": metrics,
            "device": device}
