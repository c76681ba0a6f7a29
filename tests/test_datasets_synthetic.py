"""Synthetic videos: determinism, sidecar/video agreement, counterfactual motion."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lawm.config import ConfigError, from_dict
from lawm.data.video import decode_clip, probe
from lawm_datasets import synthetic as syn


def small(**kw) -> syn.SyntheticConfig:
    base = dict(n_videos=4, seconds=2.0, fps=8, size=[64, 48], n_agents=3, seed=3, val_fraction=0.5,
                n_counterfactuals=2)
    base.update(kw)
    return from_dict(syn.SyntheticConfig, base)


def test_config_is_strict():
    with pytest.raises(ConfigError, match="size"):
        from_dict(syn.SyntheticConfig, {"size": [63, 48]})
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(syn.SyntheticConfig, {"n_video": 3})


def test_generate_writes_videos_sidecars_manifest(tmp_path):
    cfg = small()
    manifest = syn.generate(cfg, tmp_path)
    table = pd.read_parquet(manifest)
    assert list(table["split"]) == ["train", "train", "val", "val"]
    assert {"path", "split", "episode", "seed", "domain"} <= set(table.columns)
    for path in table["path"]:
        info = probe(path)
        frames = decode_clip(open(path, "rb").read())
        labels = np.load(path.replace(".mp4", ".labels.npz"))
        assert frames.shape == (cfg.n_frames, 48, 64, 3) and info.frames == cfg.n_frames
        assert labels["t"].dtype == np.float64 and labels["t"].shape == (cfg.n_frames,)
        assert np.allclose(np.diff(labels["t"]), 1 / cfg.fps)
        for key in ("agent_pos", "agent_vel", "agent_visible", "camera", "camera_vel", "action"):
            assert labels[key].shape[0] == cfg.n_frames and labels[key].dtype == np.float32
        assert labels["agent_pos"].shape == (cfg.n_frames, 3, 2)
        assert np.all(labels["agent_vel"][-1] == 0) and np.all(labels["camera_vel"][-1] == 0)
        # velocities are the per-frame displacements (agent 0 and camera exactly, up to float32)
        assert np.allclose(np.diff(labels["agent_pos"][:, 0], axis=0), labels["agent_vel"][:-1, 0], atol=1e-5)
        assert np.allclose(np.diff(labels["camera"], axis=0), labels["camera_vel"][:-1], atol=1e-5)
        assert labels["agent_visible"][:, 0].mean() > 0.9  # the main agent stays in view
    cf = pd.read_parquet(tmp_path / "counterfactuals.parquet")
    assert len(cf) == 2 and set(cf["split"]) == {"val"}


def test_same_seed_same_video_different_seed_differs():
    cfg = small()
    a = syn.make_scene(cfg, syn.video_seed(cfg, 0))
    b = syn.make_scene(cfg, syn.video_seed(cfg, 0))
    c = syn.make_scene(small(seed=4), syn.video_seed(small(seed=4), 0))
    sa, sb, sc = syn.rollout(a), syn.rollout(b), syn.rollout(c)
    assert sa["agent_vel"].tobytes() == sb["agent_vel"].tobytes()
    assert sa["agent_pos"].tobytes() == sb["agent_pos"].tobytes()
    assert np.array_equal(syn.render(a), syn.render(b))
    assert not np.allclose(sa["agent_vel"], sc["agent_vel"])


def test_counterfactual_moves_b_agent_like_a_agent():
    cfg = small(seconds=3.0)
    scene_a = syn.make_scene(cfg, 11)
    state_a = syn.rollout(scene_a)
    actions = state_a["agent_vel"][:, 0]
    frames, labels = syn.counterfactual(cfg, 22, actions)
    state_b = syn.rollout(syn.make_scene(cfg, 22))
    assert frames.shape == (cfg.n_frames, 48, 64, 3) and labels["t"].shape == (cfg.n_frames,)
    move_a = state_a["agent_pos"][:, 0] - state_a["agent_pos"][0, 0]
    move_cf = labels["agent_pos"][:, 0] - labels["agent_pos"][0, 0]
    assert np.allclose(move_cf, move_a, atol=1e-5)
    # the rest of scene B is B's own: camera, distractors, start position
    assert np.array_equal(labels["camera"], state_b["camera"].astype(np.float32))
    assert np.allclose(labels["agent_pos"][0], state_b["agent_pos"][0])
    assert np.allclose(labels["agent_pos"][:, 1:], state_b["agent_pos"][:, 1:])
    # the first frame is scene B's own first frame; later ones differ where the agent went elsewhere
    frames_b = syn.render(syn.make_scene(cfg, 22))
    assert np.array_equal(frames[0], frames_b[0])
    with pytest.raises(ValueError, match="actions must be"):
        syn.render(syn.make_scene(cfg, 22), actions[:-1])
