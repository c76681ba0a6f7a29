"""What both real-format readers share: the result type, per-episode failure records, splits, writing."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lawm.data.video import write_video


class EpisodeError(Exception):
    """One episode cannot be converted; the message says which file and why."""


@dataclass
class ReaderResult:
    manifest: Path  # manifest.parquet (written even when empty, so ingest finds it)
    episodes: int  # converted episodes
    videos: int
    failures: list[dict[str, str]] = field(default_factory=list)  # {"episode", "path", "error"}


def split_for(name: str, val_fraction: float) -> str:
    """Stable split by episode name: adding or losing other episodes never moves this one."""
    return "val" if int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < val_fraction else "train"


def even_crop(frame: np.ndarray) -> np.ndarray:
    """yuv420p needs even sides: drop a last odd row/column."""
    h, w = frame.shape[:2]
    return frame[: h - h % 2, : w - w % 2]


def write_frames(path: Path, frames: list[np.ndarray], fps: float) -> None:
    frames = [even_crop(f) for f in frames]
    h, w = frames[0].shape[:2]
    write_video(path, iter(frames), fps, (w, h))


def write_sidecar(video: Path, t: np.ndarray, labels: dict[str, np.ndarray]) -> None:
    arrays: dict[str, Any] = {"t": np.asarray(t, dtype=np.float64)}
    arrays.update({k: np.asarray(v, dtype=np.float32) for k, v in labels.items()})
    np.savez(video.with_name(video.stem + ".labels.npz"), **arrays)


def finish(out: Path, rows: list[dict], failures: list[dict[str, str]]) -> ReaderResult:
    manifest = out / "manifest.parquet"
    columns = ["path", "split", "episode", "domain"]
    pd.DataFrame(rows, columns=None if rows else columns).to_parquet(manifest, index=False)
    if failures:
        pd.DataFrame(failures).to_parquet(out / "failures.parquet", index=False)
    return ReaderResult(manifest, len({r["episode"] for r in rows}), len(rows), failures)


def body_frame_motion(pose: np.ndarray, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """From poses (N, 3) x, y, yaw: per-step robot-frame deltas (dx, dy, dyaw) and (v, ω), last rows zero."""
    n = pose.shape[0]
    delta, vel = np.zeros((n, 3)), np.zeros((n, 2))
    if n > 1:
        d = np.diff(pose[:, :2], axis=0)
        c, s = np.cos(pose[:-1, 2]), np.sin(pose[:-1, 2])
        dyaw = (np.diff(pose[:, 2]) + np.pi) % (2 * np.pi) - np.pi
        delta[:-1] = np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1], dyaw], 1)
        vel[:-1] = np.stack([delta[:-1, 0] * fps, dyaw * fps], 1)
    return delta, vel
