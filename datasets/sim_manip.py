"""DROID-like manipulation: a Franka Panda reaches and pushes objects on a table, seen by fixed cameras.

Actions are end-effector Cartesian deltas (dx, dy, dz) in metres plus an absolute gripper command
(0 open .. 1 closed, as DROID's gripper_position), held for one 4 Hz step. The commanded delta is clipped to
the workspace before it is logged, so the logged action is the one executed; the arm follows it through IK
and position control in 60 physics sub-steps (240 Hz). Gripper state is measured from the finger joints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lawm.config import require
from lawm_datasets import simcommon as sc

DOMAIN = 2
EE_LINK = 11  # panda_grasptarget: between the finger tips
FINGERS = (9, 10)
ARM = tuple(range(7))
HOME = (0.0, -0.3, 0.0, -2.2, 0.0, 1.9, 0.785)
PHYSICS_HZ = 240
WORKSPACE_LO = np.array([0.30, -0.30, 0.03])
WORKSPACE_HI = np.array([0.75, 0.30, 0.35])
TABLE_Z = -0.626  # table base so that its top is at z = 0


@dataclass(kw_only=True)
class ManipConfig:
    enabled: bool = True
    episodes: int = 8
    steps: int = 32  # actions per episode; each video has steps + 1 frames
    width: int = 96
    height: int = 96
    cameras: int = 1  # 1: front view; 2: front + side (two videos per episode, same labels)
    # Camera 0: "exterior" (fixed per episode, jittered across episodes) or "wrist" (rides on the hand, as DROID's
    # wrist camera, looking down at the table ahead of the fingers; then camera 1, when asked for, is the front view).
    view: str = "exterior"
    seed: int = 0
    val_fraction: float = 0.25
    n_objects: int = 3
    max_delta: float = 0.04  # metres per step and axis (0.16 m/s)
    fov: float = 60.0
    goal_steps: int = 3  # the env's goal lies this many policy steps ahead (DROID planning horizon 3)

    def validate(self) -> None:
        require(self.episodes >= 0, "episodes", "must be >= 0")
        require(self.steps >= 1, "steps", "must be >= 1")
        require(self.width >= 16 and self.height >= 16 and self.width % 2 == 0 and self.height % 2 == 0,
                "width", "width and height must be even and >= 16")
        require(self.cameras in (1, 2), "cameras", "must be 1 or 2")
        require(self.view in ("exterior", "wrist"), "view", f"{self.view!r}: must be 'exterior' or 'wrist'")
        require(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        require(0.0 < self.max_delta <= 0.1, "max_delta", "must be in (0, 0.1] m")
        require(1 <= self.n_objects <= 6, "n_objects", "must be 1..6")


class ManipWorld(sc.PybulletWorld):
    """A table, a Panda and a few objects. Owns its pybullet client."""

    def __init__(self, cfg: ManipConfig):
        self.cfg = cfg
        super().__init__("lawm-manip-tex-")
        self.objects: list[int] = []
        self.cams: list[tuple[list[float], list[float]] | None] = []  # None: the wrist camera, placed per frame
        self.touching = False

    def build(self, seed: int) -> None:
        c, cfg = self.client, self.cfg
        rng = np.random.default_rng(seed)
        with sc.quiet_fds():
            c.resetSimulation()
            c.setGravity(0, 0, -9.81)
            c.setTimeStep(1.0 / PHYSICS_HZ)
            floor = c.loadURDF("plane.urdf", [0, 0, TABLE_Z])
            table = c.loadURDF("table/table.urdf", [0.5, 0, TABLE_Z], useFixedBase=True)
            self.robot = c.loadURDF("franka_panda/panda.urdf", [0, 0, 0], useFixedBase=True)
        for body, size in ((floor, 64), (table, 32)):
            c.changeVisualShape(body, -1, textureUniqueId=sc.load_texture(c, sc.texture_image(rng, size), self._tex_dir),
                                rgbaColor=[1, 1, 1, 1])
        for j, q in zip(ARM, HOME):
            c.resetJointState(self.robot, j, q)
        for j in FINGERS:
            c.resetJointState(self.robot, j, 0.04)
        self.objects = []  # the old ids died with resetSimulation (a second build() used to crash on them)
        self.objects = [self._object(rng, k) for k in range(cfg.n_objects)]
        exterior = [self._camera(rng, k) for k in range(cfg.cameras)]  # drawn either way: same scene per seed
        self.cams = [None] + exterior[:cfg.cameras - 1] if cfg.view == "wrist" else exterior
        self.gripper_cmd = 0.0
        start = rng.uniform(WORKSPACE_LO + [0.05, 0.05, 0.12], WORKSPACE_HI - 0.05)
        for _ in range(3):  # bring the hand into the workspace and let the objects settle
            self._hold(start, 0.0, PHYSICS_HZ // 4)

    def _object(self, rng: np.random.Generator, k: int) -> int:
        c = self.client
        for _ in range(50):  # objects apart from each other
            xy = rng.uniform([0.4, -0.22], [0.68, 0.22])
            if all(np.linalg.norm(xy - np.array(c.getBasePositionAndOrientation(o)[0][:2])) > 0.1 for o in self.objects):
                break
        half = rng.uniform(0.025, 0.045, 3)
        rgba = [*rng.uniform(0.05, 1.0, 3), 1.0]
        if k % 2 == 0:
            col = c.createCollisionShape(c.GEOM_BOX, halfExtents=half.tolist())
            vis = c.createVisualShape(c.GEOM_BOX, halfExtents=half.tolist(), rgbaColor=rgba)
        else:
            col = c.createCollisionShape(c.GEOM_CYLINDER, radius=half[0], height=2 * half[2])
            vis = c.createVisualShape(c.GEOM_CYLINDER, radius=half[0], length=2 * half[2], rgbaColor=rgba)
        orn = c.getQuaternionFromEuler([0, 0, rng.uniform(-math.pi, math.pi)])
        body = c.createMultiBody(0.4, col, vis, [xy[0], xy[1], half[2] + 0.002], orn)
        # damping: a pushed object slides a little and stops, instead of skating off the table
        c.changeDynamics(body, -1, lateralFriction=0.8, linearDamping=3.0, angularDamping=3.0)
        return body

    def _camera(self, rng: np.random.Generator, k: int) -> tuple[list[float], list[float]]:
        """A fixed view per episode, jittered across episodes like DROID's varied camera placements."""
        c, cfg = self.client, self.cfg
        eye = np.array([1.15, 0.0, 0.75]) if k == 0 else np.array([0.45, -0.9, 0.6])
        eye = eye + rng.uniform(-0.08, 0.08, 3)
        target = np.array([0.4, 0.0, 0.15]) + rng.uniform(-0.04, 0.04, 3)
        view = c.computeViewMatrix(eye.tolist(), target.tolist(), [0, 0, 1])
        proj = c.computeProjectionMatrixFOV(cfg.fov, cfg.width / cfg.height, 0.05, 5.0)
        return view, proj

    # ---- state
    def ee_pos(self) -> np.ndarray:
        return np.array(self.client.getLinkState(self.robot, EE_LINK, computeForwardKinematics=True)[4])

    def gripper(self) -> float:
        """Measured closure: 0 fully open (fingers at 0.04 m), 1 closed."""
        q = [self.client.getJointState(self.robot, j)[0] for j in FINGERS]
        return float(np.clip(1.0 - np.mean(q) / 0.04, 0.0, 1.0))

    def object_pos(self) -> np.ndarray:
        return np.array([self.client.getBasePositionAndOrientation(o)[0] for o in self.objects])

    # ---- control
    def _hold(self, target: np.ndarray, grip: float, substeps: int) -> None:
        c = self.client
        down = c.getQuaternionFromEuler([math.pi, 0, 0])
        q = c.calculateInverseKinematics(self.robot, EE_LINK, target.tolist(), down, maxNumIterations=60,
                                         residualThreshold=1e-5, restPoses=list(HOME) + [0.04, 0.04])
        c.setJointMotorControlArray(self.robot, ARM, c.POSITION_CONTROL, targetPositions=list(q[:7]),
                                    forces=[200.0] * 7, positionGains=[0.2] * 7)
        c.setJointMotorControlArray(self.robot, FINGERS, c.POSITION_CONTROL,
                                    targetPositions=[0.04 * (1 - grip)] * 2, forces=[40.0] * 2)
        for _ in range(substeps):
            c.stepSimulation()

    def apply(self, action: np.ndarray) -> np.ndarray:
        """Execute one step; returns the action actually commanded (delta clipped to the workspace), float32-exact."""
        ee = self.ee_pos()
        target = np.clip(ee + np.clip(action[:3], -self.cfg.max_delta, self.cfg.max_delta),
                         WORKSPACE_LO, WORKSPACE_HI)
        done = np.concatenate([target - ee, [np.clip(action[3], 0, 1)]]).astype(np.float32).astype(np.float64)
        target = ee + done[:3]
        per = PHYSICS_HZ // int(sc.CONTROL_HZ)
        self.touching = False
        for _ in range(2):  # re-solve IK once halfway: the solver is better from a closer start
            self._hold(target, done[3], per // 2)
            self.touching |= self._hand_contact()
        return done

    def _hand_contact(self) -> bool:
        """Hand or fingers touching anything: then the arm may lag its command (pushing, pressing)."""
        return any(pt[3] >= 8 for pt in self.client.getContactPoints(bodyA=self.robot))

    def _wrist(self) -> tuple[list[float], list[float]]:
        """On the hand's front, above the finger tips, looking forward and down at the table ahead of them; the hand
        keeps its orientation (IK holds it pointing down), so the camera only translates with the commanded deltas."""
        ee = self.ee_pos()
        view = self.client.computeViewMatrix((ee + [0.05, 0.0, 0.08]).tolist(), (ee + [0.20, 0.0, -0.08]).tolist(),
                                             [0, 0, 1])
        proj = self.client.computeProjectionMatrixFOV(self.cfg.fov, self.cfg.width / self.cfg.height, 0.02, 5.0)
        return view, proj

    def render(self) -> list[np.ndarray]:
        return [sc.camera_rgb(self.client, self.cfg.width, self.cfg.height, *(cam or self._wrist()))
                for cam in self.cams]


class ReachPushPolicy:
    """Scripted behaviour: reach random points, or push an object through along a random direction."""

    def __init__(self, cfg: ManipConfig, world: ManipWorld, rng: np.random.Generator):
        self.cfg, self.world, self.rng = cfg, world, rng
        self.waypoints: list[tuple[np.ndarray, float]] = []

    def _plan(self) -> None:
        r = self.rng
        if r.random() < 0.6:
            obj = self.world.object_pos()[r.integers(0, len(self.world.objects))]
            ang = r.uniform(-math.pi, math.pi)
            d = np.array([math.cos(ang), math.sin(ang), 0.0])
            low = np.array([obj[0], obj[1], 0.03])
            self.waypoints = [(low - 0.1 * d + [0, 0, 0.1], 1.0), (low - 0.08 * d, 1.0),
                              (low + 0.12 * d, 1.0), (low + 0.12 * d + [0, 0, 0.12], 1.0)]
        else:
            self.waypoints = [(r.uniform(WORKSPACE_LO, WORKSPACE_HI), float(r.random() < 0.5))
                              for _ in range(int(r.integers(1, 3)))]

    def __call__(self) -> np.ndarray:
        ee = self.world.ee_pos()
        while not self.waypoints or np.linalg.norm(self.waypoints[0][0] - ee) < 0.015:
            if self.waypoints:
                self.waypoints.pop(0)
            if not self.waypoints:
                self._plan()
        goal, grip = self.waypoints[0]
        delta = np.clip(goal - ee, -self.cfg.max_delta, self.cfg.max_delta) + self.rng.normal(0, 0.003, 3)
        return np.concatenate([delta, [grip]])


def run_episode(cfg: ManipConfig, seed: int, world: ManipWorld | None = None,
                ) -> tuple[list[list[np.ndarray]], dict]:
    """Frames per camera (steps + 1 each) and labels: action (dx, dy, dz, grip), ee_pos, gripper, object_pos,
    contact (1 when the hand touched something during step i)."""
    own = world is None
    world = world or ManipWorld(cfg)
    try:
        world.build(seed)
        policy = ReachPushPolicy(cfg, world, np.random.default_rng([seed, 1]))
        n = cfg.steps + 1
        action, ee = np.zeros((n, 4)), np.zeros((n, 3))
        grip, objs, contact = np.zeros(n), np.zeros((n, cfg.n_objects, 3)), np.zeros(n)
        views = [[f] for f in world.render()]
        for i in range(n):
            ee[i], grip[i], objs[i] = world.ee_pos(), world.gripper(), world.object_pos()
            if i == cfg.steps:
                break
            action[i] = world.apply(policy())
            contact[i] = world.touching
            for cam, frame in zip(views, world.render()):
                cam.append(frame)
        return views, {"action": action, "ee_pos": ee, "gripper": grip, "object_pos": objs, "contact": contact}
    finally:
        if own:
            world.close()


def _episode_task(cfg: ManipConfig, index: int, out_dir: str, split: str) -> list[dict[str, Any]]:
    seed = sc.episode_seed(cfg.seed, DOMAIN, index)
    views, labels = run_episode(cfg, seed)
    rows = []
    for cam, frames in enumerate(views):
        path = Path(out_dir) / f"manip_{index:05d}_cam{cam}.mp4"
        sc.write_episode(path, frames, labels, sc.CONTROL_HZ)
        rows.append({"path": str(path), "split": split, "episode": index, "seed": seed, "domain": "sim_manip",
                     "camera": cam, "view": cfg.view if cam == 0 else "exterior", "fps": sc.CONTROL_HZ,
                     "n_frames": len(frames), "width": cfg.width, "height": cfg.height})
    return rows


def generate(cfg: ManipConfig, out_dir: str | Path, use_ray: bool = True, num_cpus: int = 0) -> Path:
    """Write manip_XXXXX_camK.mp4 + sidecars + manifest.parquet into out_dir; return the manifest path."""
    return sc.generate_episodes(cfg, _episode_task, out_dir, use_ray, num_cpus)


class ManipEnv:
    """Gymnasium-style manipulation for closed-loop planning: reach the state seen in `info["goal_image"]`
    (camera 0). The goal is where the scripted policy would be `goal_steps` steps later."""

    def __init__(self, cfg: ManipConfig | None = None, max_steps: int = 16, goal_radius: float = 0.03):
        self.cfg = cfg or ManipConfig()
        self.max_steps, self.goal_radius = max_steps, goal_radius
        self.world = ManipWorld(self.cfg)
        self.t = 0
        self.goal = np.zeros(3)

    def reset(self, seed: int = 0) -> tuple[np.ndarray, dict]:
        self.world.build(seed)
        state = self.world.client.saveState()
        policy = ReachPushPolicy(self.cfg, self.world, np.random.default_rng([seed, 2]))
        for _ in range(self.cfg.goal_steps):
            self.world.apply(policy())
        self.goal = self.world.ee_pos()
        goal_objects = self.world.object_pos()
        goal_image = self.world.render()[0]
        self.world.client.restoreState(state)
        self.world.client.removeState(state)
        self.t = 0
        return self.world.render()[0], self._info(goal_image=goal_image, goal_object_pos=goal_objects)

    def _info(self, **extra) -> dict:
        ee = self.world.ee_pos()
        return {"ee_pos": ee, "goal_ee_pos": self.goal.copy(), "gripper": self.world.gripper(),
                "distance": float(np.linalg.norm(ee - self.goal)), **extra}

    def step(self, action) -> tuple[np.ndarray, float, bool, bool, dict]:
        done = self.world.apply(np.asarray(action, dtype=np.float64))
        self.t += 1
        info = self._info(applied_action=done)
        return (self.world.render()[0], -info["distance"], info["distance"] < self.goal_radius,
                self.t >= self.max_steps, info)

    def close(self) -> None:
        self.world.close()
