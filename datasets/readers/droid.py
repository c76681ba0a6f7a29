"""DROID raw episodes to MP4 + sidecar + manifest.

Assumed layout (DROID raw release, as we know it; not checked against a download here):
    <episode>/trajectory.h5
    <episode>/recordings/MP4/<camera serial>.mp4      ("*-stereo.mp4" side-by-side files are skipped)
trajectory.h5 holds one row per control step at `control_hz` (DROID: 15 Hz):
    observation/robot_state/cartesian_position (T, 6)  x, y, z, roll, pitch, yaw of the end effector
    observation/robot_state/gripper_position   (T,)    0 open .. 1 closed
    action/gripper_position                    (T,)    optional: commanded gripper, else the observed one
    action/cartesian_position                  (T, 6)  optional: commanded pose, carried as `target_pose`
Video frame i (at i / video fps) takes the nearest control step. The videos are linked (or copied) beside the
sidecars, not re-encoded. Sidecar per frame: `ee_pos` (3), `cartesian_position` (6), `gripper`, `action`
(dx, dy, dz, gripper) = the end effector's move from frame i to i+1 plus the gripper command, as sim_manip.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lawm.config import require
from lawm.data.video import VideoError, probe
from lawm_datasets.readers.common import EpisodeError, ReaderResult, finish, split_for, write_sidecar


@dataclass
class DroidReadConfig:
    control_hz: float = 15.0
    val_fraction: float = 0.1
    copy_videos: bool = False  # False: symlink the MP4s beside their sidecars
    max_length_mismatch: float = 1.0  # seconds allowed between video and trajectory durations

    def validate(self) -> None:
        require(self.control_hz > 0, "control_hz", "must be > 0")
        require(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")


def read_trajectory(path: Path) -> dict[str, np.ndarray]:
    """The arrays this reader uses from trajectory.h5; EpisodeError names what is wrong."""
    import h5py

    need = ("observation/robot_state/cartesian_position", "observation/robot_state/gripper_position")
    try:
        with h5py.File(path, "r") as f:
            for key in need:
                if key not in f:
                    raise EpisodeError(f"{path}: missing dataset {key}")
            out = {"cartesian": np.asarray(f[need[0]][()], np.float64),
                   "gripper": np.asarray(f[need[1]][()], np.float64).reshape(-1)}
            if "action/gripper_position" in f:
                out["gripper_cmd"] = np.asarray(f["action/gripper_position"][()], np.float64).reshape(-1)
            if "action/cartesian_position" in f:
                out["target"] = np.asarray(f["action/cartesian_position"][()], np.float64)
    except EpisodeError:
        raise
    except Exception as err:  # not HDF5, truncated, wrong types
        raise EpisodeError(f"{path}: unreadable trajectory.h5 ({err.__class__.__name__}: {err})") from None
    t = out["cartesian"].shape[0]
    if out["cartesian"].ndim != 2 or out["cartesian"].shape[1] < 3 or t < 2:
        raise EpisodeError(f"{path}: cartesian_position must be (T >= 2, 6), got {out['cartesian'].shape}")
    for key, val in out.items():
        if val.shape[0] != t:
            raise EpisodeError(f"{path}: {key} has {val.shape[0]} rows, cartesian_position {t}")
        if not np.isfinite(val).all():
            raise EpisodeError(f"{path}: {key} holds NaN or inf")
    return out


def frame_labels(traj: dict[str, np.ndarray], n_frames: int, fps: float, control_hz: float) -> dict:
    """Per-frame labels: nearest control step for each video frame."""
    steps = traj["cartesian"].shape[0]
    k = np.minimum(np.round(np.arange(n_frames) / fps * control_hz).astype(int), steps - 1)
    cart = traj["cartesian"][k]
    ee = cart[:, :3]
    action = np.zeros((n_frames, 4))
    action[:-1, :3] = np.diff(ee, axis=0)
    action[:-1, 3] = traj.get("gripper_cmd", traj["gripper"])[k][:-1]
    labels = {"ee_pos": ee, "cartesian_position": cart, "gripper": traj["gripper"][k], "action": action,
              "step": k.astype(np.float64)}
    if "target" in traj:
        labels["target_pose"] = traj["target"][k]
    return labels


def _place(video: Path, dest: Path, copy: bool) -> None:
    if dest.exists() or dest.is_symlink():
        dest.unlink()
    if copy:
        shutil.copyfile(video, dest)
    else:
        os.symlink(video, dest)


def convert_droid(src: str | Path, out_dir: str | Path, cfg: DroidReadConfig | None = None) -> ReaderResult:
    """Convert every episode (a folder holding trajectory.h5) under `src`. A bad episode or camera file is
    recorded in `failures` (and failures.parquet); the others still convert."""
    cfg = cfg or DroidReadConfig()
    cfg.validate()
    root, out = Path(src).absolute(), Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    rows, failures = [], []
    for h5 in sorted(root.rglob("trajectory.h5")):
        folder = h5.parent
        name = re.sub(r"[^A-Za-z0-9_-]", "_", str(folder.relative_to(root)) if folder != root else folder.name)
        try:
            traj = read_trajectory(h5)
            videos = sorted(v for v in (folder / "recordings" / "MP4").glob("*.mp4")
                            if not v.stem.endswith("-stereo"))
            if not videos:
                raise EpisodeError(f"{folder}: no recordings/MP4/*.mp4")
        except EpisodeError as err:
            failures.append({"episode": name, "path": str(h5), "error": str(err)})
            continue
        split = split_for(name, cfg.val_fraction)
        for video in videos:
            try:
                info = probe(video)
                steps_s, video_s = traj["cartesian"].shape[0] / cfg.control_hz, info.frames / info.fps
                if abs(steps_s - video_s) > cfg.max_length_mismatch:
                    raise EpisodeError(f"{video}: video lasts {video_s:.2f}s, trajectory {steps_s:.2f}s")
                labels = frame_labels(traj, info.frames, info.fps, cfg.control_hz)
                dest = out / f"droid_{name}_{re.sub(r'[^A-Za-z0-9_-]', '_', video.stem)}.mp4"
                _place(video, dest, cfg.copy_videos)
                write_sidecar(dest, np.arange(info.frames) / info.fps, labels)
            except (EpisodeError, VideoError, OSError) as err:
                failures.append({"episode": name, "path": str(video), "error": str(err)})
                continue
            rows.append({"path": str(dest), "split": split, "episode": name, "domain": "droid",
                         "camera": video.stem, "source": str(video), "fps": info.fps, "n_frames": info.frames})
    return finish(out, rows, failures)
