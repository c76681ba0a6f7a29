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
    """The controller and the world model stepped together, one frame at a time: z_t = controller(a_t, s_0..t)
    (its last output; a_t alone of the actions matters, so `context_actions` are not used), then s_t+1 from the
    world model. The context (its IDM latents, both models' caches over its frames) is computed once per context
    at batch 1, and every call (a CEM iteration's candidates) starts from a fork of it."""

    def __init__(self, lam: LatentActionWorldModel, controller: Controller, action_scale: float):
        self.lam, self.controller, self.scale = lam.eval(), controller.eval(), action_scale
        self._context: tuple | None = None

    @torch.no_grad()
    def _prefix(self, context_s: torch.Tensor):
        if self._context is None or self._context[0] is not context_s:
            s = context_s[None]
            with eval_mode(self.lam), eval_mode(self.controller):
                z = self.lam.infer_latents(s) if len(context_s) > 1 else s.new_zeros(1, 0, self.lam.cfg.latent_dim)
                wm_cache = self.lam.wm.prefill(s[:, :-1], z)
                ctrl_cache = self.controller.new_cache()
                x = self.controller.observe(s, ctrl_cache)
            self._context = (context_s, wm_cache, ctrl_cache, None if x is None else x[:, -1])
        return self._context[1:]

    @torch.no_grad()
    def __call__(self, context_s, context_actions, actions):
        s_count = actions.shape[0]
        wm_cache, ctrl_cache, x = self._prefix(context_s)
        wm_cache = wm_cache.fork()
        ctrl_cache = None if ctrl_cache is None else ctrl_cache.fork()
        x = None if x is None else x.expand(s_count, -1, -1)  # the last context frame, seen by the controller
        cur = context_s[-1][None, None].expand(s_count, -1, -1, -1)
        out = []
        with eval_mode(self.lam), eval_mode(self.controller):
            for h in range(actions.shape[1]):
                z_t = self.controller.read(actions[:, h] * self.scale, x)
                cur = self.lam.wm(cur, z_t[:, None].to(cur.dtype), cache=wm_cache)
                out.append(cur.float())
                if x is not None and h + 1 < actions.shape[1]:
                    x = self.controller.observe(cur, ctrl_cache)[:, 0]
        return torch.cat(out, dim=1)


class ActionWMRollout:
    """The action-conditioned world model from a context cached once per context at batch 1 (see above)."""

    def __init__(self, model: ActionWorldModel, action_scale: float):
        self.model, self.scale = model.eval(), action_scale
        self._context: tuple | None = None

    @torch.no_grad()
    def __call__(self, context_s, context_actions, actions):
        if self._context is None or self._context[0] is not context_s or self._context[1] is not context_actions:
            with eval_mode(self.model):
                cache = self.model.wm.prefill(context_s[None, :-1], context_actions[None] * self.scale)
            self._context = (context_s, context_actions, cache)
        with eval_mode(self.model):
            return self.model.wm.rollout(context_s[None, -1:], actions * self.scale, self._context[2])


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
        """Best (H, A) real actions from the last context frame so that the prediction at the horizon is the goal.
        The models run where `context_s` is (the rollout's models must be there too); the plan is on the CPU."""
        context_s = context_s.float()
        context_actions = context_actions.float().to(context_s.device)
        goal_s = goal_s.to(context_s.device)

        def cost(actions: torch.Tensor) -> torch.Tensor:
            pred = self.rollout(context_s, context_actions, actions.to(context_s.device))
            return representation_cost(pred[:, -1], goal_s, self.cost)

        return cem(cost, self.low, self.high, self.cem, generator=generator)
