"""Planning benchmark: CEM with all candidates of an iteration in ONE batched rollout vs a loop over candidates.

    python bench/bench_planning.py [--quick]     # main() returns the numbers as a dict

The models are the demo's shapes (tiny world model, 32 px frames in 4x4 patches: 64 tokens of 48-d, z 128-d,
the demo controller) with random weights: speed does not depend on training. Both paths run the same code
(`Planner.plan`, the latent model through the cross-attention controller), differing only in `CEMConfig.batch`
(0 = one rollout per iteration, 1 = one rollout per candidate), from the same seed, in the same process.
The loop is timed on a slice of the candidates and scaled (its cost is linear in the candidates scored);
--quick does the same for the batched path (one iteration, scaled by the iteration count).
Reports seconds per planning episode of the manip protocol (300 x 15, horizon 3) and the nav protocol
(120 x 1, horizon 8, 4 context frames). Goal: batched >= 20x faster than the loop.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from lawm.models.controllers import Controller, ControllerConfig
from lawm.models.lam import LAMConfig, LatentActionWorldModel
from lawm.models.world_model import WorldModelConfig
from lawm.models.idm import IDMConfig
from lawm.planning.cem import CEMConfig
from lawm.planning.planner import ControllerRollout, Planner

GRID, DIM, LATENT = 8, 48, 128
PROTOCOLS = {  # name: (CEM, context frames, action bounds)
    "manip": (CEMConfig(samples=300, elites=10, iterations=15, horizon=3), 1,
              ([-0.04] * 3 + [0.0], [0.04] * 3 + [1.0])),
    "nav": (CEMConfig(samples=120, elites=5, iterations=1, horizon=8, hold=True), 4, ([-0.8, -1.2], [0.8, 1.2])),
}


def planner(cem: CEMConfig, bounds) -> Planner:
    torch.manual_seed(0)
    lam = LatentActionWorldModel(LAMConfig(feat_dim=DIM, grid_h=GRID, grid_w=GRID, latent_dim=LATENT,
                                           idm=IDMConfig(size="tiny"), wm=WorldModelConfig(size="tiny")))
    ctrl = Controller(ControllerConfig(action_dim=len(bounds[0]), latent_dim=LATENT, feat_dim=DIM, grid_h=GRID,
                                       grid_w=GRID, width=64, depth=1, heads=4))
    return Planner(rollout=ControllerRollout(lam, ctrl, action_scale=1.0), cem=cem, low=torch.tensor(bounds[0]),
                   high=torch.tensor(bounds[1]))


def time_plan(p: Planner, context: int, repeats: int) -> float:
    s = torch.randn(context + 1, GRID * GRID, DIM)
    a = torch.zeros(context - 1, len(p.low))
    p.plan(s[:context], a, s[-1], generator=torch.Generator().manual_seed(0))  # warm-up
    t0 = time.perf_counter()
    for r in range(repeats):
        p.plan(s[:context], a, s[-1], generator=torch.Generator().manual_seed(r))
    return (time.perf_counter() - t0) / repeats


def main(quick: bool = False) -> dict:
    out = {"threads": torch.get_num_threads()}
    for name, (cem, context, bounds) in PROTOCOLS.items():
        # --quick times one iteration of the protocol's batch and scales: iterations cost the same each
        probe_b = dataclasses.replace(cem, iterations=1) if quick else cem
        batched = time_plan(planner(probe_b, bounds), context, repeats=1 if quick else 3)
        batched *= cem.iterations / probe_b.iterations
        # the loop: same planner, one candidate per rollout, on a slice of the protocol's candidates, scaled up
        probe = dataclasses.replace(cem, samples=min(cem.samples, 10 if quick else 30), iterations=1,
                                    elites=min(cem.elites, 5), batch=1)
        per_candidate = time_plan(planner(probe, bounds), context, repeats=1) / probe.samples
        looped = per_candidate * cem.samples * cem.iterations
        out[name] = {"batched_s_per_episode": batched, "loop_s_per_episode": looped, "speedup": looped / batched,
                     "candidates": cem.samples * cem.iterations, "horizon": cem.horizon}
        print(f"{name:<6} batched {batched:8.3f} s/episode   loop {looped:9.2f} s/episode   "
              f"speed-up {looped / batched:6.1f}x   ({cem.samples}x{cem.iterations} candidates, H={cem.horizon})",
              flush=True)
    out["goal_met"] = all(out[n]["speedup"] >= 20 for n in PROTOCOLS)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    main(quick=parser.parse_args().quick)
    sys.exit(0)
