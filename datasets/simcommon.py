"""Pieces shared by the pybullet generators: a quiet connection, procedural textures, seeding, Ray fan-out,
writing episodes (MP4 + sidecar) and the manifest."""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd

from lawm import storage
from lawm.data.video import write_video
from lawm.files import atomic_write_parquet

CONTROL_HZ = 4.0  # commands and frames, as in RECON/DROID at 4 fps


@contextlib.contextmanager
def quiet_fds() -> Iterator[None]:
    """pybullet prints warnings from C on fd 1 and 2 (without newlines): point both at /dev/null meanwhile."""
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        ctypes.CDLL(None).fflush(None)  # C stdio buffers would otherwise print later, on the real fds
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def connect():
    """A private DIRECT pybullet client (own physics server), silenced."""
    with quiet_fds():
        import pybullet  # its import prints the build time on stdout
        import pybullet_data
        from pybullet_utils import bullet_client

        client = bullet_client.BulletClient(connection_mode=pybullet.DIRECT)
    client.setAdditionalSearchPath(pybullet_data.getDataPath())
    return client



class PybulletWorld:
    """A DIRECT pybullet client plus a scratch folder for the textures a scene generates."""

    def __init__(self, tex_prefix: str):
        self.client = connect()
        self._tex_dir = tempfile.mkdtemp(prefix=tex_prefix)

    def close(self) -> None:
        try:
            self.client.disconnect()
        except Exception:
            pass
        shutil.rmtree(self._tex_dir, ignore_errors=True)

def episode_seed(seed: int, domain: int, episode: int) -> int:
    """Independent seed per (run seed, simulator, episode): stable when the episode count changes."""
    return int(np.random.SeedSequence([seed, domain, episode]).generate_state(1)[0])


def val_episodes(n: int, val_fraction: float) -> set[int]:
    """The last ceil(n * fraction) episodes go to val (at least one train episode is kept)."""
    k = int(math.ceil(n * val_fraction)) if val_fraction > 0 else 0
    k = min(k, n - 1) if n > 1 else 0
    return set(range(n - k, n))


def texture_image(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A small random RGB texture: checker, stripes or blotches in two random colours."""
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    yy, xx = np.mgrid[0:size, 0:size] / size
    kind = rng.integers(0, 3)
    if kind == 0:
        n = rng.integers(2, 9)
        mix = ((np.floor(xx * n) + np.floor(yy * n)) % 2).astype(float)
    elif kind == 1:
        ang, f = rng.uniform(0, np.pi), rng.uniform(3, 12)
        mix = 0.5 + 0.5 * np.sin(2 * np.pi * f * (xx * np.cos(ang) + yy * np.sin(ang)))
    else:
        mix = np.zeros((size, size))
        for _ in range(8):
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.25)
            mix = np.maximum(mix, (((xx - cx) ** 2 + (yy - cy) ** 2) < r * r).astype(float))
    img = a[None, None] * mix[..., None] + b[None, None] * (1 - mix[..., None])
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def load_texture(client, image: np.ndarray, folder: str) -> int:
    """pybullet loads textures from files only: write a PNG into a scratch folder and load it."""
    from PIL import Image

    fd, path = tempfile.mkstemp(suffix=".png", dir=folder)
    os.close(fd)
    Image.fromarray(image).save(path)
    return client.loadTexture(path)


def camera_rgb(client, width: int, height: int, view: list[float], proj: list[float]) -> np.ndarray:
    """(h, w, 3) uint8 from the CPU tiny renderer (no display, no GPU)."""
    import pybullet

    _, _, rgba, _, _ = client.getCameraImage(width, height, view, proj, renderer=pybullet.ER_TINY_RENDERER,
                                             flags=pybullet.ER_NO_SEGMENTATION_MASK)
    return np.asarray(rgba, dtype=np.uint8).reshape(height, width, 4)[..., :3].copy()


def write_episode(path: Path, frames: list[np.ndarray], labels: dict[str, np.ndarray], fps: float) -> None:
    """MP4 + `X.labels.npz` (t float64, other arrays float32, one row per frame)."""
    h, w, _ = frames[0].shape
    n = len(frames)
    for key, val in labels.items():
        if val.shape[0] != n:
            raise ValueError(f"{path.name}: labels[{key!r}] has {val.shape[0]} rows for {n} frames")
    path.parent.mkdir(parents=True, exist_ok=True)  # a task on a node whose disk (or mirror) lacks the folder
    write_video(path, iter(frames), fps, (w, h))
    arrays = {"t": np.arange(n, dtype=np.float64) / fps}
    arrays.update({k: np.asarray(v, dtype=np.float32) for k, v in labels.items()})
    sidecar = path.with_name(path.stem + ".labels.npz")  # pipelines.sources.sidecar_path, which ingest reads
    np.savez(sidecar, **arrays)
    storage.push(path)  # an object-store root: written on this node, read by ingest on any
    storage.push(sidecar)


def fan_out(fn: Callable[..., list[dict]], jobs: list[tuple], use_ray: bool, num_cpus: int = 0) -> list[dict]:
    """Run `fn(*job)` for every job, in Ray tasks or inline; rows come back in job order."""
    if not use_ray:
        return [row for job in jobs for row in fn(*job)]
    import ray

    from pipelines.ray_env import ensure_ray  # the one way lawm starts or joins Ray

    ensure_ray(num_cpus or None)
    task = ray.remote(num_cpus=1)(fn)
    results = ray.get([task.remote(*job) for job in jobs])
    return [row for rows in results for row in rows]


def write_manifest(rows: list[dict[str, Any]], out_dir: Path) -> Path:
    path = out_dir / "manifest.parquet"
    atomic_write_parquet(path, pd.DataFrame(rows))
    return path


def generate_episodes(cfg: Any, task: Callable, out_dir: str | Path, use_ray: bool, num_cpus: int) -> Path:
    """Run `task(cfg, index, out_dir, split)` for every episode (as Ray tasks or inline), split by episode, and
    write the manifest; returns its path."""
    cfg.validate()
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    val = val_episodes(cfg.episodes, cfg.val_fraction)
    jobs = [(cfg, i, str(out), "val" if i in val else "train") for i in range(cfg.episodes)]
    return write_manifest(fan_out(task, jobs, use_ray, num_cpus), out)
