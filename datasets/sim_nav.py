"""RECON-like navigation: a Husky explores a walled, cluttered room, seen by a camera on its body.

The robot moves kinematically as a unicycle under (v, ω) held for one 4 Hz step, checked for contact in 4
sub-steps: it stops at the last free sub-step when it would hit something (`collided` = 1 for that step). So
outside collisions, integrating the logged commands reproduces the logged poses exactly (up to float32).
Commands are rounded to float32 before they are applied, so the logged action is the applied one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lawm.config import require
from lawm_datasets import simcommon as sc

SUBSTEPS = 4
DOMAIN = 1  # seeds differ from the manipulation simulator's


@dataclass(kw_only=True)
class NavConfig:
    enabled: bool = True
    episodes: int = 8
    steps: int = 32  # commands per episode; the video has steps + 1 frames
    width: int = 96
    height: int = 96
    seed: int = 0
    val_fraction: float = 0.25
    n_objects: int = 12
    arena: float = 4.0  # half-size of the square room, metres
    max_v: float = 0.8  # m/s
    max_w: float = 1.2  # rad/s
    fov: float = 75.0
    goal_steps: int = 8  # the env's goal lies this many policy steps ahead (NWM: 8 steps = 2 s)

    def validate(self) -> None:
        require(self.episodes >= 0, "episodes", "must be >= 0")
        require(self.steps >= 1, "steps", "must be >= 1")
        require(self.width >= 16 and self.height >= 16 and self.width % 2 == 0 and self.height % 2 == 0,
                "width", "width and height must be even and >= 16")
        require(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        require(self.arena >= 2.0, "arena", "must be >= 2 m")


def unicycle(pose: np.ndarray, v: float, w: float, dt: float) -> np.ndarray:
    """Exact pose after holding (v, ω) for dt seconds; yaw wrapped to [-π, π)."""
    x, y, th = pose
    if abs(w) < 1e-9:
        x, y = x + v * dt * math.cos(th), y + v * dt * math.sin(th)
    else:
        x += v / w * (math.sin(th + w * dt) - math.sin(th))
        y += v / w * (math.cos(th) - math.cos(th + w * dt))
    th = (th + w * dt + math.pi) % (2 * math.pi) - math.pi
    return np.array([x, y, th])


class NavWorld(sc.PybulletWorld):
    """One room with a Husky in it. Owns its pybullet client."""

    def __init__(self, cfg: NavConfig):
        self.cfg = cfg
        super().__init__("lawm-nav-tex-")
        self.pose = np.zeros(3)
        self.obstacles: list[int] = []

    # ---- scene
    def build(self, seed: int) -> None:
        c, cfg = self.client, self.cfg
        rng = np.random.default_rng(seed)
        with sc.quiet_fds():
            c.resetSimulation()
            floor = c.loadURDF("plane.urdf")
            c.changeVisualShape(floor, -1, textureUniqueId=sc.load_texture(c, sc.texture_image(rng), self._tex_dir),
                                rgbaColor=[1, 1, 1, 1])
            self.robot = c.loadURDF("husky/husky.urdf", [0, 0, 0.15])
        self.obstacles = self._walls(rng) + [self._object(rng) for _ in range(cfg.n_objects)]
        self.pose = self._free_pose(rng)
        self._place(self.pose)

    def _walls(self, rng: np.random.Generator) -> list[int]:
        c, half = self.client, self.cfg.arena
        tex = sc.load_texture(c, sc.texture_image(rng), self._tex_dir)
        ids = []
        for (x, y, sx, sy) in [(half, 0, 0.1, half), (-half, 0, 0.1, half), (0, half, half, 0.1), (0, -half, half, 0.1)]:
            col = c.createCollisionShape(c.GEOM_BOX, halfExtents=[sx, sy, 0.6])
            vis = c.createVisualShape(c.GEOM_BOX, halfExtents=[sx, sy, 0.6], rgbaColor=[1, 1, 1, 1])
            body = c.createMultiBody(0, col, vis, [x, y, 0.6])
            c.changeVisualShape(body, -1, textureUniqueId=tex)
            ids.append(body)
        return ids

    def _object(self, rng: np.random.Generator) -> int:
        c, half = self.client, self.cfg.arena - 0.6
        x, y = rng.uniform(-half, half, 2)
        yaw = rng.uniform(-math.pi, math.pi)
        orn = c.getQuaternionFromEuler([0, 0, yaw])
        kind = rng.integers(0, 5)
        if kind >= 3:  # a model from pybullet_data, scaled up to be a real obstacle
            name, scale, z = [("duck_vhacd.urdf", 4.0, 0.0), ("teddy_vhacd.urdf", 4.0, 0.0),
                              ("soccerball.urdf", 0.7, 0.35), ("table/table.urdf", 0.8, 0.0)][rng.integers(0, 4)]
            with sc.quiet_fds():
                body = c.loadURDF(name, [x, y, z], orn, globalScaling=scale, useFixedBase=True)
            return body
        size = rng.uniform(0.15, 0.5, 3)
        rgba = [*rng.uniform(0.1, 1.0, 3), 1.0]
        if kind == 0:
            col = c.createCollisionShape(c.GEOM_BOX, halfExtents=size.tolist())
            vis = c.createVisualShape(c.GEOM_BOX, halfExtents=size.tolist(), rgbaColor=rgba)
            z = size[2]
        elif kind == 1:
            col = c.createCollisionShape(c.GEOM_CYLINDER, radius=size[0], height=2 * size[2] + 0.3)
            vis = c.createVisualShape(c.GEOM_CYLINDER, radius=size[0], length=2 * size[2] + 0.3, rgbaColor=rgba)
            z = size[2] + 0.15
        else:
            col = c.createCollisionShape(c.GEOM_SPHERE, radius=size[0] + 0.1)
            vis = c.createVisualShape(c.GEOM_SPHERE, radius=size[0] + 0.1, rgbaColor=rgba)
            z = size[0] + 0.1
        body = c.createMultiBody(0, col, vis, [x, y, z], orn)
        if rng.random() < 0.5:
            c.changeVisualShape(body, -1, textureUniqueId=sc.load_texture(c, sc.texture_image(rng, 32), self._tex_dir),
                                rgbaColor=[1, 1, 1, 1])
        return body

    def _free_pose(self, rng: np.random.Generator) -> np.ndarray:
        half = self.cfg.arena - 0.8
        for _ in range(200):
            pose = np.array([*rng.uniform(-half, half, 2), rng.uniform(-math.pi, math.pi)])
            self._place(pose)
            if not self._hits(margin=0.3):
                return pose
        raise RuntimeError("no free start pose in the room")

    # ---- motion
    def _place(self, pose: np.ndarray) -> None:
        orn = self.client.getQuaternionFromEuler([0, 0, float(pose[2])])
        self.client.resetBasePositionAndOrientation(self.robot, [float(pose[0]), float(pose[1]), 0.15], orn)

    def _hits(self, margin: float = 0.0) -> bool:
        return any(self.client.getClosestPoints(self.robot, ob, margin) for ob in self.obstacles)

    def apply(self, v: float, w: float) -> bool:
        """Hold (v, ω) for one control step; return True when a contact stopped the robot."""
        dt = 1.0 / sc.CONTROL_HZ / SUBSTEPS
        start = self.pose
        for k in range(1, SUBSTEPS + 1):
            cand = unicycle(start, v, w, k * dt)  # from the step's start, so free steps are one exact arc
            self._place(cand)
            if self._hits():
                self._place(self.pose)
                return True
            self.pose = cand
        return False

    def render(self, pose: np.ndarray | None = None) -> np.ndarray:
        cfg = self.cfg
        x, y, th = self.pose if pose is None else pose
        fwd = np.array([math.cos(th), math.sin(th)])
        eye = [x + 0.35 * fwd[0], y + 0.35 * fwd[1], 0.6]
        target = [eye[0] + fwd[0], eye[1] + fwd[1], 0.5]
        view = self.client.computeViewMatrix(eye, target, [0, 0, 1])
        proj = self.client.computeProjectionMatrixFOV(cfg.fov, cfg.width / cfg.height, 0.05, 3 * cfg.arena)
        return sc.camera_rgb(self.client, cfg.width, cfg.height, view, proj)


class ExplorePolicy:
    """Smooth random commands like a teleoperated or exploring robot: cruise, turn on the spot, stop,
    and back off after a bump."""

    def __init__(self, cfg: NavConfig, rng: np.random.Generator):
        self.cfg, self.rng = cfg, rng
        self.cmd = np.zeros(2)
        self.mode, self.left, self.target = "stop", 0, np.zeros(2)

    def _new_mode(self, collided: bool) -> None:
        r, cfg = self.rng, self.cfg
        if collided:
            self.mode, self.left = "back", int(r.integers(2, 4))
            self.target = np.array([-0.3 * cfg.max_v, r.choice([-1, 1]) * 0.5 * cfg.max_w])
            return
        after_bump = self.mode == "back"  # turn away before cruising again
        self.mode = "turn" if after_bump else r.choice(["cruise", "turn", "stop"], p=[0.65, 0.25, 0.10])
        if self.mode == "cruise":
            self.left = int(r.integers(4, 16))
            self.target = np.array([r.uniform(0.3, 1.0) * cfg.max_v, r.normal(0, 0.25) * cfg.max_w])
        elif self.mode == "turn":
            self.left = int(r.integers(3, 7)) if after_bump else int(r.integers(2, 7))
            self.target = np.array([r.uniform(0, 0.1) * cfg.max_v, r.choice([-1, 1]) * r.uniform(0.5, 1) * cfg.max_w])
        else:
            self.left, self.target = int(r.integers(1, 5)), np.zeros(2)

    def __call__(self, collided: bool) -> np.ndarray:
        if collided and self.mode != "back" or self.left <= 0:
            self._new_mode(collided)
        self.left -= 1
        if self.mode == "cruise":  # wander: the steering drifts while cruising
            self.target[1] = np.clip(self.target[1] + self.rng.normal(0, 0.15) * self.cfg.max_w,
                                     -self.cfg.max_w, self.cfg.max_w)
        self.cmd = 0.5 * self.cmd + 0.5 * self.target
        lim = np.array([self.cfg.max_v, self.cfg.max_w])
        return np.clip(self.cmd, -lim, lim).astype(np.float32).astype(np.float64)


def run_episode(cfg: NavConfig, seed: int, world: NavWorld | None = None) -> tuple[list[np.ndarray], dict]:
    """Frames (steps + 1) and per-frame labels: action (v, ω), pose (x, y, yaw), collided."""
    own = world is None
    world = world or NavWorld(cfg)
    try:
        world.build(seed)
        policy = ExplorePolicy(cfg, np.random.default_rng([seed, 1]))
        n = cfg.steps + 1
        action, pose, collided = np.zeros((n, 2)), np.zeros((n, 3)), np.zeros(n)
        frames = [world.render()]
        pose[0] = world.pose
        bumped = False
        for i in range(cfg.steps):
            action[i] = policy(bumped)
            bumped = world.apply(*action[i])
            collided[i] = bumped
            pose[i + 1] = world.pose
            frames.append(world.render())
        return frames, {"action": action, "pose": pose, "collided": collided}
    finally:
        if own:
            world.close()


def _episode_task(cfg: NavConfig, index: int, out_dir: str, split: str) -> list[dict[str, Any]]:
    seed = sc.episode_seed(cfg.seed, DOMAIN, index)
    frames, labels = run_episode(cfg, seed)
    path = Path(out_dir) / f"nav_{index:05d}.mp4"
    sc.write_episode(path, frames, labels, sc.CONTROL_HZ)
    return [{"path": str(path), "split": split, "episode": index, "seed": seed, "domain": "sim_nav",
             "fps": sc.CONTROL_HZ, "n_frames": len(frames), "width": cfg.width, "height": cfg.height,
             "collisions": int(labels["collided"].sum())}]


def generate(cfg: NavConfig, out_dir: str | Path, use_ray: bool = True, num_cpus: int = 0) -> Path:
    """Write nav_XXXXX.mp4 + sidecars + manifest.parquet into out_dir; return the manifest path."""
    return sc.generate_episodes(cfg, _episode_task, out_dir, use_ray, num_cpus)


class NavEnv:
    """Gymnasium-style navigation for closed-loop planning: reach the pose seen in `info["goal_image"]`."""

    def __init__(self, cfg: NavConfig | None = None, max_steps: int = 32, goal_radius: float = 0.5):
        self.cfg = cfg or NavConfig()
        self.max_steps, self.goal_radius = max_steps, goal_radius
        self.world = NavWorld(self.cfg)
        self.t = 0
        self.goal = np.zeros(3)

    def reset(self, seed: int = 0) -> tuple[np.ndarray, dict]:
        self.world.build(seed)
        start = self.world.pose.copy()
        policy = ExplorePolicy(self.cfg, np.random.default_rng([seed, 2]))
        bumped = False
        for _ in range(self.cfg.goal_steps):  # the goal is where exploring would have taken the robot
            bumped = self.world.apply(*policy(bumped))
        self.goal = self.world.pose.copy()
        goal_image = self.world.render()
        self.world.pose = start
        self.world._place(start)
        self.t = 0
        return self.world.render(), self._info(goal_image=goal_image)

    def _info(self, **extra) -> dict:
        return {"pose": self.world.pose.copy(), "goal_pose": self.goal.copy(),
                "distance": float(np.linalg.norm(self.world.pose[:2] - self.goal[:2])), **extra}

    def step(self, action) -> tuple[np.ndarray, float, bool, bool, dict]:
        lim = np.array([self.cfg.max_v, self.cfg.max_w])
        v, w = np.clip(np.asarray(action, dtype=np.float64), -lim, lim)
        collided = self.world.apply(v, w)
        self.t += 1
        info = self._info(collided=collided)
        return (self.world.render(), -info["distance"], info["distance"] < self.goal_radius,
                self.t >= self.max_steps, info)

    def close(self) -> None:
        self.world.close()
