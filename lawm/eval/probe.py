"""Linear probes: how much of the true motion a latent action holds, as held-out R² of a ridge regression.

Closed form in torch (float64): inputs standardised with the training mean/std, targets centred; one SVD of the
training inputs gives the solution for every alpha. Alpha is chosen by K-fold cross-validation on the training set,
the folds split by group (source video) so that overlapping clips of one video never sit on both sides. Scored on
held-out clips: R² = 1 - Σ residual² / Σ (y - mean_val(y))², pooled over the target's dimensions (the share of the
target vector's variance explained; a constant prediction scores ≤ 0).

Targets per latent transition k (representation k -> k+1; with tubelet u, frames (k+1)u-1 -> (k+2)u-1):
- synthetic in-the-wild clips: `agent` (agent 0's displacement, its action), `camera` (pan x, y), `zoom`, and
  `light` (the change of the lighting gain: not motion, but the change that moves every pixel; the demo's latent
  turned out to encode it, R² 0.99, and little of the motion);
- simulators: the per-frame `action` summed over the transition's frames (`align_actions`), split into named parts.
"""
from __future__ import annotations

import numpy as np
import torch

from lawm.models.encoders import align_actions

NOT_MOTION = ("light",)  # targets reported beside the motion targets, left out of the mean
ALPHAS = tuple(float(a) for a in np.logspace(-3, 4, 15))
# names of the simulators' action columns (datasets/sim_nav.py: (v, ω); datasets/sim_manip.py: (dx, dy, dz, grip))
ACTION_PARTS = {"nav": {"v": [0], "omega": [1]}, "manip": {"xyz": [0, 1, 2], "gripper": [3]}}


