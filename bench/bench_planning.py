"""Planning benchmark: CEM with all candidates of an iteration in ONE batched rollout vs a loop over candidates.

    python bench/bench_planning.py [--quick] [--device cuda]     # main() returns the numbers as a dict

The models are the demo's shapes (tiny world model, 32 px frames in 4x4 patches: 64 tokens of 48-d, z 128-d,
the demo controller) with random weights: speed does not depend on training. Both paths run the same code
(`Planner.plan`, the latent model through the cross-attention controller), differing only in `CEMConfig.batch`
(0 = one rollout per iteration, 1 = one rollout per candidate), from the same seed, in the same process.
The loop is timed on a slice of the candidates and scaled (its cost is linear in the candidates scored);
--quick does the same for the batched path (one iteration, scaled by the iteration count).
Reports seconds per planning episode of the manip protocol (300 x 15, horizon 3) and the nav protocol
(120 x 1, horizon 8, 4 context frames). Goal: batched >= 20x faster than the loop.
Also, both batched: the rollout as lawm runs it (KV cache, the context computed once at batch 1) against
`RerunRollout`, the same models re-running every frame at each step (lawm's rollout before the cache).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time

import torch

from lawm.models.controllers import Controller, ControllerConfig
from lawm.models.lam import LAMConfig, LatentActionWorldModel, eval_mode
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


class RerunRollout(ControllerRollout):
    """The baseline of the cache: every step runs the controller and the world model over the whole sequence so far
    (batched over candidates like lawm's rollout, without a cache)."""

    def start(self, context_s, context_actions):
        return functools.partial(self._rerun, context_s, context_actions)

    @torch.no_grad()
    def _rerun(self, context_s, context_actions, actions):
        s_count = actions.shape[0]
        seq = context_s[None].expand(s_count, -1, -1, -1)
        zs = self.lam.infer_latents(context_s[None]).expand(s_count, -1, -1) if len(context_s) > 1 else \
            context_s.new_zeros(s_count, 0, self.lam.cfg.latent_dim)
        acts = (context_actions[None].expand(s_count, -1, -1) * self.scale).to(actions.dtype)
        out = []
        with eval_mode(self.lam), eval_mode(self.controller):
            for h in range(actions.shape[1]):
                acts = torch.cat([acts, actions[:, h : h + 1] * self.scale], dim=1)
                zs = torch.cat([zs, self.controller(acts, seq)[:, -1:]], dim=1)
                out.append(self.lam.predict(seq, zs)[:, -1:])
                seq = torch.cat([seq, out[-1]], dim=1)
        return torch.cat(out, dim=1)


def planner(cem: CEMConfig, bounds, device: str, rollout=ControllerRollout) -> Planner:
    torch.manual_seed(0)
    lam = LatentActionWorldModel(LAMConfig(feat_dim=DIM, grid_h=GRID, grid_w=GRID, latent_dim=LATENT,
                                           idm=IDMConfig(size="tiny"), wm=WorldModelConfig(size="tiny")))
    ctrl = Controller(ControllerConfig(action_dim=len(bounds[0]), latent_dim=LATENT, feat_dim=DIM, grid_h=GRID,
                                       grid_w=GRID, width=64, depth=1, heads=4))
    return Planner(rollout=rollout(lam.to(device), ctrl.to(device), action_scale=1.0), cem=cem,
                   low=torch.tensor(bounds[0]), high=torch.tensor(bounds[1]), device=device)


def time_plan(p: Planner, context: int, repeats: int, device: str) -> float:
    s = torch.randn(context + 1, GRID * GRID, DIM, device=device)
    a = torch.zeros(context - 1, len(p.low))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    p.plan(s[:context], a, s[-1], generator=torch.Generator().manual_seed(0))  # warm-up
    sync()
    t0 = time.perf_counter()
    for r in range(repeats):
        p.plan(s[:context], a, s[-1], generator=torch.Generator().manual_seed(r))
    sync()
    return (time.perf_counter() - t0) / repeats


def main(quick: bool = False, device: str = "cpu") -> dict:
    out = {"threads": torch.get_num_threads(), "device": device}
    for name, (cem, context, bounds) in PROTOCOLS.items():
        # --quick times one iteration of the protocol's batch and scales: iterations cost the same each
        probe_b = dataclasses.replace(cem, iterations=1) if quick else cem
        scale_up = cem.iterations / probe_b.iterations
        batched = time_plan(planner(probe_b, bounds, device), context, 1 if quick else 3, device) * scale_up
        rerun = time_plan(planner(probe_b, bounds, device, RerunRollout), context, 1, device) * scale_up
        # the loop: same planner, one candidate per rollout, on a slice of the protocol's candidates, scaled up
        probe = dataclasses.replace(cem, samples=min(cem.samples, 10 if quick else 30), iterations=1,
                                    elites=min(cem.elites, 5), batch=1)
        per_candidate = time_plan(planner(probe, bounds, device), context, 1, device) / probe.samples
        looped = per_candidate * cem.samples * cem.iterations
        out[name] = {"batched_s_per_episode": batched, "loop_s_per_episode": looped, "speedup": looped / batched,
                     "rerun_s_per_episode": rerun, "cache_speedup": rerun / batched,
                     "candidates": cem.samples * cem.iterations, "horizon": cem.horizon}
        print(f"{name:<6} batched {batched:8.3f} s/episode   loop {looped:9.2f} s/episode   "
              f"speed-up {looped / batched:6.1f}x   ({cem.samples}x{cem.iterations} candidates, H={cem.horizon}); "
              f"without the KV cache {rerun:8.3f} s/episode ({rerun / batched:.1f}x)", flush=True)
    out["goal_met"] = all(out[n]["speedup"] >= 20 for n in PROTOCOLS)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    args = parser.parse_args()
    main(quick=args.quick, device=args.device)
    sys.exit(0)
