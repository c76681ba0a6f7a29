"""Planning towards a goal representation through a world model, in real action units.

Two ways to turn candidate real actions into predicted representations (both batched over candidates):
- `ControllerRollout`: the latent action world model driven through the controller (the paper's "universal
  interface"): real action a_t (times `action_scale`, as in training) -> z_t = controller(a_t, s_0..t), then
  the world model predicts s_t+1 from s_0..t and z_0..t, autoregressively. The context's own transitions keep
  the IDM's latents (they were observed); only the future is driven by the controller.
- `ActionWMRollout`: the action-conditioned world model, fed the scaled actions directly (the upper bound).

Actions must be aligned one per representation transition, which holds for a tubelet-1 encoder (`patch`, `timm`,
`vjepa2` with `vjepa2_tubelet: duplicate`): each real action maps to one latent. `check_tubelet` refuses
anything else with one line, rather than planning with the sum of two actions.

`Planner.plan` computes what depends on the context once (`Rollout.start`: latents, KV caches over the context
frames), scores every CEM candidate of an iteration with one batched rollout stepping one frame at a time, and
returns the best plan.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Literal, Protocol

import torch

from lawm.models.action_wm import ActionWorldModel
from lawm.models.controllers import Controller
from lawm.models.lam import LatentActionWorldModel, eval_mode
from lawm.models.layers import StepCache
from lawm.planning.cem import CEMConfig, CEMResult, cem


def check_tubelet(tubelet: int) -> None:
    if tubelet != 1:
        raise ValueError(f"planning needs one representation per frame (encoder tubelet 1, got {tubelet}): "
                         "use vjepa2_tubelet: duplicate, the paper's controller recipe")


class Rollout(Protocol):
    def start(self, context_s: torch.Tensor, context_actions: torch.Tensor
              ) -> Callable[[torch.Tensor], torch.Tensor]:
        """context_s (Tc, N, D), context_actions (Tc-1, A) -> a function of candidates (S, H, A), real units, giving
        their predicted frames (S, H, N, D). What depends on the context alone is computed here, once per plan."""


class ControllerRollout:
    """The controller and the world model stepped together, one frame at a time: z_t = controller(a_t, s_0..t)
    (its last output; of the actions only a_t matters, so `context_actions` are not used), then s_t+1 from the
    world model. `start` computes the context's IDM latents and both models' caches over its frames at batch 1;
    every call of what it returns (a CEM iteration's candidates) starts from a fork of those caches."""

    def __init__(self, lam: LatentActionWorldModel, controller: Controller, action_scale: float):
        if lam.cfg.idm.mode != "pooled":
            raise ValueError(f"a controller gives one latent per frame; this world model takes latents per token "
                             f"(idm.mode {lam.cfg.idm.mode!r})")
        self.lam, self.controller, self.scale = lam.eval(), controller.eval(), action_scale

    @torch.no_grad()
    def start(self, context_s, context_actions):
        s = context_s[None]
        with eval_mode(self.lam), eval_mode(self.controller):
            z = self.lam.infer_latents(s) if len(context_s) > 1 else s.new_zeros(1, 0, self.lam.cfg.latent_dim)
            wm_cache = self.lam.wm.prefill(s[:, :-1], z)
            ctrl_cache = self.controller.new_cache()
            x = self.controller.observe(s, ctrl_cache)
        return functools.partial(self._run, context_s[-1], wm_cache, ctrl_cache, None if x is None else x[:, -1])

    def __call__(self, context_s, context_actions, actions):
        return self.start(context_s, context_actions)(actions)

    @torch.no_grad()
    def _run(self, last: torch.Tensor, wm_cache: StepCache, ctrl_cache: StepCache | None, x: torch.Tensor | None,
             actions: torch.Tensor) -> torch.Tensor:
        s_count, horizon = actions.shape[:2]
        wm_cache = wm_cache.fork()
        ctrl_cache = None if ctrl_cache is None else ctrl_cache.fork()
        x = None if x is None else x.expand(s_count, -1, -1)  # the last context frame, as the controller saw it
        cur = last[None, None].expand(s_count, -1, -1, -1)
        out = []
        with eval_mode(self.lam), eval_mode(self.controller):
            for h in range(horizon):
                z_t = self.controller.read(actions[:, h] * self.scale, x)
                cur = self.lam.wm(cur, z_t[:, None].to(cur.dtype), cache=wm_cache)
                out.append(cur.float())
                if x is not None and h + 1 < horizon:
                    x = self.controller.observe(cur, ctrl_cache)[:, 0]
        return torch.cat(out, dim=1)


class ActionWMRollout:
    """The action-conditioned world model; `start` caches the context at batch 1 (see above)."""

    def __init__(self, model: ActionWorldModel, action_scale: float):
        self.model, self.scale = model.eval(), action_scale

    @torch.no_grad()
    def start(self, context_s, context_actions):
        with eval_mode(self.model):
            cache = self.model.wm.prefill(context_s[None, :-1], context_actions[None] * self.scale)
        return functools.partial(self._run, context_s[None, -1:], cache)

    def __call__(self, context_s, context_actions, actions):
        return self.start(context_s, context_actions)(actions)

    @torch.no_grad()
    def _run(self, last: torch.Tensor, cache: StepCache, actions: torch.Tensor) -> torch.Tensor:
        with eval_mode(self.model):
            return self.model.wm.rollout(last, actions * self.scale, cache)


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
    device: str = "cpu"  # where the rollout's models are: the context and goal are moved there

    def plan(self, context_s: torch.Tensor, context_actions: torch.Tensor, goal_s: torch.Tensor,
             generator: torch.Generator | None = None) -> CEMResult:
        """Best (H, A) real actions from the last context frame so that the prediction at the horizon is the goal.
        The rollouts run on `device`; the search and the plan stay on the CPU."""
        if context_actions.shape[0] != context_s.shape[0] - 1:
            raise ValueError(f"plan: {context_s.shape[0]} context frames need {context_s.shape[0] - 1} context "
                             f"actions, got {context_actions.shape[0]}")
        context_s = context_s.float().to(self.device)
        context_actions = context_actions.float().to(self.device)
        goal_s = goal_s.to(self.device)

        run = self.rollout.start(context_s, context_actions)

        def cost(actions: torch.Tensor) -> torch.Tensor:
            pred = run(actions.to(context_s.device))
            return representation_cost(pred[:, -1], goal_s, self.cost)

        return cem(cost, self.low, self.high, self.cem, generator=generator)
