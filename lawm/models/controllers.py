"""Controllers: real action a_t (+ past representation s_t) -> latent action z_t, trained with L2 to IDM latents.

- `mlp`: action only. The paper notes it collapses towards a "no movement" latent: the same action means different
  latents under different camera views, and the L2 optimum is their average.
- `cross_attention` (paper App. A): self-attention over past representations (block-causal over frames, so the
  tokens of frame t summarise s_0..s_t and never the future), then the action a_t, embedded by a 3-layer MLP,
  cross-attends to frame t's tokens as a single query token, then a linear map to z_t. The representation
  disambiguates what the action does from this viewpoint.

Planning steps the controller frame by frame: `observe` runs the self-attention over new frames (the body never
sees actions, so a shared context is observed once, at batch 1), `read` turns an action and the frame's tokens into
z. `forward` is the two over a whole sequence; a step equals its last output (tests/test_planning.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from lawm.config import require
from lawm.models.layers import CrossAttention, Mlp, StepCache, Transformer, _init_linear


@dataclass(kw_only=True)
class ControllerConfig:
    kind: Literal["mlp", "cross_attention"] = "cross_attention"
    action_dim: int = 7
    latent_dim: int = 128
    feat_dim: int = 48
    grid_h: int = 8
    grid_w: int = 8
    width: int = 128  # paper: action embedding of 1024
    depth: int = 2  # self-attention blocks over s_t
    heads: int = 4

    def validate(self) -> None:
        require(self.width % self.heads == 0 and self.width // self.heads >= 6, "heads", "bad width/heads")


def action_mlp(action_dim: int, width: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(action_dim, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                         nn.Linear(width, out))


class Controller(nn.Module):
    registry_name = "controller"
    config_cls = ControllerConfig

    def __init__(self, cfg: ControllerConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.kind == "mlp":
            self.net = action_mlp(cfg.action_dim, cfg.width, cfg.latent_dim)
        else:
            self.act = action_mlp(cfg.action_dim, cfg.width, cfg.width)
            self.inp = nn.Linear(cfg.feat_dim, cfg.width)
            self.body = Transformer(cfg.width, cfg.depth, cfg.heads, causal=True)
            self.norm_q = nn.LayerNorm(cfg.width)
            self.norm_kv = nn.LayerNorm(cfg.width)
            self.xattn = CrossAttention(cfg.width, cfg.heads)
            self.norm_out = nn.LayerNorm(cfg.width)
            self.mlp = Mlp(cfg.width, 4 * cfg.width)
            self.out = nn.Linear(cfg.width, cfg.latent_dim)
        self.apply(_init_linear)

    def forward(self, actions: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        """actions (B, T, A); s (B, T, N, D) with s[:, t] the representation when a_t is taken -> z (B, T, dz)."""
        if self.cfg.kind == "mlp":
            return self.net(actions)
        b, t = actions.shape[:2]
        return self.read(actions.flatten(0, 1), self.observe(s).flatten(0, 1)).unflatten(0, (b, t))

    def new_cache(self) -> StepCache | None:
        return None if self.cfg.kind == "mlp" else self.body.new_cache()

    def observe(self, s: torch.Tensor, cache: StepCache | None = None) -> torch.Tensor | None:
        """s (B, T, N, D) -> the self-attention's tokens (B, T, N, W), frame t summarising s_0..s_t; with `cache`,
        s follows the frames already observed. None for the `mlp` kind (it never looks at s)."""
        if self.cfg.kind == "mlp":
            return None
        return self.body(self.inp(s), (self.cfg.grid_h, self.cfg.grid_w), cache=cache)

    def read(self, actions: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        """actions (B, A) taken at frames whose observed tokens are x (B, N, W) -> z (B, dz)."""
        if self.cfg.kind == "mlp":
            return self.net(actions)
        a = self.act(actions)[:, None]  # (B, 1, W): one query per action
        q = a + self.xattn(self.norm_q(a), self.norm_kv(x))
        q = q + self.mlp(self.norm_out(q))
        return self.out(q[:, 0])


def controller_loss(pred_z: torch.Tensor, target_z: torch.Tensor) -> torch.Tensor:
    """L2 to the IDM's latents (targets carry no gradient)."""
    return F.mse_loss(pred_z.float(), target_z.detach().float())