def _solve(x: torch.Tensor, y: torch.Tensor, alphas) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(mean_x, std_x, mean_y, W) per alpha, for ridge on standardised x (float64)."""
    mx, sx = x.mean(0), x.std(0).clamp_min(1e-8)
    my = y.mean(0)
    xs = (x - mx) / sx
    u, s, vh = torch.linalg.svd(xs, full_matrices=False)
    uty = u.T @ (y - my)
    return [(mx, sx, my, vh.T @ ((s / (s * s + a))[:, None] * uty)) for a in alphas]


def _apply(fit, x: torch.Tensor) -> torch.Tensor:
    mx, sx, my, w = fit
    return ((x - mx) / sx) @ w + my


def r2(y: torch.Tensor, pred: torch.Tensor) -> float:
    """1 - SSE/SST pooled over the columns of y (n, k)."""
    y, pred = y.double(), pred.double()
    sst = (y - y.mean(0)).pow(2).sum()
    return float(1 - (y - pred).pow(2).sum() / sst) if sst > 0 else float("nan")


def _folds(groups: list[str], folds: int) -> torch.Tensor:
    names = sorted(set(groups))
    folds = min(folds, len(names))
    if folds < 2:
        raise ValueError("choosing alpha by cross-validation needs training samples from at least two groups")
    order = np.random.default_rng(0).permutation(len(names))
    fold_of = {names[i]: j % folds for j, i in enumerate(order)}
    return torch.tensor([fold_of[g] for g in groups])


def ridge_probes(x_train: torch.Tensor, ys_train: dict[str, torch.Tensor], groups: list[str], x_val: torch.Tensor,
                 ys_val: dict[str, torch.Tensor], alphas=ALPHAS, folds: int = 5) -> dict[str, dict]:
    """One probe per target (name → (n, k)): fitted on train with its own alpha (the lowest grouped-CV squared
    error), scored on val. One SVD per fold serves every alpha and every target. → name → {"r2", "alpha", "pred"}."""
    x_train, x_val = (t.double().reshape(t.shape[0], -1) for t in (x_train, x_val))
    names = list(ys_train)
    widths = [ys_train[n].reshape(len(x_train), -1).shape[1] for n in names]
    y_train = torch.cat([ys_train[n].double().reshape(len(x_train), -1) for n in names], dim=1)
    y_val = torch.cat([ys_val[n].double().reshape(len(x_val), -1) for n in names], dim=1)
    if len(groups) != len(x_train) or len(y_val) != len(x_val):
        raise ValueError("probe: inputs, targets and groups differ in length")
    if not (torch.isfinite(x_train).all() and torch.isfinite(y_train).all()):
        raise ValueError("probe: non-finite training inputs or targets")
    fold = _folds(groups, folds)
    sse = torch.zeros(len(alphas), y_train.shape[1], dtype=torch.float64)
    for f in range(int(fold.max()) + 1):
        train, test = fold != f, fold == f
        for i, fit in enumerate(_solve(x_train[train], y_train[train], alphas)):
            sse[i] += (_apply(fit, x_train[test]) - y_train[test]).pow(2).sum(0)
    fits = _solve(x_train, y_train, alphas)
    out, col = {}, 0
    for name, width in zip(names, widths):
        cols = slice(col, col + width)
        best = int(sse[:, cols].sum(1).argmin())
        pred = _apply(fits[best], x_val)[:, cols]
        out[name] = {"r2": r2(y_val[:, cols], pred), "alpha": float(alphas[best]), "pred": pred}
        col += width
    return out


def ridge_probe(x_train: torch.Tensor, y_train: torch.Tensor, groups: list[str], x_val: torch.Tensor,
                y_val: torch.Tensor, alphas=ALPHAS) -> dict:
    """One target: fit on train (alpha by grouped CV), score on val: {"r2", "alpha", "pred"}."""
    return ridge_probes(x_train, {"y": y_train}, groups, x_val, {"y": y_val}, alphas)["y"]


def choose_alpha(x: torch.Tensor, y: torch.Tensor, groups: list[str], alphas=ALPHAS, folds: int = 5) -> float:
    """The alpha with the lowest grouped cross-validated squared error."""
    return ridge_probes(x, {"y": y}, groups, x[:1], {"y": y[:1]}, alphas, folds)["y"]["alpha"]


def per_transition(z: torch.Tensor) -> torch.Tensor:
    """Latents (B, T-1, ...) -> probe inputs (B*(T-1), features); per-token latents are flattened."""
    return z.reshape(z.shape[0] * z.shape[1], -1).double()


def synthetic_targets(labels: dict[str, torch.Tensor], tubelet: int, steps: int) -> dict[str, torch.Tensor]:
    """Per-transition true motion of synthetic clips (B*steps, k) from the per-frame labels (B, T, ...)."""
    ends = (torch.arange(steps + 1) + 1) * tubelet - 1  # the last frame of each representation
    pos = labels["agent_pos"][:, ends, 0].double()  # agent 0, (B, steps+1, 2)
    cam = labels["camera"][:, ends].double()  # x, y, zoom
    flat = lambda v: v.reshape(v.shape[0] * steps, -1)  # noqa: E731
    out = {"agent": flat(pos.diff(dim=1)), "camera": flat(cam[..., :2].diff(dim=1)),
           "zoom": flat(cam[..., 2:].diff(dim=1))}
    if "light" in labels:  # the lighting gain's change: not motion, but a change every pixel shows
        out["light"] = flat(labels["light"][:, ends].double()[..., None].diff(dim=1))
    return out


def action_targets(labels: dict[str, torch.Tensor], tubelet: int, steps: int, domain: str) -> dict[str, torch.Tensor]:
    """Per-transition simulator commands (row t of `action` moves frame t -> t+1), summed over the transition."""
    actions = align_actions(labels["action"].double()[:, :-1], tubelet)[:, :steps]
    flat = actions.reshape(actions.shape[0] * steps, -1)
    return {name: flat[:, cols] for name, cols in ACTION_PARTS[domain].items() if max(cols) < flat.shape[1]}
