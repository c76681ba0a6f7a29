"""What both real-format readers share: the result type, per-episode failure records, names, splits, writing,
and HDF5 access that never leaves the file.

Names: an episode or camera name becomes part of an output file name. `safe_name` keeps only [A-Za-z0-9_-] and, when
that changed the name, appends 8 hex digits of the original's SHA-1, so `traj 1` and `traj_1` stay two files; a name
depends on its own source only (adding episodes never renames or re-splits another). `OutputNames` is the backstop:
a second source for the same output file in one run is a recorded failure, never an overwrite.

HDF5: `h5_dataset` reaches a dataset only through hard links and refuses external and soft links on the way,
datasets whose raw data lives in other files (`external=`) or are virtual (VDS mapping other files), and datasets
larger than a byte limit (a declared shape is read whole). Otherwise an HDF5 file given to a reader could make
it read any file on the machine into its outputs.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lawm.data.video import write_video
from lawm.files import atomic_write_parquet


class EpisodeError(Exception):
    """One episode cannot be converted; the message says which file and why."""


@dataclass
class ReaderResult:
    manifest: Path  # manifest.parquet (written even when empty, so ingest finds it)
    episodes: int  # converted episodes
    videos: int
    failures: list[dict[str, str]] = field(default_factory=list)  # {"episode", "path", "error"}


MAX_DATASET_BYTES = 1 << 30  # one HDF5 dataset read whole; DROID's largest per-episode array is kilobytes-to-MB


def safe_name(original: str) -> str:
    """A file-name-safe form of `original` that stays distinct from every other original (see module doc)."""
    clean = re.sub(r"[^A-Za-z0-9_-]", "_", original)
    return clean if clean == original else f"{clean}-{hashlib.sha1(original.encode()).hexdigest()[:8]}"


class OutputNames:
    """Output files claimed in this run, each by one source."""

    def __init__(self) -> None:
        self.owner: dict[Path, str] = {}

    def claim(self, path: Path, source: str) -> None:
        owner = self.owner.setdefault(path, source)
        if owner != source:
            raise EpisodeError(f"{source}: output name {path.name} is already taken by {owner}; rename one of them")


def h5_dataset(f: Any, key: str, where: str, max_bytes: int = MAX_DATASET_BYTES, required: bool = True) -> Any:
    """The h5py Dataset at `key`, checked as the module doc says; None when absent and not `required`."""
    import h5py

    node = f
    for part in key.split("/"):
        if not isinstance(node, h5py.Group):
            raise EpisodeError(f"{where}: {key}: {node.name} is not a group")
        link = node.get(part, getlink=True)  # the link itself: nothing is followed or opened yet
        if link is None:
            if required:
                raise EpisodeError(f"{where}: missing dataset {key}")
            return None
        if not isinstance(link, h5py.HardLink):
            raise EpisodeError(f"{where}: refused {key}: it is reached through a {type(link).__name__} "
                               "(only data stored in this file is read)")
        node = node[part]
    if not isinstance(node, h5py.Dataset):
        raise EpisodeError(f"{where}: {key} is not a dataset")
    if node.external:
        raise EpisodeError(f"{where}: refused {key}: its data is stored in external files "
                           f"({', '.join(str(e[0]) for e in node.external)[:200]})")
    if node.is_virtual:
        raise EpisodeError(f"{where}: refused {key}: a virtual dataset (its data maps other files)")
    nbytes = node.size * node.dtype.itemsize
    if nbytes > max_bytes:
        raise EpisodeError(f"{where}: refused {key}: {node.shape} of {node.dtype} is {nbytes} bytes "
                           f"(limit {max_bytes})")
    return node


def h5_array(f: Any, key: str, where: str, max_bytes: int = MAX_DATASET_BYTES, required: bool = True) -> Any:
    """`h5_dataset` read whole as float64; None when absent and not `required`."""
    ds = h5_dataset(f, key, where, max_bytes=max_bytes, required=required)
    return None if ds is None else np.asarray(ds[()], np.float64)


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
    atomic_write_parquet(manifest, pd.DataFrame(rows, columns=None if rows else columns))
    if failures:
        atomic_write_parquet(out / "failures.parquet", pd.DataFrame(failures))
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
