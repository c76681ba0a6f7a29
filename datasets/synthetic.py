"""Synthetic "in-the-wild" videos with known motion, and counterfactual renders for scoring transfer.

World units: 1.0 = the frame width at zoom 1; the camera looks at (cam_x, cam_y) with zoom z (z > 1 zooms in).
Agent 0 is the main, action-driven agent: large and always drawn on top. Agents 1.. are distractors that drift
across a wrapping world, so they enter and leave the frame. Every velocity is a per-frame displacement:
row i moves frame i to frame i+1 (last row zero), so `pos[i+1] = pos[i] + vel[i]` exactly (distractors also wrap).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pandas as pd

from lawm.config import require
from lawm.data.video import write_video
from lawm.files import atomic_write_parquet

WORLD_HALF = 1.4  # distractors wrap here; the view never reaches it (pan <= 0.3, half field <= 0.625)
SHAPES = ("circle", "square", "diamond", "triangle")


@dataclass(kw_only=True)
class SyntheticConfig:
    n_videos: int = 24
    seconds: float = 8.0
    fps: float = 8.0
    size: list[int] = field(default_factory=lambda: [128, 128])  # (w, h)
    n_agents: int = 4  # agent 0 + distractors
    seed: int = 0
    val_fraction: float = 0.125
    agent_radius: float = 0.11  # agent 0, in frame widths: ~28 px across at 128 px, so it is not tiny
    agent_speed: float = 0.35  # frame widths per second (typical |v| of agent 0)
    distractor_speed: float = 0.25
    camera_pan: float = 0.12  # frame widths per second; 0 = static camera
    zoom_range: list[float] = field(default_factory=lambda: [0.8, 1.3])
    flicker: float = 0.08  # relative amplitude of the lighting gain
    noise_std: float = 0.02  # sensor noise, in [0, 1] intensity units
    n_counterfactuals: int = 4  # val pairs (A, B) rendered as B driven by A's agent-0 actions
    crf: int = 20

    def validate(self) -> None:
        require(self.n_videos >= 1, "n_videos", "must be >= 1")
        require(self.seconds > 0 and self.fps > 0, "seconds", "seconds and fps must be > 0")
        require(len(self.size) == 2 and min(self.size) >= 16, "size", "must be [w, h], each >= 16")
        require(all(s % 2 == 0 for s in self.size), "size", "w and h must be even (yuv420p)")
        require(self.n_agents >= 1, "n_agents", "must be >= 1")
        require(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        require(0.02 <= self.agent_radius <= 0.3, "agent_radius", "must be in [0.02, 0.3]")
        require(len(self.zoom_range) == 2 and 0.5 <= self.zoom_range[0] <= self.zoom_range[1] <= 1.6,
                "zoom_range", "must be [lo, hi] within [0.5, 1.6]")
        require(self.n_counterfactuals >= 0, "n_counterfactuals", "must be >= 0")

    @property
    def n_frames(self) -> int:
        return int(round(self.seconds * self.fps))


@dataclass
class SceneSpec:
    """Everything about one video except agent 0's actions: appearance, distractors, camera, light, noise."""
    seed: int
    size: tuple[int, int]
    fps: float
    texture: np.ndarray  # (T, T, 3) float32 background over [-WORLD_HALF, WORLD_HALF]^2
    shapes: list[str]
    radii: np.ndarray  # (A,)
    colors: np.ndarray  # (A, 2, 3) two colours per sprite
    stripes: np.ndarray  # (A, 3): frequency, angle, phase of the sprite pattern
    start: np.ndarray  # (A, 2) positions at frame 0
    velocities: np.ndarray  # (N, A, 2) the scene's own actions (agent 0 included)
    camera: np.ndarray  # (N, 3) x, y, zoom
    light: np.ndarray  # (N,) lighting gain
    noise_std: float


# ---------------------------------------------------------------- procedural ingredients

