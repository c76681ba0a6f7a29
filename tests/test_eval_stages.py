"""The evaluation stages on a small hand-made feature set (real WebDataset tars, a real checkpoint): the keys they
log, the targets lined up with the transitions, and their errors on bad input."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lawm.checkpoint import save_model
from lawm.models.lam import LAMConfig, LatentActionWorldModel

from jobs.eval_stages import (EvalLeakageConfig, EvalProbeConfig, EvalTransferConfig, run_eval_leakage,
                              run_eval_probe, run_eval_transfer)
from jobs.runner import StageContext

T, GRID, D = 6, 2, 6


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def write_features(folder: Path, videos: dict[str, int], clips_per_video: int = 3, labelled: bool = True) -> Path:
    """Feature shards whose frame changes are a fixed linear map of the agent's, the camera's and the zoom's motion:
    a linear probe of the frame change must recover all three (R² ≈ 1) if targets and transitions line up."""
    rng = np.random.default_rng(0)
    mix = np.random.default_rng(123).normal(size=(5, GRID * GRID * D))  # the same map for every clip
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        with tarfile.open(folder / f"{split}-000000.tar", "w") as tar:
            for v in range(videos[split]):
                for c in range(clips_per_video):
                    key = f"{split}video{v}_{c:06d}"
                    motion = rng.normal(size=(T - 1, 5))  # agent (2), camera pan (2), zoom (1) per transition
                    s = np.concatenate([rng.normal(size=(1, GRID * GRID * D)),
                                        motion @ mix]).cumsum(0).reshape(T, GRID * GRID, D)
                    pos = np.zeros((T, 2, 2))
                    pos[1:, 0] = motion[:, :2].cumsum(0)
                    cam = np.concatenate([np.zeros((1, 3)), motion[:, 2:].cumsum(0)])
                    meta = {"key": key, "source_path": f"/videos/{split}{v}.mp4", "clip_index": c, "start": 2.0 * c,
                            "fps": 4.0, "frames": T, "width": 8, "encoder": {"dtype": "float32"}}
                    _member(tar, f"{key}.feat.npy", _npy(s.astype(np.float32)))
                    _member(tar, f"{key}.json", json.dumps(meta).encode())
                    if labelled:
                        _member(tar, f"{key}.labels.npz", _npz(agent_pos=pos.astype(np.float32),
                                                               camera=cam.astype(np.float32)))
    return folder


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _ctx(tmp_path: Path, name: str, features: Path, lam: Path) -> StageContext:
    inputs = {"encode": {"outputs": {"features": str(features), "tubelet": 1, "dim": D, "grid_h": GRID,
                                     "grid_w": GRID}},
              "train_lam": {"outputs": {"model": str(lam)}}}
    out = tmp_path / name
    out.mkdir()
    return StageContext(name=name, out_dir=out, root=tmp_path, inputs=inputs, seed=0)


@pytest.fixture()
def setup(tmp_path):
    features = write_features(tmp_path / "features", {"train": 6, "val": 3})
    torch.manual_seed(0)
    lam = save_model(tmp_path / "lam.pt", LatentActionWorldModel(LAMConfig(feat_dim=D, grid_h=GRID, grid_w=GRID,
                                                                            latent_dim=8)))
    return features, lam


def test_probe_stage_lines_targets_up_with_transitions(tmp_path, setup):
    features, lam = setup
    out = run_eval_probe(EvalProbeConfig(domains=["wild"]), _ctx(tmp_path, "eval_probe", features, lam))
    m = out["metrics"]
    for target in ("agent", "camera", "zoom"):
        assert m[f"probe/r2_frame_change/{target}"] > 0.99  # an off-by-one in the targets would give ≈ 0
        assert f"probe/r2/{target}" in m and f"probe/r2_shifted_z/{target}" in m
    assert m["probe/r2_shifted_z"] < 0.3  # another clip's latents say nothing about this clip's motion
    assert m["probe/train_clips"] == 18 and m["probe/val_clips"] == 9
    assert json.loads(Path(out["metrics_file"]).read_text()) == m


def test_leakage_and_transfer_stages_log_their_keys(tmp_path, setup):
    features, lam = setup
    leak = run_eval_leakage(EvalLeakageConfig(pixels=False), _ctx(tmp_path, "eval_leakage", features, lam))["metrics"]
    for key in ("error_nocut", "error_cut", "ratio", "vs_copy", "copy_cut", "error_cut_shifted_z"):
        assert np.isfinite(leak[f"leakage/{key}"])
    assert leak["leakage/cut_index"] == T // 2
    tr = run_eval_transfer(EvalTransferConfig(), _ctx(tmp_path, "eval_transfer", features, lam))["metrics"]
    assert tr["transfer/horizon_steps"] == T - 1  # 2 s at 4 fps is 8 steps; these clips hold 5 after the context
    for key in ("error", "cycle_error", "cycle_increase", "error_copy", "error_zero_z", "error_random_z",
                "error_shifted_z"):
        assert np.isfinite(tr[f"transfer/{key}"])
    assert not any(k.startswith("transfer/nav/") for k in tr)  # no navigation features given


def test_stages_fail_clearly_on_bad_input(tmp_path, setup):
    features, lam = setup
    unlabelled = write_features(tmp_path / "unlabelled", {"train": 3, "val": 2}, labelled=False)
    with pytest.raises(ValueError, match="no train clips with labels agent_pos, camera"):
        run_eval_probe(EvalProbeConfig(domains=["wild"]), _ctx(tmp_path, "p1", unlabelled, lam))
    one_video = write_features(tmp_path / "one", {"train": 2, "val": 1})
    with pytest.raises(ValueError, match="at least two videos"):
        run_eval_leakage(EvalLeakageConfig(pixels=False), _ctx(tmp_path, "l1", one_video, lam))
    broken = LatentActionWorldModel(LAMConfig(feat_dim=D, grid_h=GRID, grid_w=GRID, latent_dim=8))
    with torch.no_grad():
        broken.wm.out.bias.fill_(float("nan"))
    nan_lam = save_model(tmp_path / "nan.pt", broken)
    ctx = _ctx(tmp_path, "l2", features, nan_lam)
    with pytest.raises(ValueError, match="non-finite metrics"):
        run_eval_leakage(EvalLeakageConfig(pixels=False), ctx)
    assert not (ctx.out_dir / "metrics.json").exists()  # nothing a reader would trust
