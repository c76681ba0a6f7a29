"""Simulators: actions explain the motion, determinism, files and manifests, the gym-style envs."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lawm.config import from_dict
from lawm.data.video import probe
from lawm_datasets import sim_manip, sim_nav
from lawm_datasets.simulate import SimulateConfig, run_simulate

NAV = sim_nav.NavConfig(steps=24, width=48, height=48)
MANIP = sim_manip.ManipConfig(steps=16, width=48, height=48)
# Navigation: outside collisions the pose after a step is the exact arc of the logged (v, ω); float32 storage
# and float64 integration agree within 1e-4 m / rad per step and 1e-3 m over a whole collision-free episode.
NAV_STEP_TOL, NAV_EPISODE_TOL = 1e-4, 1e-3
# Manipulation: IK + position control track the logged Cartesian delta within 3 mm per 4 Hz step while the hand
# touches nothing (`contact` = 0); pushing or pressing on something may hold it back (measured: up to ~5 cm).
MANIP_TOL = 3e-3


@pytest.fixture(scope="module")
def nav_episodes():
    return {seed: sim_nav.run_episode(NAV, seed) for seed in (1, 2, 3, 4)}


def test_nav_commands_integrate_to_poses(nav_episodes):
    free_episodes = 0
    for frames, lab in nav_episodes.values():
        assert len(frames) == NAV.steps + 1 and frames[0].shape == (48, 48, 3)
        act, pose, hit = lab["action"].astype(np.float32), lab["pose"].astype(np.float32), lab["collided"]
        assert np.all(act[-1] == 0)
        for i in range(NAV.steps):
            if hit[i]:
                continue
            pred = sim_nav.unicycle(pose[i].astype(np.float64), act[i, 0], act[i, 1], 0.25)
            err = pred - pose[i + 1]
            err[2] = (err[2] + np.pi) % (2 * np.pi) - np.pi
            assert np.abs(err).max() < NAV_STEP_TOL, (i, err)
        if not hit.any():
            free_episodes += 1
            p = pose[0].astype(np.float64)
            for i in range(NAV.steps):
                p = sim_nav.unicycle(p, act[i, 0], act[i, 1], 0.25)
            assert np.abs(p[:2] - pose[-1, :2]).max() < NAV_EPISODE_TOL
    # exploration really moves, turns and (somewhere) bumps into things
    acts = np.concatenate([lab["action"] for _, lab in nav_episodes.values()])
    assert acts[:, 0].max() > 0.3 and np.abs(acts[:, 1]).max() > 0.4 and acts[:, 0].min() <= 0.05
    assert 0 < sum(lab["collided"].sum() for _, lab in nav_episodes.values())
    assert free_episodes >= 1  # seeds chosen so that the open-loop check runs


def test_nav_collision_stops_short():
    world = sim_nav.NavWorld(NAV)
    try:
        world.build(5)
        bumped = False
        for _ in range(60):  # drive straight until the room stops us
            before = world.pose.copy()
            bumped = world.apply(0.8, 0.0)
            if bumped:
                break
        assert bumped
        moved = np.linalg.norm(world.pose[:2] - before[:2])
        assert moved < 0.8 * 0.25 - 1e-9  # less than the commanded arc
    finally:
        world.close()


def test_nav_same_seed_same_episode_different_seed_differs(nav_episodes):
    frames, lab = sim_nav.run_episode(NAV, 1)
    ref_frames, ref = nav_episodes[1]
    for key in ("action", "pose", "collided"):
        assert lab[key].astype(np.float32).tobytes() == ref[key].astype(np.float32).tobytes()
    assert np.array_equal(np.stack(frames), np.stack(ref_frames))
    assert not np.allclose(nav_episodes[2][1]["pose"], ref["pose"])


@pytest.fixture(scope="module")
def manip_episode():
    return sim_manip.run_episode(MANIP, 7)


def test_manip_end_effector_follows_delta(manip_episode):
    views, lab = manip_episode
    assert len(views) == 1 and len(views[0]) == MANIP.steps + 1
    act, ee = lab["action"].astype(np.float32), lab["ee_pos"].astype(np.float32)
    err = np.linalg.norm(np.diff(ee, axis=0) - act[:-1, :3], axis=1)
    free = lab["contact"][:-1] == 0
    assert free.mean() > 0.5 and err[free].max() < MANIP_TOL, err
    assert np.median(err) < MANIP_TOL and err.max() < 0.06
    assert np.linalg.norm(act[:-1, :3], axis=1).mean() > 0.01  # it does move
    assert np.all(act[-1] == 0) and lab["gripper"].shape == (MANIP.steps + 1,)
    assert np.all((ee >= sim_manip.WORKSPACE_LO - 0.01) & (ee <= sim_manip.WORKSPACE_HI + 0.01))


def test_manip_same_seed_same_episode(manip_episode):
    views, lab = sim_manip.run_episode(MANIP, 7)
    for key in ("action", "ee_pos", "gripper"):
        assert lab[key].astype(np.float32).tobytes() == manip_episode[1][key].astype(np.float32).tobytes()
    other = sim_manip.run_episode(MANIP, 8)[1]
    assert not np.allclose(other["ee_pos"], lab["ee_pos"])


def test_manip_wrist_camera_rides_with_the_hand():
    """The wrist view: same scene and labels as the exterior view for a seed; still when the hand is, and a hand
    move changes far more of it than of the exterior view (the whole view shifts, not a few pixels of arm)."""
    wrist_cfg = sim_manip.ManipConfig(steps=4, width=48, height=48, view="wrist")
    views, lab = sim_manip.run_episode(wrist_cfg, 5)
    ext_lab = sim_manip.run_episode(sim_manip.ManipConfig(steps=4, width=48, height=48), 5)[1]
    assert lab["ee_pos"].astype(np.float32).tobytes() == ext_lab["ee_pos"].astype(np.float32).tobytes()
    changed = {}
    for view in ("wrist", "exterior"):
        world = sim_manip.ManipWorld(sim_manip.ManipConfig(width=48, height=48, view=view))
        try:
            world.build(11)
            world.apply(np.zeros(4))  # let anything still moving settle
            still = world.render()[0]
            world.apply(np.zeros(4))
            assert np.abs(world.render()[0].astype(int) - still).mean() < 1.0, view
            world.apply(np.array([0.04, 0.04, 0.0, 0.0]))
            changed[view] = (np.abs(world.render()[0].astype(int) - still).sum(-1) > 30).mean()
        finally:
            world.close()
    assert changed["wrist"] > 0.3 and changed["wrist"] > 3 * changed["exterior"], changed
    with pytest.raises(ValueError, match="view"):
        from_dict(sim_manip.ManipConfig, {"view": "top"})


def test_run_simulate_writes_both_manifests(tmp_path):
    cfg = from_dict(SimulateConfig, {
        "use_ray": False,
        "nav": {"episodes": 2, "steps": 6, "width": 32, "height": 32, "val_fraction": 0.5},
        "manip": {"episodes": 2, "steps": 4, "width": 32, "height": 32, "cameras": 2, "val_fraction": 0.5}})
    result = run_simulate(cfg, tmp_path)
    assert result["nav_episodes"] == 2 and result["manip_videos"] == 4
    for key, actions in (("nav_manifest", 2), ("manip_manifest", 4)):
        table = pd.read_parquet(result[key])
        assert set(table["split"]) == {"train", "val"}
        for path in table["path"]:
            lab = np.load(path.replace(".mp4", ".labels.npz"))
            assert probe(path).frames == lab["t"].shape[0] == lab["action"].shape[0]
            assert lab["action"].shape[1] == actions and lab["action"].dtype == np.float32
    # a manipulation episode's two cameras share the split
    manip = pd.read_parquet(result["manip_manifest"])
    assert manip.groupby("episode")["split"].nunique().max() == 1


def test_run_simulate_with_ray_matches_inline(tmp_path):
    section = {"episodes": 2, "steps": 4, "width": 32, "height": 32}
    inline = run_simulate(from_dict(SimulateConfig, {"use_ray": False, "nav": section,
                                                     "manip": {"enabled": False}}), tmp_path / "a")
    remote = run_simulate(from_dict(SimulateConfig, {"use_ray": True, "num_cpus": 2, "nav": section,
                                                     "manip": {"enabled": False}}), tmp_path / "b")
    assert remote["manip_manifest"] is None
    for a, b in zip(pd.read_parquet(inline["nav_manifest"])["path"], pd.read_parquet(remote["nav_manifest"])["path"]):
        la, lb = np.load(a.replace(".mp4", ".labels.npz")), np.load(b.replace(".mp4", ".labels.npz"))
        assert la["pose"].tobytes() == lb["pose"].tobytes() and la["action"].tobytes() == lb["action"].tobytes()


def test_envs_reset_and_step():
    env = sim_nav.NavEnv(NAV, max_steps=3)
    try:
        obs, info = env.reset(seed=3)
        assert obs.shape == info["goal_image"].shape == (48, 48, 3)
        assert info["distance"] > 0 and not np.array_equal(obs, info["goal_image"])
        obs2, reward, terminated, truncated, info2 = env.step([0.5, 0.2])
        assert obs2.shape == obs.shape and reward == -info2["distance"] and not truncated
        for _ in range(2):
            *_, truncated, _ = env.step([0.0, 0.0])
        assert truncated
    finally:
        env.close()
    menv = sim_manip.ManipEnv(MANIP, max_steps=2)
    try:
        obs, info = menv.reset(seed=3)
        start = info["ee_pos"]
        assert obs.shape == info["goal_image"].shape == (48, 48, 3)
        obs2, reward, terminated, truncated, info2 = menv.step([0.02, 0.0, 0.0, 0.0])
        assert abs(info2["ee_pos"][0] - start[0] - info2["applied_action"][0]) < MANIP_TOL
    finally:
        menv.close()