def _smooth_noise(rng: np.random.Generator, res: int, cells: int) -> np.ndarray:
    """(res, res) values in ~[-1, 1]: a random grid, bilinearly upsampled."""
    grid = rng.uniform(-1, 1, (cells + 1, cells + 1))
    x = np.linspace(0, cells, res, endpoint=False)
    i = np.floor(x).astype(int)
    f = x - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _texture(rng: np.random.Generator, res: int) -> np.ndarray:
    """A textured background: coloured blotches, oriented gratings and a checker of random strength."""
    yy, xx = np.mgrid[0:res, 0:res] / res * 2 * WORLD_HALF
    base = rng.uniform(0.15, 0.75, 3)
    tint = rng.uniform(-0.3, 0.3, 3)
    img = base[None, None] + tint[None, None] * _smooth_noise(rng, res, 6)[..., None]
    for _ in range(rng.integers(1, 4)):
        freq, ang, amp = rng.uniform(4, 18), rng.uniform(0, np.pi), rng.uniform(0.03, 0.12)
        wave = np.sin(freq * (xx * np.cos(ang) + yy * np.sin(ang)) + rng.uniform(0, 6.3))
        img += amp * wave[..., None] * rng.uniform(0.3, 1.0, 3)[None, None]
    checker = ((np.floor(xx * rng.uniform(3, 8)) + np.floor(yy * rng.uniform(3, 8))) % 2) - 0.5
    img += rng.uniform(0, 0.12) * checker[..., None]
    img += 0.1 * _smooth_noise(rng, res, 40)[..., None]  # fine grain so camera motion is visible everywhere
    return np.clip(img, 0, 1).astype(np.float32)


def _ou(rng: np.random.Generator, n: int, dim: int, sigma: float, rho: float) -> np.ndarray:
    """Smooth random velocities: an AR(1) process with stationary std `sigma`."""
    out = np.zeros((n, dim))
    v = rng.normal(0, sigma, dim)
    scale = sigma * math.sqrt(1 - rho * rho)
    for t in range(n):
        out[t] = v
        v = rho * v + scale * rng.normal(0, 1, dim)
    return out


def _camera(rng: np.random.Generator, cfg: SyntheticConfig, n: int) -> np.ndarray:
    """Pan and zoom with springs that keep the view inside the textured world."""
    lo, hi = cfg.zoom_range
    pan = cfg.camera_pan / cfg.fps * rng.uniform(0.0, 1.5)  # some videos nearly static
    drive = _ou(rng, n, 3, 1.0, 0.9)
    cam = np.zeros((n, 3))
    pos = np.array([rng.uniform(-0.1, 0.1), rng.uniform(-0.1, 0.1), math.log(rng.uniform(lo, hi))])
    mid = 0.5 * (math.log(lo) + math.log(hi))
    for t in range(n):
        cam[t] = pos[0], pos[1], math.exp(pos[2])
        step = np.array([pan * drive[t, 0] - 0.05 * pos[0], pan * drive[t, 1] - 0.05 * pos[1],
                         0.02 * drive[t, 2] * (hi > lo) - 0.05 * (pos[2] - mid)])
        pos = pos + step
        pos[:2] = np.clip(pos[:2], -0.3, 0.3)
        pos[2] = np.clip(pos[2], math.log(lo), math.log(hi))
    return cam


def _agent0_actions(rng: np.random.Generator, cfg: SyntheticConfig, start: np.ndarray,
                    cam: np.ndarray) -> np.ndarray:
    """Agent 0's policy: smooth random velocity with stops, steered back when it strays from the view centre."""
    n = cam.shape[0]
    speed = cfg.agent_speed / cfg.fps
    drive = _ou(rng, n, 2, speed, 0.85)
    gate, going = np.zeros(n), True
    for t in range(n):
        going = (rng.random() > 0.04) if going else (rng.random() < 0.2)
        gate[t] = 0.6 * (gate[t - 1] if t else 1.0) + 0.4 * going
    vel = np.zeros((n, 2))
    pos = start.copy()
    for t in range(n - 1):
        off = pos - cam[t, :2]
        v = drive[t] * gate[t] - 0.5 * np.maximum(np.abs(off) - 0.25 / cam[t, 2], 0) * np.sign(off)
        vel[t] = v
        pos = pos + v
    return vel


