"""RECON to MP4 + sidecar + manifest.

Two inputs are read:
- GNM/ViNT/NWM processed trajectories: a folder per trajectory with `0.jpg … (T-1).jpg` and `traj_data.pkl`
  = {"position": (T, 2), "yaw": (T,)} (visualnav-transformer `process_recon.py`). The pickle is untrusted input,
  read by `safe_pickle.safe_load`: no code runs, nothing is imported, what it may allocate is bounded by its size.
- The original RECON HDF5 (one file per trajectory, the layout `process_recon.py` reads): `jackal/position`
  (T, 3), `jackal/yaw` (T,), `images/rgb_left` (T,) JPEG bytes (or (T, H, W, 3) uint8), and when present
  `commands/linear_velocity`, `commands/angular_velocity` (T,) and `collision/any` (T,). Read through
  `common.h5_dataset`: external/soft links, external raw storage and virtual datasets are refused.

Output `recon_<name>.mp4`, `<name>` the trajectory's path under `src` made file-name-safe by `common.safe_name`
(distinct originals give distinct names; a clash that remains, e.g. `run.h5` beside `run.hdf5`, is a failure).
Every bad trajectory is a row in `failures.parquet` with a one-line error; the others still convert.

Sidecar per frame: `pose` (x, y, yaw), `action` (v, ω) — the logged commands from HDF5 when present, otherwise
derived from consecutive poses —, `delta` (dx, dy, dyaw) in the robot frame of frame i, `velocity_from_pose`.
The native RECON rate is unverified; frames are taken as `fps` (default 4, as the paper assumes).
"""
from __future__ import annotations

import io
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lawm.config import require
from lawm_datasets.readers import safe_pickle
from lawm_datasets.readers.common import (EpisodeError, OutputNames, ReaderResult, body_frame_motion, finish,
                                          h5_array, h5_dataset, safe_name, split_for, write_frames, write_sidecar)

MAX_FRAME_BYTES = 64 << 20  # per stored frame: a 4K RGB frame is 25 MB; anything larger is not a camera frame


