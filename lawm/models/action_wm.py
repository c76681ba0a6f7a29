"""Action-conditioned world model: the same world model, conditioned on real actions instead of latents.

The upper-bound baseline for planning (like "V-JEPA 2 + WM"): no IDM, no regulariser; the world model's own
conditioning MLP embeds the action vector in place of z. Actions must be aligned with representations
(`encoders.align_actions` for tubelet 2).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from lawm.config import require
from lawm.models.lam import eval_mode
from lawm.models.world_model import WorldModel, WorldModelConfig


@dataclass(kw_only=True)
class ActionWMConfig:
    feat_dim: int = 48
    grid_h: int = 8
    grid_w: int = 8
    action_dim: int = 7
    wm: WorldModelConfig = field(default_factory=WorldModelConfig)

    def validate(self) -> None:
        require(self.action_dim > 0, "action_dim", "must be positive")


class ActionWorldModel(nn.Module):
    registry_name = "action_wm"
    config_cls = ActionWMConfig

    def __init__(self, cfg: ActionWMConfig):
        super().__init__()
        self.cfg = cfg
        self.wm = WorldModel(cfg.wm, cfg.feat_dim, (cfg.grid_h, cfg.grid_w), cfg.action_dim)

    def predict(self, s: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.wm(s, actions).float()  # precision: the caller's autocast (the training loop's one switch)

    def forward(self, s: torch.Tensor, actions: torch.Tensor, progress: float = 1.0) -> dict:
        """s (B, T, N, D), actions (B, T-1, A) with a_t taking s_t to s_t+1."""
        pred = self.predict(s[:, :-1], actions)
        pred_loss = (pred - s[:, 1:].float()).abs().mean()
        return {"loss": pred_loss, "pred_loss": pred_loss, "pred": pred, "stats": {"pred_loss": pred_loss.item()}}

    @torch.no_grad()
    def rollout(self, context_s: torch.Tensor, actions: torch.Tensor, context_actions: torch.Tensor | None = None):
        """context (B, Tc, N, D), actions (B, H, A); context_actions (B, Tc-1, A) required when Tc > 1."""
        with eval_mode(self):
            acts = context_actions if context_actions is not None else actions[:, :0]
            if acts.shape[1] != context_s.shape[1] - 1:
                raise ValueError("context_actions must hold Tc-1 actions")
            return self.wm.rollout(context_s[:, -1:], actions, self.wm.prefill(context_s[:, :-1], acts))