def make_scene(cfg: SyntheticConfig, seed: int) -> SceneSpec:
    """The scene of one video, fully determined by (cfg, seed)."""
    rng = np.random.default_rng(seed)
    w, h = cfg.size
    n, a = cfg.n_frames, cfg.n_agents
    res = int(math.ceil(2 * WORLD_HALF * w * cfg.zoom_range[1]))
    texture = _texture(rng, res)
    shapes = [SHAPES[i] for i in rng.integers(0, len(SHAPES), a)]
    radii = np.concatenate([[cfg.agent_radius], rng.uniform(0.05, 0.09, a - 1)])
    colors = rng.uniform(0, 1, (a, 2, 3))
    colors[0, 0] = [0.95, 0.15, 0.1] if rng.random() < 0.5 else [0.1, 0.35, 0.95]  # saturated, stands out
    colors[0, 1] = 1.0 - 0.3 * colors[0, 0]
    stripes = np.stack([rng.uniform(2, 6, a), rng.uniform(0, np.pi, a), rng.uniform(0, 6.3, a)], 1)
    cam = _camera(rng, cfg, n)
    start = rng.uniform(-WORLD_HALF, WORLD_HALF, (a, 2))
    start[0] = cam[0, :2] + rng.uniform(-0.15, 0.15, 2)
    vel = np.zeros((n, a, 2))
    vel[:, 0] = _agent0_actions(rng, cfg, start[0], cam)
    for k in range(1, a):
        drift = rng.normal(0, 1, 2)
        drift *= cfg.distractor_speed / cfg.fps / (np.linalg.norm(drift) + 1e-9)
        vel[:, k] = drift + _ou(rng, n, 2, 0.5 * cfg.distractor_speed / cfg.fps, 0.9)
    vel[-1] = 0.0
    light = 1.0 + cfg.flicker * (0.7 * np.sin(np.arange(n) * rng.uniform(0.3, 1.5) + rng.uniform(0, 6.3))
                                 + 0.3 * rng.uniform(-1, 1, n))
    return SceneSpec(seed, (w, h), cfg.fps, texture, shapes, radii, colors, stripes, start, vel, cam,
                     light, cfg.noise_std)


# ---------------------------------------------------------------- dynamics and rendering

def _velocities(scene: SceneSpec, actions: Optional[np.ndarray]) -> np.ndarray:
    """The scene's velocities with agent 0's (or every agent's) replaced by `actions`."""
    vel = scene.velocities.copy()
    if actions is None:
        return vel
    actions = np.asarray(actions, dtype=np.float64)
    n = vel.shape[0]
    if actions.shape == (n, 2):
        vel[:, 0] = actions
    elif actions.shape == vel.shape:
        vel = actions.copy()
    else:
        raise ValueError(f"actions must be ({n}, 2) for agent 0 or {vel.shape} for all agents, got {actions.shape}")
    vel[-1] = 0.0
    return vel


