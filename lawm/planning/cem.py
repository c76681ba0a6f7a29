"""Cross-entropy method over action sequences, every candidate of an iteration scored in ONE batched call.

    result = cem(cost, low, high, CEMConfig(samples=300, elites=10, iterations=15, horizon=3), generator=g)

`cost(actions)` takes candidates (S, H, A) in real action units (on the CPU) and returns (S,) costs on any device;
it is the whole batched world-model rollout plus the distance to the goal. The search runs in a normalised space
where each action dimension's bounds [low, high] map to [-1, 1]: it starts at the centre of the box with standard
deviation `init_std` (the paper's "mean 0, variance 1" when bounds are symmetric and init_std = 1), samples are
clipped to the box, the `elites` lowest-cost samples refit mean and std, and the best candidate ever scored is
returned.
With `hold`, one action is drawn per candidate and held over the whole horizon (NWM's straight-line candidates).
`batch` > 0 splits an iteration's candidates into rollouts of that many (1 = a loop over candidates; the bench's
baseline). Seeded through `generator`: the same generator state gives the same plan.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lawm.config import require


@dataclass(kw_only=True)
class CEMConfig:
    samples: int = 300  # candidates per iteration (jepa-wms DROID: 300; NWM: 120)
    elites: int = 10  # lowest-cost candidates that refit the distribution (jepa-wms: 10; NWM topk: 5)
    iterations: int = 15  # jepa-wms: 15; NWM: 1
    horizon: int = 3  # actions per candidate (DROID: 3; NWM: 8)
    hold: bool = False  # one action held over the horizon (NWM's straight-line candidates)
    init_std: float = 1.0  # initial std in half-ranges of each dimension's bounds
    min_std: float = 1e-3  # floor of the refitted std (normalised units), so the search never freezes
    momentum: float = 0.0  # new mean/std = momentum * old + (1 - momentum) * elite fit
    batch: int = 0  # candidates per cost call; 0 = all of an iteration in one batched rollout

    def validate(self) -> None:
        require(self.samples >= 1, "samples", "must be >= 1")
        require(1 <= self.elites <= self.samples, "elites", "must be in [1, samples]")
        require(self.iterations >= 1, "iterations", "must be >= 1")
        require(self.horizon >= 1, "horizon", "must be >= 1")
        require(self.init_std > 0 and self.min_std >= 0, "init_std", "must be positive (min_std >= 0)")
        require(0.0 <= self.momentum < 1.0, "momentum", "must be in [0, 1)")
        require(self.batch >= 0, "batch", "must be >= 0 (0 = all candidates at once)")


@dataclass
class CEMResult:
    actions: torch.Tensor  # (H, A) real units: the lowest-cost candidate scored
    cost: float
    costs: list[float]  # best cost after each iteration (non-increasing)
    evaluations: int  # candidates scored


def _score(cost: Callable[[torch.Tensor], torch.Tensor], cand: torch.Tensor, batch: int) -> torch.Tensor:
    if batch <= 0 or batch >= len(cand):
        out = cost(cand)
    else:
        out = torch.cat([cost(cand[i : i + batch]) for i in range(0, len(cand), batch)])
    out = out.detach().float().reshape(-1).cpu()  # the search itself lives on the CPU: S numbers
    if out.shape[0] != cand.shape[0]:
        raise ValueError(f"cost returned {out.shape[0]} values for {cand.shape[0]} candidates")
    # a non-finite cost (a diverged rollout) must never be chosen
    return torch.nan_to_num(out, nan=float("inf"), posinf=float("inf"), neginf=float("inf"))


def cem(cost: Callable[[torch.Tensor], torch.Tensor], low: torch.Tensor, high: torch.Tensor, cfg: CEMConfig,
        generator: torch.Generator | None = None) -> CEMResult:
    """Minimise `cost` over action sequences (H, A) inside the box [low, high] (each (A,))."""
    cfg.validate()
    low, high = torch.as_tensor(low, dtype=torch.float32), torch.as_tensor(high, dtype=torch.float32)
    if low.ndim != 1 or low.shape != high.shape or not bool((high > low).all()):
        raise ValueError("action bounds: low and high must be (A,) with high > low in every dimension")
    centre, half = (high + low) / 2, (high - low) / 2
    steps = 1 if cfg.hold else cfg.horizon
    mean = torch.zeros(steps, low.shape[0])
    std = torch.full_like(mean, cfg.init_std)
    best, best_cost, history, evaluations = None, float("inf"), [], 0
    for _ in range(cfg.iterations):
        noise = torch.randn(cfg.samples, *mean.shape, generator=generator)
        unit = (mean + std * noise).clamp(-1.0, 1.0)  # (S, steps, A) normalised
        cand = centre + half * unit.expand(-1, cfg.horizon, -1) if cfg.hold else centre + half * unit
        costs = _score(cost, cand, cfg.batch)
        evaluations += len(cand)
        order = torch.argsort(costs)
        if costs[order[0]] < best_cost:
            best_cost, best = float(costs[order[0]]), cand[order[0]].clone()
        elite = unit[order[: cfg.elites]]
        mean = cfg.momentum * mean + (1 - cfg.momentum) * elite.mean(0)
        fit = elite.std(0, unbiased=False) if cfg.elites > 1 else torch.zeros_like(std)
        std = (cfg.momentum * std + (1 - cfg.momentum) * fit).clamp_min(cfg.min_std)
        history.append(best_cost)
    if best is None:  # every cost was infinite: fall back to the box centre, and say so through the cost
        best = centre.expand(cfg.horizon, -1).clone()
    return CEMResult(actions=best, cost=best_cost, costs=history, evaluations=evaluations)
