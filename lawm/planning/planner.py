"""Planning towards a goal representation through a world model, in real action units.

Two ways to turn candidate real actions into predicted representations (both batched over candidates):
- `ControllerRollout`: the latent action world model driven through the controller (the paper's "universal
  interface"): real action a_t (times `action_scale`, as in training) -> z_t = controller(a_0..t, s_0..t), then
  the world model predicts s_t+1 from s_0..t and z_0..t, autoregressively. The context's own transitions keep
  the IDM's latents (they were observed); only the future is driven by the controller.
- `ActionWMRollout`: the action-conditioned world model, fed the scaled actions directly (the upper bound).

Actions must be aligned one per representation transition, which holds for a tubelet-1 encoder (`patch`, `timm`,
`vjepa2` with `vjepa2_tubelet: duplicate`): each real action maps to one latent. `check_tubelet` refuses
anything else with one line, rather than planning with the sum of two actions.

`Planner.plan` scores every CEM candidate of an iteration with one batched rollout and returns the best plan.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from lawm.models.action_wm import ActionWorldModel
from lawm.models.controllers import Controller
from lawm.models.lam import LatentActionWorldModel, eval_mode
from lawm.planning.cem import CEMConfig, CEMResult, cem


def check_tubelet(tubelet: int) -> None:
    if tubelet != 1:
        raise ValueError(f"planning needs one representation per frame (encoder tubelet 1, got {tubelet}): "
                         "use vjepa2_tubelet: duplicate, the paper's controller recipe")


class Rollout(Protocol):
    def __call__(self, context_s: torch.Tensor, context_actions: torch.Tensor, actions: torch.Tensor
                 ) -> torch.Tensor:
        """context_s (Tc, N, D), context_actions (Tc-1, A), actions (S, H, A) real units -> (S, H, N, D)."""


class ControllerRollout:
    def __init__(self, lam: LatentActionWorldModel, controller: Controller, action_scale: float):
        self.lam, self.controller, self.scale = lam.eval(), controller.eval(), action_scale
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def _context_z(self, context_s: torch.Tensor) -> torch.Tensor:
        """IDM latents of the observed context, computed once per context (CEM calls us many times)."""
        if self._cache is None or self._cache[0] is not context_s:
            if len(context_s) > 1:
                z = self.lam.infer_latents(context_s[None])  # (1, Tc-1, dz)
            else:
                z = context_s.new_zeros(1, 0, self.lam.cfg.latent_dim)
            self._cache = (context_s, z)
        return self._cache[1]

    @torch.no_grad()
    def __call__(self, context_s, context_actions, actions):
        s_count = actions.shape[0]
        z = self._context_z(context_s)
        seq = context_s[None].expand(s_count, -1, -1, -1)
        zs = z.expand(s_count, -1, -1)
        acts = (context_actions[None].expand(s_count, -1, -1) * self.scale).to(actions.dtype)
        out = []
        with eval_mode(self.lam), eval_mode(self.controller):
            for h in range(actions.shape[1]):
                acts = torch.cat([acts, actions[:, h : h + 1] * self.scale], dim=1)  # a_0 .. a_t (t = current)
                z_t = self.controller(acts, seq)[:, -1:]  # causal: sees s_0..s_t and a_t
                zs = torch.cat([zs, z_t.to(zs.dtype)], dim=1)
                nxt = self.lam.predict(seq, zs)[:, -1:]
                out.append(nxt)
                seq = torch.cat([seq, nxt.to(seq.dtype)], dim=1)
        return torch.cat(out, dim=1)


class ActionWMRollout:
    def __init__(self, model: ActionWorldModel, action_scale: float):
        self.model, self.scale = model.eval(), action_scale

    @torch.no_grad()
    def __call__(self, context_s, context_actions, actions):
        s_count = actions.shape[0]
        ctx = context_s[None].expand(s_count, -1, -1, -1)
        ctx_a = context_actions[None].expand(s_count, -1, -1) * self.scale
        return self.model.rollout(ctx, actions * self.scale, ctx_a)


def representation_cost(pred: torch.Tensor, goal: torch.Tensor, kind: Literal["l1", "l2"]) -> torch.Tensor:
    """pred (S, N, D), goal (N, D) -> (S,): L1 = mean absolute difference (V-JEPA 2-AC's energy); L2 = the
    Euclidean norm of the difference (jepa-wms / the paper's DROID cost)."""
    diff = (pred.float() - goal.float()[None]).flatten(1)
    return diff.abs().mean(1) if kind == "l1" else diff.norm(dim=1)


@dataclass
class Planner:
    rollout: Rollout
    cem: CEMConfig
    low: torch.Tensor  # (A,) action bounds, real units
    high: torch.Tensor
    cost: Literal["l1", "l2"] = "l2"

    def plan(self, context_s: torch.Tensor, context_actions: torch.Tensor, goal_s: torch.Tensor,
             generator: torch.Generator | None = None) -> CEMResult:
        """Best (H, A) real actions from the last context frame so that the prediction at the horizon is the goal."""
        context_s = context_s.float()
        context_actions = context_actions.float()

        def cost(actions: torch.Tensor) -> torch.Tensor:
            pred = self.rollout(context_s, context_actions, actions)
            return representation_cost(pred[:, -1], goal_s, self.cost)

        return cem(cost, self.low, self.high, self.cem, generator=generator)