def rollout(scene: SceneSpec, actions: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Per-frame state (float64): agent positions (wrapping distractors), velocities, screen positions, visibility."""
    vel = _velocities(scene, actions)
    n, a, _ = vel.shape
    pos = np.zeros((n, a, 2))
    pos[0] = scene.start
    for t in range(n - 1):
        pos[t + 1] = pos[t] + vel[t]
        wrap = pos[t + 1, 1:]  # agent 0 never wraps: its motion must equal its actions
        pos[t + 1, 1:] = (wrap + WORLD_HALF) % (2 * WORLD_HALF) - WORLD_HALF
    w, h = scene.size
    cam = scene.camera
    zoom = cam[:, 2][:, None]
    screen = np.stack([(pos[..., 0] - cam[:, None, 0]) * w * zoom + w / 2,
                       (pos[..., 1] - cam[:, None, 1]) * w * zoom + h / 2], -1)
    rad = scene.radii[None] * w * zoom
    visible = ((screen[..., 0] > -rad) & (screen[..., 0] < w + rad) &
               (screen[..., 1] > -rad) & (screen[..., 1] < h + rad))
    cam_vel = np.zeros_like(cam)
    cam_vel[:-1] = np.diff(cam, axis=0)
    return {"agent_pos": pos, "agent_vel": vel, "agent_screen": screen, "agent_visible": visible,
            "camera": cam, "camera_vel": cam_vel, "light": scene.light}


def _sample_bilinear(tex: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    res = tex.shape[0]
    u = np.clip(u, 0, res - 1.001)
    v = np.clip(v, 0, res - 1.001)
    i, j = np.floor(v).astype(np.int32), np.floor(u).astype(np.int32)
    fv, fu = (v - i)[..., None], (u - j)[..., None]
    top = tex[i, j] * (1 - fu) + tex[i, j + 1] * fu
    bot = tex[i + 1, j] * (1 - fu) + tex[i + 1, j + 1] * fu
    return top * (1 - fv) + bot * fv


def _shape_norm(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """<= 1 inside the unit shape."""
    if shape == "circle":
        return np.sqrt(x * x + y * y)
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) * 1.15
    if shape == "diamond":
        return np.abs(x) + np.abs(y)
    return 2 * np.maximum(np.maximum(-y, 0.866 * x + 0.5 * y), -0.866 * x + 0.5 * y)  # triangle, tip up


def _draw_agent(img: np.ndarray, scene: SceneSpec, k: int, cx: float, cy: float, zoom: float) -> None:
    h, w, _ = img.shape
    r = scene.radii[k] * w * zoom
    x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, w)
    y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, h)
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
    lx, ly = (xx - cx) / r, (yy - cy) / r
    alpha = np.clip((1.0 - _shape_norm(scene.shapes[k], lx, ly)) * r, 0, 1)[..., None]
    freq, ang, phase = scene.stripes[k]
    s = 0.5 + 0.5 * np.sin(freq * (lx * np.cos(ang) + ly * np.sin(ang)) * np.pi + phase)
    ca, cb = scene.colors[k]
    sprite = ca * s[..., None] + cb * (1 - s[..., None])
    sprite *= (1.0 - 0.25 * np.clip(lx + ly, -1, 1)[..., None] * 0.5)  # a little shading gives it volume
    img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - alpha) + sprite * alpha


def iter_frames(scene: SceneSpec, state: dict[str, np.ndarray]) -> Iterator[np.ndarray]:
    """Yield (h, w, 3) uint8 frames for a rolled-out state."""
    w, h = scene.size
    res = scene.texture.shape[0]
    px = res / (2 * WORLD_HALF)
    grid_y, grid_x = np.mgrid[0:h, 0:w] + 0.5
    noise_rng = np.random.default_rng([scene.seed, 104729])
    a = scene.radii.shape[0]
    for t in range(scene.camera.shape[0]):
        cx, cy, z = scene.camera[t]
        wx = cx + (grid_x - w / 2) / (w * z)
        wy = cy + (grid_y - h / 2) / (w * z)
        img = _sample_bilinear(scene.texture, (wx + WORLD_HALF) * px, (wy + WORLD_HALF) * px)
        for k in list(range(1, a)) + [0]:  # agent 0 on top
            if state["agent_visible"][t, k]:
                sx, sy = state["agent_screen"][t, k]
                _draw_agent(img, scene, k, sx, sy, z)
        img = img * scene.light[t] + noise_rng.normal(0, scene.noise_std, img.shape)
        yield (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def render(scene: SceneSpec, actions: Optional[np.ndarray] = None) -> np.ndarray:
    """(N, h, w, 3) uint8 frames of `scene`, agent 0 driven by `actions` ((N, 2)) or all agents ((N, A, 2))."""
    return np.stack(list(iter_frames(scene, rollout(scene, actions))))


def counterfactual(cfg: SyntheticConfig, scene_b_seed: int, actions_from_a: np.ndarray,
                   ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Scene B (its background, camera, distractors, start) with agent 0 driven by clip A's actions."""
    scene = make_scene(cfg, scene_b_seed)
    state = rollout(scene, actions_from_a)
    return np.stack(list(iter_frames(scene, state))), sidecar(state, cfg.fps)


def sidecar(state: dict[str, np.ndarray], fps: float) -> dict[str, np.ndarray]:
    """The labels file: `t` float64, everything else float32, one row per frame."""
    n = state["camera"].shape[0]
    out = {"t": np.arange(n, dtype=np.float64) / fps}
    for key, val in state.items():
        out[key] = np.asarray(val, dtype=np.float32)
    out["action"] = out["agent_vel"][:, 0].copy()  # agent 0's action, under the name the simulators use
    return out


# ---------------------------------------------------------------- generation

def video_seed(cfg: SyntheticConfig, index: int) -> int:
    """A scene seed per video: stable under changes of n_videos, distinct across cfg.seed."""
    return int(np.random.SeedSequence([cfg.seed, index]).generate_state(1)[0])


def _write(path: Path, frames: Iterator[np.ndarray] | np.ndarray, labels: dict[str, np.ndarray],
           cfg: SyntheticConfig) -> None:
    write_video(path, frames, cfg.fps, tuple(cfg.size), crf=cfg.crf)
    np.savez(path.with_name(path.stem + ".labels.npz"), **labels)


def val_indices(n: int, val_fraction: float) -> set[int]:
    """The last ceil(n * fraction) videos (at least one when the fraction is positive and n > 1)."""
    k = int(math.ceil(n * val_fraction)) if val_fraction > 0 else 0
    k = min(k, n - 1) if n > 1 else 0
    return set(range(n - k, n))


def generate(cfg: SyntheticConfig, out_dir: str | Path) -> Path:
    """Write videos + sidecars + manifest.parquet (and counterfactuals.parquet); return the manifest path."""
    cfg.validate()
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    val = val_indices(cfg.n_videos, cfg.val_fraction)
    rows, actions = [], {}
    for i in range(cfg.n_videos):
        seed = video_seed(cfg, i)
        scene = make_scene(cfg, seed)
        state = rollout(scene)
        path = out / f"synth_{i:05d}.mp4"
        _write(path, iter_frames(scene, state), sidecar(state, cfg.fps), cfg)
        actions[i] = state["agent_vel"][:, 0]
        rows.append({"path": str(path), "split": "val" if i in val else "train", "episode": i, "seed": seed,
                     "domain": "synthetic", "fps": float(cfg.fps), "n_frames": cfg.n_frames,
                     "width": cfg.size[0], "height": cfg.size[1], "n_agents": cfg.n_agents})
    manifest = out / "manifest.parquet"
    atomic_write_parquet(manifest, pd.DataFrame(rows))
    _write_counterfactuals(cfg, out, sorted(val) or list(range(cfg.n_videos)), rows, actions)
    return manifest


def _write_counterfactuals(cfg: SyntheticConfig, out: Path, pool: list[int], rows: list[dict],
                           actions: dict[int, np.ndarray]) -> None:
    """Pairs (A, B) from `pool`: B's scene driven by A's agent-0 actions. Kept out of manifest.parquet so ingest
    does not train on them; `counterfactuals.parquet` names the action source, the scene and the answer."""
    if cfg.n_counterfactuals == 0 or len(pool) < 2:
        return
    cf_dir = out / "counterfactual"
    cf_dir.mkdir(exist_ok=True)
    cf_rows = []
    pairs = [(a, b) for shift in range(1, len(pool)) for a, b in zip(pool, pool[shift:] + pool[:shift])]
    for j, (a_idx, b_idx) in enumerate(pairs[:cfg.n_counterfactuals]):
        frames, labels = counterfactual(cfg, rows[b_idx]["seed"], actions[a_idx])
        path = cf_dir / f"cf_{j:04d}_a{a_idx:05d}_b{b_idx:05d}.mp4"
        _write(path, frames, labels, cfg)
        cf_rows.append({"path": str(path), "action_source": rows[a_idx]["path"], "scene": rows[b_idx]["path"],
                        "action_episode": a_idx, "scene_episode": b_idx, "scene_seed": rows[b_idx]["seed"],
                        "split": "val", "domain": "synthetic_counterfactual"})
    atomic_write_parquet(out / "counterfactuals.parquet", pd.DataFrame(cf_rows))
