"""Stage `eval_planning` end to end through the runner (real MLflow sqlite store, real parquet, real pybullet),
on a small hand-built upstream: feature shards of held-out episodes, tiny models, the simulate manifests.
Checks the metrics and tables (ATE/RPE recomputable from trajectories.parquet), the one-line errors on bad input
with nothing left that a rerun would trust, and the rerun after the fix."""
from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lawm.checkpoint import load_checkpoint, load_model, save_model
from lawm.config import from_dict, to_dict
from lawm.models.action_wm import ActionWMConfig, ActionWorldModel
from lawm.models.controllers import Controller, ControllerConfig
from lawm.models.encoders import EncoderConfig
from lawm.models.lam import LAMConfig, LatentActionWorldModel
from lawm.planning.metrics import ate, rpe

from jobs.config import PipelineConfig
from jobs.runner import run_pipeline
from jobs.stages import STAGES

GRID, PATCH, SIZE = 4, 8, 32
DIM = 3 * PATCH * PATCH
UPSTREAM = ("encode", "simulate", "ingest_sim", "train_lam", "train_controller", "train_wm_action")


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _episode_labels(domain: str, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    from lawm_datasets.sim_nav import unicycle

    if domain == "manip":
        return {"action": np.concatenate([rng.uniform(-0.04, 0.04, (n, 3)), rng.uniform(0, 1, (n, 1))], 1)}
    action = np.stack([rng.uniform(0, 0.8, n), rng.uniform(-1.2, 1.2, n)], 1)
    pose = [np.array([0.5, -0.2, 0.3])]
    for v, w in action[:-1]:
        pose.append(unicycle(pose[-1], v, w, 0.25))
    return {"action": action, "pose": np.stack(pose)}


def _features(folder: Path, domain: str, episodes: int, frames: int, clip: int = 8, stride: int = 4) -> Path:
    """Held-out clips as the encode stage writes them: overlapping 8-frame clips of each episode."""
    rng = np.random.default_rng(len(domain))
    folder.mkdir(parents=True)
    with tarfile.open(folder / "val-000000.tar", "w") as tar:
        for e in range(episodes):
            feats = rng.normal(0, 1, (frames, GRID * GRID, DIM)).astype(np.float16)
            labels = _episode_labels(domain, frames, rng)
            sid = f"{domain}{e:03d}"
            for index, first in enumerate(range(0, frames - clip + 1, stride)):
                key = f"{sid}_{index:06d}"
                meta = {"key": key, "sid": sid, "clip_index": index, "start": first / 4.0, "fps": 4.0,
                        "split": "val", "encoder": {"dtype": "float16"}}
                buf = io.BytesIO()
                np.savez(buf, **{k: v[first : first + clip].astype(np.float32) for k, v in labels.items()})
                _add(tar, f"{key}.feat.npy", _npy(feats[first : first + clip]))
                _add(tar, f"{key}.json", json.dumps(meta).encode())
                _add(tar, f"{key}.labels.npz", buf.getvalue())
    return folder


def _marker(root: Path, stage: str, outputs: dict) -> None:
    (root / stage).mkdir(parents=True, exist_ok=True)
    (root / stage / "_stage.json").write_text(json.dumps({"stage": stage, "config_hash": stage, "inputs_hash": "x",
                                                          "mlflow_run_id": "",
                                                          "outputs": outputs}))


@pytest.fixture
def upstream(tmp_path):
    """A run root holding every stage eval_planning reads, as finished stages."""
    torch.manual_seed(0)
    root, data = tmp_path / "run", tmp_path / "data"
    enc = EncoderConfig(kind="patch", image_size=SIZE, patch_size=PATCH)
    _marker(root, "encode", {"nav_features": str(_features(data / "nav", "nav", 2, 12)),
                             "manip_features": str(_features(data / "manip", "manip", 2, 12)),
                             "dim": DIM, "grid_h": GRID, "grid_w": GRID, "tubelet": 1, "encoder": to_dict(enc)})
    manifests = {}
    for domain in ("nav", "manip"):
        manifests[f"{domain}_manifest"] = str(data / f"{domain}.parquet")
        pd.DataFrame([{"path": "x.mp4", "width": SIZE, "height": SIZE}]).to_parquet(data / f"{domain}.parquet")
    _marker(root, "simulate", manifests)
    _marker(root, "ingest_sim", {})
    lam = LatentActionWorldModel(LAMConfig(feat_dim=DIM, grid_h=GRID, grid_w=GRID, latent_dim=16))
    _marker(root, "train_lam", {"model": str(save_model(data / "lam.pt", lam))})
    ctrls, wms = {}, {}
    for domain, adim, scale in (("nav", 2, 1), ("manip", 4, 25.0)):  # an int scale is a scale too
        ctrl = Controller(ControllerConfig(action_dim=adim, latent_dim=16, feat_dim=DIM, grid_h=GRID, grid_w=GRID,
                                           width=32, depth=1, heads=4))
        ctrls[f"{domain}_controller_cross_attention"] = str(save_model(data / f"{domain}_ctrl.pt", ctrl,
                                                                       {"action_scale": scale}))
        wm = ActionWorldModel(ActionWMConfig(feat_dim=DIM, grid_h=GRID, grid_w=GRID, action_dim=adim))
        wms[f"{domain}_action_wm"] = str(save_model(data / f"{domain}_awm.pt", wm, {"action_scale": scale}))
    _marker(root, "train_controller", ctrls)
    _marker(root, "train_wm_action", wms)
    return root


def _config(root: Path, **section) -> PipelineConfig:
    small = {"samples": 6, "elites": 2, "iterations": 2}
    ep = {"domains": ["nav", "manip"], "threads": 1, "device": "cpu",
          "manip": {"episodes": 3, "cem": {**small, "horizon": 3}},
          "nav": {"episodes": 3, "cem": {**small, "horizon": 8, "hold": True}},
          "closed_loop": {"episodes": 1, "nav_max_steps": 2, "manip_max_steps": 2,
                          "nav_cem": {**small, "horizon": 8, "hold": True}, "manip_cem": {**small, "horizon": 3}},
          "nav_env": {"width": SIZE, "height": SIZE}, "manip_env": {"width": SIZE, "height": SIZE}}
    for key, value in section.items():
        ep[key] = {**ep.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict(PipelineConfig, {"run": {"root": str(root), "experiment": "plan-test"}, "eval_planning": ep})


def test_eval_planning_stage_writes_recomputable_tables(upstream):
    root = upstream
    # bad input first: simulator images that differ from the training episodes' -> one line, nothing trusted
    with pytest.raises(ValueError, match=r"nav_env: 64x64 differs .* 32x32") as err:
        run_pipeline(_config(root, nav_env={"width": 64, "height": 64}), STAGES, ["eval_planning"],
                     echo=lambda m: None)
    assert "\n" not in str(err.value)
    assert not (root / "eval_planning" / "_stage.json").exists()

    results = run_pipeline(_config(root), STAGES, ["eval_planning"], echo=lambda m: None)
    assert [r.status for r in results] == ["ran"] and results[0].outputs["device"] == "cpu"
    out = root / "eval_planning"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("planning/manip/delta_xyz", "planning/manip/delta_xyz_zero_action",
                "planning/manip/delta_xyz_random_action", "planning/manip/delta_xyz_action_wm",
                "planning/nav/ate", "planning/nav/rpe", "planning/nav/ate_zero_action", "planning/nav/rpe_action_wm",
                "planning/nav/closed_loop_success", "planning/manip/closed_loop_final_distance_action_wm",
                "planning/nav/closed_loop_final_distance_zero_action"):
        assert math.isfinite(metrics[key]), key
    assert metrics["planning/nav/waypoint_spacing_m"] == pytest.approx(0.8 / 4.0)

    traj = pd.read_parquet(out / "nav" / "trajectories.parquet")
    episodes = pd.read_parquet(out / "nav" / "episodes.parquet")
    assert {"episode", "step", "gt_x", "gt_y", "gt_yaw", "plan_x", "plan_y", "plan_yaw"} <= set(traj.columns)
    # 3 asked, 2 held-out episodes of 12 frames hold one 12-frame window each: what exists is used, and counted
    assert len(episodes) == 2 and len(traj) == 2 * 9 and metrics["planning/nav/episodes"] == 2
    for e, t in traj.groupby("episode"):  # anyone can recompute the metric from the table
        gt, plan = t[["gt_x", "gt_y", "gt_yaw"]].to_numpy(), t[["plan_x", "plan_y", "plan_yaw"]].to_numpy()
        row = episodes[episodes["episode"] == e].iloc[0]
        assert row["ate"] == pytest.approx(ate(plan, gt)) and row["rpe"] == pytest.approx(rpe(plan, gt))
        assert row["ate_zero_action"] == pytest.approx(ate(np.zeros_like(gt), gt))
        assert np.allclose(gt[0], 0) and np.allclose(plan[0], 0)  # both start at the start pose
    assert episodes["ate"].mean() == pytest.approx(metrics["planning/nav/ate"])
    manip = pd.read_parquet(out / "manip" / "episodes.parquet")
    true_l1 = manip[["true_sum_x", "true_sum_y", "true_sum_z"]].abs().sum(1)
    assert np.allclose(manip["zero_action"], true_l1)  # zero action: |Σ a_true|_1
    loop = pd.read_parquet(out / "closed_loop.parquet")
    assert set(loop["method"]) == {"latent", "action_wm", "zero_action", "random_action"}
    assert (loop["steps"] <= 2).all() and set(loop["domain"]) == {"nav", "manip"}
    assert (out / "nav_trajectories.png").stat().st_size > 0 and (out / "table.png").stat().st_size > 0

    # the same config again is skipped
    again = run_pipeline(_config(root), STAGES, ["eval_planning"], echo=lambda m: None)
    assert [r.status for r in again] == ["skipped"]


def test_eval_planning_refuses_bad_inputs(upstream, monkeypatch):
    root = upstream
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(Exception, match="cuda asked for, none is visible"):  # before any work
        _config(root, device="cuda")
    marker = json.loads((root / "encode" / "_stage.json").read_text())
    marker["outputs"]["tubelet"] = 2
    (root / "encode" / "_stage.json").write_text(json.dumps(marker))
    with pytest.raises(ValueError, match="tubelet 1"):
        run_pipeline(_config(root), STAGES, ["eval_planning"], echo=lambda m: None)
    marker["outputs"]["tubelet"] = 1
    for shard in Path(marker["outputs"]["nav_features"]).glob("*.tar"):
        shard.rename(shard.with_name("train-000000.tar"))  # no held-out nav clips
    (root / "encode" / "_stage.json").write_text(json.dumps(marker))
    with pytest.raises(ValueError, match="no held-out \\(val\\) nav clips"):
        run_pipeline(_config(root), STAGES, ["eval_planning"], echo=lambda m: None)
    assert not (root / "eval_planning" / "_stage.json").exists()
    # a controller checkpoint that does not say which action scale it was trained with is refused, not guessed
    for shard in Path(marker["outputs"]["nav_features"]).glob("*.tar"):
        shard.rename(shard.with_name("val-000000.tar"))
    ctrl_path = json.loads((root / "train_controller" / "_stage.json").read_text())["outputs"][
        "nav_controller_cross_attention"]
    payload = load_checkpoint(ctrl_path)
    save_model(ctrl_path, load_model(ctrl_path), extra={k: v for k, v in payload["extra"].items()
                                                        if k != "action_scale"})
    with pytest.raises(ValueError, match="nav_ctrl.pt does not record the action scale"):
        run_pipeline(_config(root), STAGES, ["eval_planning"], echo=lambda m: None)
    save_model(ctrl_path, load_model(ctrl_path), extra={"action_scale": -2})
    with pytest.raises(ValueError, match="-2 is not a positive number"):
        run_pipeline(_config(root), STAGES, ["eval_planning"], echo=lambda m: None)
    with pytest.raises(Exception, match="elites"):
        _config(root, manip={"cem": {"samples": 2, "elites": 3, "iterations": 1, "horizon": 3}})


def test_closed_loop_env_must_match_the_simulated_episodes(tmp_path):
    """The closed loop renders with eval_planning's env configs: a frame size or manip camera other than the one
    the models were trained on is refused, naming the setting to change; a manifest without `view` is exterior."""
    from jobs.eval_planning import check_env
    from lawm_datasets import sim_manip, sim_nav

    manifest = tmp_path / "manip.parquet"
    pd.DataFrame({"width": [96, 96], "height": [96, 96], "camera": [0, 1],
                  "view": ["wrist", "exterior"]}).to_parquet(manifest)
    check_env(manifest, "manip", sim_manip.ManipConfig(width=96, height=96, view="wrist"))
    with pytest.raises(ValueError, match="simulate.manip.view"):
        check_env(manifest, "manip", sim_manip.ManipConfig(width=96, height=96))
    with pytest.raises(ValueError, match="differs from the simulated training episodes' 96x96"):
        check_env(manifest, "manip", sim_manip.ManipConfig(width=64, height=64, view="wrist"))
    pd.DataFrame({"width": [96], "height": [96], "camera": [0]}).to_parquet(manifest)
    check_env(manifest, "manip", sim_manip.ManipConfig(width=96, height=96))
    with pytest.raises(ValueError, match="simulate.manip.view"):
        check_env(manifest, "manip", sim_manip.ManipConfig(width=96, height=96, view="wrist"))
    nav = tmp_path / "nav.parquet"
    pd.DataFrame({"width": [96], "height": [96]}).to_parquet(nav)
    check_env(nav, "nav", sim_nav.NavConfig(width=96, height=96))
