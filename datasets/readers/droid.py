"""DROID raw episodes to MP4 + sidecar + manifest.

Layout read (the raw release, `gs://gresearch/robotics/droid_raw`):
    <episode>/trajectory.h5
    <episode>/recordings/MP4/<camera serial>.mp4     left view of one ZED camera (read)
    <episode>/recordings/MP4/<camera serial>-stereo.mp4   left|right side by side (skipped)
    <episode>/recordings/SVO/<camera serial>.svo     raw ZED recording (needs the ZED SDK; not read)
trajectory.h5 has one row per control step, every dataset (T, ...):
    observation/robot_state/cartesian_position (T, 6)  end effector x, y, z + Euler angles (roll, pitch, yaw)
    observation/robot_state/gripper_position   (T,)    1 - width / max width: 0 open .. 1 closed
    observation/robot_state/joint_positions    (T, 7)  optional, carried as `joint_positions`
    action/gripper_position                    (T,)    optional: commanded gripper, else the observed one
    action/cartesian_position                  (T, 6)  optional: commanded pose, carried as `target_pose`
    observation/camera_type/<serial>           (T,)    optional: 0 wrist, 1 exterior ("varied"), 2 fixed
    observation/camera_extrinsics/<serial>_left (T, 6) optional: camera pose (x, y, z, Euler xyz), per frame
    observation/timestamp/cameras/<serial>_frame_received (T,)  optional: milliseconds, per frame
    observation/controller_info/movement_enabled (T,)  optional: False on steps DROID's loader can drop
Pairing: MP4 frame i is control step i. DROID records one camera grab per control step (15 Hz) and its own loader
reads frame i for step i; the rate an MP4 declares is not used to pair (DROID's SVO-to-MP4 export writes the
camera's configured rate, 60 fps, into the MP4 — see below). When frames and steps differ by at most
`max_frame_mismatch`, the first min(frames, steps) pairs are kept and the manifest's `end` stops ingest at the last
labelled frame; a larger difference is a failure. Ingest samples the video's own clock: if an MP4 declares 60 fps
for 15 Hz frames, that clock runs 4x fast (the manifest's `fps` against `step_hz` shows it; `step_time` in the
sidecar keeps the robot's clock).

Checked against droid-dataset/droid at commit 1548722f199772a43217c0d4c811c639be66e380 (read for facts only):
- docs/the-droid-dataset.md: the episode folder layout above (trajectory.h5, recordings/MP4 `*.mp4` left view and
  `*-stereo.mp4`, recordings/SVO `*.svo`, metadata_*.json).
- droid/trajectory_utils/misc.py (collect_trajectory, load_trajectory) and trajectory_writer.py: each step is
  written as {"observation": obs, "action": action_info}, nested dicts becoming HDF5 groups, one row per step;
  load_trajectory pairs step i with recording frame i (read_cameras(index=i)), reads `observation/camera_type` and
  `observation/timestamp/cameras/<serial>_frame_received`, and drops steps with movement_enabled False on request.
- droid/robot_env.py (get_observation, control_hz = 15): observation groups robot_state, timestamp/{robot_state,
  cameras, control}, camera_type, camera_extrinsics, camera_intrinsics.
- droid/franka/robot.py (get_robot_state, create_action_dict): robot_state keys cartesian_position (position +
  quat_to_euler), gripper_position (1 - width / max width), joint_positions (plural); the action dict holds
  cartesian_position, cartesian_velocity, gripper_position, joint_position, joint_velocity.
- droid/camera_utils/info.py: camera type codes 0 hand, 1 varied, 2 fixed. droid/postprocessing/parse.py: reads
  `action/joint_position`, `observation/camera_type/<serial>` and `observation/camera_extrinsics/<serial>_left`.
- droid/camera_utils/wrappers/multi_camera_wrapper.py and camera_readers/zed_camera.py: SVO files are named
  `<serial>.svo`, one grab per camera read (once per step), trajectory mode at camera_fps=60;
  postprocessing/util/svo2mp4.py exports the left view to `<serial>.mp4` at the rate the SVO reports.
  That the SVO keeps exactly the grabbed frames is ZED SDK behaviour, inferred, not in that repository.
What differed from the earlier version of this reader: frames were paired with steps by the MP4's declared rate
(wrong by 4x at a declared 60 fps), durations were compared in seconds, SVO-only episodes gave a vague error,
and camera role, extrinsics, timestamps and joint positions were not carried.
Not checked (no DROID files here; the tests use hand-made files in this layout): the rate and frame count the
released, face-blurred MP4s really declare; whether released files hold every optional key above; episodes in
the MCAP format (`trajectory_reader_mcap.py`, in other commits of that repository), which this reader does not
read.

Output `droid_<episode>_<camera>.mp4` (linked or copied, never re-encoded) + `.labels.npz`: `t` (frame times on
the video's own clock, which ingest samples), `ee_pos` (3), `cartesian_position` (6), `gripper`, `action`
(dx, dy, dz, gripper command) = the end effector's move from frame i to i+1 plus the command, as sim_manip,
`step`, `step_time` (seconds since the first frame from the camera's timestamps, else step / control_hz) and the
optional labels above. Names go through `common.safe_name`; the HDF5 file through `common.h5_dataset` (links
out of the file, external storage and virtual datasets are refused). Every bad episode or camera is a row in
`failures.parquet` with a one-line error; the others still convert.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lawm.config import require
from lawm.data.video import VideoError, probe
from lawm_datasets.readers.common import (MAX_DATASET_BYTES, EpisodeError, OutputNames, ReaderResult, finish,
                                          h5_array, h5_dataset, safe_name, split_for, write_sidecar)

CAMERA_ROLES = {0: "wrist", 1: "exterior", 2: "fixed"}  # droid/camera_utils/info.py


@dataclass(kw_only=True)
class DroidReadConfig:
    control_hz: float = 15.0  # droid/robot_env.py
    val_fraction: float = 0.1
    copy_videos: bool = False  # False: symlink the MP4s beside their sidecars
    max_frame_mismatch: int = 15  # frames vs control steps allowed to differ (1 s at 15 Hz)
    max_dataset_bytes: int = MAX_DATASET_BYTES

    def validate(self) -> None:
        require(self.control_hz > 0, "control_hz", "must be > 0")
        require(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        require(self.max_frame_mismatch >= 0, "max_frame_mismatch", "must be >= 0")
        require(self.max_dataset_bytes > 0, "max_dataset_bytes", "must be > 0")


def read_trajectory(path: Path, cameras: list[str], max_bytes: int = MAX_DATASET_BYTES) -> dict[str, np.ndarray]:
    """The arrays this reader uses from trajectory.h5 (per-camera ones keyed `<name>/<serial>`); EpisodeError
    names what is wrong."""
    import h5py

    where = str(path)
    try:
        with h5py.File(path, "r") as f:
            def get(key: str, required: bool = False) -> np.ndarray | None:
                return h5_array(f, key, where, max_bytes=max_bytes, required=required)

            out = {"cartesian": get("observation/robot_state/cartesian_position", required=True),
                   "gripper": get("observation/robot_state/gripper_position", required=True).reshape(-1)}
            optional = {"gripper_cmd": "action/gripper_position", "target": "action/cartesian_position",
                        "joints": "observation/robot_state/joint_positions",
                        "movement_enabled": "observation/controller_info/movement_enabled"}
            for cam in cameras:
                optional[f"camera_type/{cam}"] = f"observation/camera_type/{cam}"
                optional[f"extrinsics/{cam}"] = f"observation/camera_extrinsics/{cam}_left"
                optional[f"received_ms/{cam}"] = f"observation/timestamp/cameras/{cam}_frame_received"
            for name, key in optional.items():
                value = get(key)
                if value is not None:
                    out[name] = value.reshape(-1) if value.ndim == 2 and value.shape[1] == 1 else value
    except EpisodeError:
        raise
    except Exception as err:  # not HDF5, truncated, wrong types
        raise EpisodeError(f"{path}: unreadable trajectory.h5 ({err.__class__.__name__}: {err})") from None
    t = out["cartesian"].shape[0]
    if out["cartesian"].ndim != 2 or out["cartesian"].shape[1] < 3 or t < 2:
        raise EpisodeError(f"{path}: cartesian_position must be (T >= 2, 6), got {out['cartesian'].shape}")
    for key, val in out.items():
        if val.ndim == 0 or val.shape[0] != t:
            raise EpisodeError(f"{path}: {key} has shape {val.shape}, cartesian_position {t} rows")
        if not np.isfinite(val).all():
            raise EpisodeError(f"{path}: {key} holds NaN or inf")
    return out


def frame_labels(traj: dict[str, np.ndarray], camera: str, n: int, control_hz: float) -> dict[str, np.ndarray]:
    """Labels of video frames 0..n-1, frame i being control step i."""
    cart = traj["cartesian"][:n]
    ee = cart[:, :3]
    action = np.zeros((n, 4))
    action[:-1, :3] = np.diff(ee, axis=0)
    action[:-1, 3] = traj.get("gripper_cmd", traj["gripper"])[: n - 1]
    received = traj.get(f"received_ms/{camera}")
    step_time = (received[:n] - received[0]) / 1000.0 if received is not None else np.arange(n) / control_hz
    labels = {"ee_pos": ee, "cartesian_position": cart, "gripper": traj["gripper"][:n], "action": action,
              "step": np.arange(n, dtype=np.float64), "step_time": step_time}
    for name, key in (("target_pose", "target"), ("joint_positions", "joints"),
                      ("movement_enabled", "movement_enabled"), ("camera_extrinsics", f"extrinsics/{camera}")):
        if key in traj:
            labels[name] = traj[key][:n]
    return labels


def camera_role(traj: dict[str, np.ndarray], camera: str) -> str:
    codes = traj.get(f"camera_type/{camera}")
    return "unknown" if codes is None else CAMERA_ROLES.get(int(codes[0]), "unknown")


def _place(video: Path, dest: Path, copy: bool) -> None:
    if dest.exists() or dest.is_symlink():
        dest.unlink()
    if copy:
        shutil.copyfile(video, dest)
    else:
        os.symlink(video, dest)


def _videos(folder: Path) -> list[Path]:
    return sorted(v for v in (folder / "recordings" / "MP4").glob("*.mp4") if not v.stem.endswith("-stereo"))


def _no_videos(folder: Path) -> EpisodeError:
    if any((folder / "recordings" / "SVO").glob("*.svo")):
        return EpisodeError(f"{folder}: only recordings/SVO/*.svo (export MP4s with the ZED SDK first; "
                            "SVO is not read here)")
    return EpisodeError(f"{folder}: no recordings/MP4/<serial>.mp4")


def convert_droid(src: str | Path, out_dir: str | Path, cfg: DroidReadConfig | None = None) -> ReaderResult:
    """Convert every episode (a folder holding trajectory.h5) under `src`. A bad episode or camera file is
    recorded in `failures` (and failures.parquet); the others still convert."""
    cfg = cfg or DroidReadConfig()
    cfg.validate()
    root, out = Path(src).absolute(), Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    rows, failures, names = [], [], OutputNames()
    for h5 in sorted(root.rglob("trajectory.h5")):
        folder = h5.parent
        name = safe_name(str(folder.relative_to(root)) if folder != root else folder.name)
        try:
            videos = _videos(folder)
            traj = read_trajectory(h5, [v.stem for v in videos], cfg.max_dataset_bytes)
            if not videos:
                raise _no_videos(folder)
        except EpisodeError as err:
            failures.append({"episode": name, "path": str(h5), "error": str(err)})
            continue
        split = split_for(name, cfg.val_fraction)
        steps = traj["cartesian"].shape[0]
        for video in videos:
            try:
                dest = out / f"droid_{name}_{safe_name(video.stem)}.mp4"
                names.claim(dest, str(video))
                info = probe(video)
                if abs(info.frames - steps) > cfg.max_frame_mismatch:
                    raise EpisodeError(f"{video}: {info.frames} frames for {steps} control steps "
                                       f"(frame i is step i; at most {cfg.max_frame_mismatch} may differ)")
                n = min(info.frames, steps)
                labels = frame_labels(traj, video.stem, n, cfg.control_hz)
                _place(video, dest, cfg.copy_videos)
                write_sidecar(dest, np.arange(n) / info.fps, labels)
            except (EpisodeError, VideoError, OSError) as err:
                failures.append({"episode": name, "path": str(video), "error": str(err)})
                continue
            rows.append({"path": str(dest), "split": split, "episode": name, "domain": "droid",
                         "camera": video.stem, "camera_role": camera_role(traj, video.stem), "source": str(video),
                         "fps": info.fps, "step_hz": cfg.control_hz, "n_frames": n, "steps": steps,
                         "end": n / info.fps if info.frames > n else None})
    return finish(out, rows, failures)
