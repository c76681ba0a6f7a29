"""Planning metrics, defined as the protocols the paper follows define them.

- `ate` (NWM, evo APE on translation): RMSE over poses of |p_i - q_i|, with no alignment and no scale
  correction, positions divided by the waypoint spacing (RECON: 0.25 m) so the result is in waypoint units.
- `rpe` (NWM, evo RPE on translation, delta = 1 frame): for each consecutive pair, the translation of
  E_i = (Q_i^-1 Q_i+1)^-1 (P_i^-1 P_i+1) in SE(2), RMSE over pairs, same units. Since a rotation keeps lengths,
  |t(E_i)| = |R(-yaw^est_i)(p_i+1 - p_i) - R(-yaw^gt_i)(q_i+1 - q_i)|: each step's motion seen from its own pose.
- `delta_xyz` (jepa-wms DROID): |Σ_t a_plan[t, :3] - Σ_t a_true[t, :3]|_1, in the actions' units (metres).

Poses are arrays (T, 3) of (x, y, yaw) in metres and radians.
"""
from __future__ import annotations

import numpy as np


def _check(est: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    est, gt = np.asarray(est, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    if est.shape != gt.shape or est.ndim != 2 or est.shape[1] != 3 or len(est) < 1:
        raise ValueError(f"poses must both be (T, 3) (x, y, yaw), got {est.shape} and {gt.shape}")
    return est, gt


def ate(est: np.ndarray, gt: np.ndarray, spacing: float = 1.0) -> float:
    """Absolute trajectory error (translation RMSE, no alignment, no scale) in units of `spacing`."""
    est, gt = _check(est, gt)
    if spacing <= 0:
        raise ValueError("waypoint spacing must be positive")
    err = np.linalg.norm(est[:, :2] - gt[:, :2], axis=1) / spacing
    return float(np.sqrt(np.mean(err**2)))


def _local_steps(poses: np.ndarray) -> np.ndarray:
    """Each step's translation (p_i+1 - p_i) expressed in the frame of pose i, (T-1, 2)."""
    d = poses[1:, :2] - poses[:-1, :2]
    c, s = np.cos(poses[:-1, 2]), np.sin(poses[:-1, 2])
    return np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]], axis=1)


def rpe(est: np.ndarray, gt: np.ndarray, spacing: float = 1.0) -> float:
    """Relative pose error over one step (translation RMSE) in units of `spacing`; 0 for a single pose."""
    est, gt = _check(est, gt)
    if spacing <= 0:
        raise ValueError("waypoint spacing must be positive")
    if len(est) < 2:
        return 0.0
    err = np.linalg.norm(_local_steps(est) - _local_steps(gt), axis=1) / spacing
    return float(np.sqrt(np.mean(err**2)))


def delta_xyz(plan: np.ndarray, true: np.ndarray) -> float:
    """|Σ a_plan - Σ a_true|_1 over the first three action dimensions (x, y, z)."""
    plan, true = np.asarray(plan, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if plan.ndim != 2 or true.ndim != 2 or plan.shape[1] < 3 or true.shape[1] < 3:
        raise ValueError(f"actions must be (T, A>=3), got {plan.shape} and {true.shape}")
    return float(np.abs(plan[:, :3].sum(0) - true[:, :3].sum(0)).sum())