@dataclass(kw_only=True)
class ReconReadConfig:
    fps: float = 4.0
    val_fraction: float = 0.1
    max_frames: int = 0  # 0 = whole trajectory

    def validate(self) -> None:
        require(self.fps > 0, "fps", "must be > 0")
        require(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        require(self.max_frames >= 0, "max_frames", "must be >= 0")


# ---------------------------------------------------------------- trajectories

def _poses(position: Any, yaw: Any, where: str) -> np.ndarray:
    try:
        pos = np.asarray(position, dtype=np.float64)
        yaw = np.asarray(yaw, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise EpisodeError(f"{where}: position/yaw are not numeric ({err})") from None
    if pos.ndim != 2 or pos.shape[1] < 2:
        raise EpisodeError(f"{where}: position must be (T, 2), got {pos.shape}")
    if pos.shape[0] != yaw.shape[0] or pos.shape[0] < 2:
        raise EpisodeError(f"{where}: position has {pos.shape[0]} rows, yaw {yaw.shape[0]} (need equal, >= 2)")
    if not (np.isfinite(pos).all() and np.isfinite(yaw).all()):
        raise EpisodeError(f"{where}: position/yaw hold NaN or inf")
    return np.concatenate([pos[:, :2], yaw[:, None]], 1)


def _read_image(data: Any, where: str) -> np.ndarray:
    from PIL import Image

    try:
        if isinstance(data, np.ndarray) and data.ndim == 3:
            return data.astype(np.uint8)
        if isinstance(data, (str, Path)):
            source = data
        else:  # JPEG bytes as h5py gives them: bytes, np.bytes_, np.void or a uint8 vector
            source = io.BytesIO(data.tobytes() if isinstance(data, (np.ndarray, np.void)) else bytes(data))
        with Image.open(source) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as err:
        raise EpisodeError(f"{where}: unreadable image ({err.__class__.__name__}: {err})") from None


def _processed(folder: Path) -> tuple[list[np.ndarray], np.ndarray, dict[str, np.ndarray]]:
    pkl = folder / "traj_data.pkl"
    try:
        data = safe_pickle.safe_load(pkl)
    except safe_pickle.UnsafePickle as err:
        raise EpisodeError(f"{pkl}: {err}") from None
    except Exception as err:  # truncated or garbage bytes
        raise EpisodeError(f"{pkl}: not a readable pickle ({err.__class__.__name__}: {err})") from None
    if not isinstance(data, dict) or "position" not in data or "yaw" not in data:
        raise EpisodeError(f"{pkl}: expected a dict with 'position' and 'yaw'")
    pose = _poses(data["position"], data["yaw"], str(pkl))
    numbered = {int(p.stem): p for p in folder.iterdir() if re.fullmatch(r"\d+\.jpg", p.name)}
    if sorted(numbered) != list(range(len(numbered))) or len(numbered) != len(pose):
        raise EpisodeError(f"{folder}: expected images 0.jpg..{len(pose) - 1}.jpg for {len(pose)} poses, "
                           f"found {len(numbered)}")
    frames = [_read_image(numbered[i], str(numbered[i])) for i in range(len(pose))]
    return frames, pose, {}


def _hdf5(path: Path) -> tuple[list[np.ndarray], np.ndarray, dict[str, np.ndarray]]:
    import h5py

    where = str(path)
    try:
        with h5py.File(path, "r") as f:
            pose = _poses(h5_array(f, "jackal/position", where), h5_array(f, "jackal/yaw", where), where)
            # images are read one at a time: the limit applies to one frame, not to the whole dataset
            images = h5_dataset(f, "images/rgb_left", where, max_bytes=sys.maxsize)
            if images.shape[0] != len(pose):
                raise EpisodeError(f"{path}: {images.shape[0]} images for {len(pose)} poses")
            if math.prod(images.shape[1:]) * images.dtype.itemsize > MAX_FRAME_BYTES:
                raise EpisodeError(f"{path}: refused images/rgb_left: frames of shape {images.shape[1:]}")
            frames = [_read_image(images[i], f"{path}:images/rgb_left[{i}]") for i in range(len(pose))]
            extra = {}
            lin = h5_array(f, "commands/linear_velocity", where, required=False)
            ang = h5_array(f, "commands/angular_velocity", where, required=False)
            if lin is not None and ang is not None:
                cmd = np.stack([lin.reshape(-1), ang.reshape(-1)], 1)
                if cmd.shape[0] == len(pose):
                    extra["command"] = cmd
            collision = h5_array(f, "collision/any", where, required=False)
            if collision is not None and collision.shape[0] == len(pose):
                extra["collision"] = collision.reshape(len(pose), -1)[:, 0]
    except EpisodeError:
        raise
    except Exception as err:  # not HDF5, truncated, wrong dtypes
        raise EpisodeError(f"{path}: unreadable RECON HDF5 ({err.__class__.__name__}: {err})") from None
    return frames, pose, extra


def _name(root: Path, item: Path) -> str:
    rel = str(item.relative_to(root)) if item != root else item.name
    return safe_name(rel.removesuffix(".hdf5").removesuffix(".h5"))


def convert_recon(src: str | Path, out_dir: str | Path, cfg: ReconReadConfig | None = None) -> ReaderResult:
    """Convert every trajectory under `src` (processed folders and/or HDF5 files). A bad trajectory is
    recorded in `failures` (and failures.parquet) and the others still convert."""
    cfg = cfg or ReconReadConfig()
    cfg.validate()
    root, out = Path(src).absolute(), Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    items = sorted({p.parent for p in root.rglob("traj_data.pkl")} |
                   {p for p in root.rglob("*") if p.suffix in (".hdf5", ".h5") and p.is_file()})
    rows, failures, names = [], [], OutputNames()
    for item in items:
        name = _name(root, item)
        video = out / f"recon_{name}.mp4"
        try:
            names.claim(video, str(item))
            frames, pose, extra = _hdf5(item) if item.is_file() else _processed(item)
            if cfg.max_frames:
                frames, pose = frames[:cfg.max_frames], pose[:cfg.max_frames]
                extra = {k: v[:cfg.max_frames] for k, v in extra.items()}
            if len({f.shape for f in frames}) != 1:
                raise EpisodeError(f"{item}: images differ in size")
            delta, vel = body_frame_motion(pose, cfg.fps)
            labels = {"pose": pose, "delta": delta, "velocity_from_pose": vel,
                      "action": extra["command"] if "command" in extra else vel, **extra}
            if "command" in extra:
                labels["action"] = labels["action"].copy()
                labels["action"][-1] = 0.0
            write_frames(video, frames, cfg.fps)
            write_sidecar(video, np.arange(len(frames)) / cfg.fps, labels)
        except EpisodeError as err:
            failures.append({"episode": name, "path": str(item), "error": str(err)})
            continue
        except Exception as err:  # an encoder failure loses this trajectory only
            failures.append({"episode": name, "path": str(item), "error": f"{err.__class__.__name__}: {err}"})
            continue
        rows.append({"path": str(video), "split": split_for(name, cfg.val_fraction), "episode": name,
                     "domain": "recon", "source": str(item), "fps": cfg.fps, "n_frames": len(frames),
                     "has_commands": "command" in extra})
    return finish(out, rows, failures)
