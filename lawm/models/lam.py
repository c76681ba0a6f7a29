"""Latent action world model: IDM + regulariser + world model, over frozen encoder features s (B, T, N, D).

    z_t = reg(g(s_t, s_t+1)),   ŝ_t+1 = p(s_0:t, z_0:t),   loss = |ŝ_t+1 - s_t+1|_1 + L_reg(z)

Precision: the model never turns autocast on by itself; the training loop's one switch (TrainConfig.bf16) does,
around the whole forward. The regulariser always runs in fp32 with autocast off (`fp32_regularise`): the VQ
nearest-code search and the sparse covariance would otherwise be bf16 in training and fp32 in evaluation.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from lawm.config import require
from lawm.models.idm import IDMConfig, InverseDynamics
from lawm.models.regularizers import RegConfig, build_regularizer
from lawm.models.world_model import WorldModel, WorldModelConfig


@dataclass(kw_only=True)
class LAMConfig:
    feat_dim: int = 48  # D of the encoder (encoder.dim)
    grid_h: int = 8  # encoder.grid
    grid_w: int = 8
    latent_dim: int = 128  # z size; in idm.mode=per_token, the size of each token's latent (16 is plenty)
    idm: IDMConfig = field(default_factory=IDMConfig)
    reg: RegConfig = field(default_factory=RegConfig)
    wm: WorldModelConfig = field(default_factory=WorldModelConfig)

    def validate(self) -> None:
        require(self.feat_dim > 0 and self.latent_dim > 0, "latent_dim", "must be positive")
        require(self.grid_h > 0 and self.grid_w > 0, "grid_h", "must be positive")


def lam_preset(size: str, **kw) -> LAMConfig:
    """LAMConfig with world model and IDM at preset `size` (tiny|S|B|L); kw sets top-level fields."""
    return LAMConfig(idm=IDMConfig(size=size), wm=WorldModelConfig(size=size), **kw)


def fp32_regularise(reg: nn.Module, raw: torch.Tensor, progress: float = 1.0):
    """reg(raw) in fp32 whatever autocast the caller set: autocast off on raw's device, input cast to float."""
    with torch.autocast(raw.device.type, enabled=False):
        return reg(raw.float(), progress)


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


class LatentActionWorldModel(nn.Module):
    registry_name = "lam"
    config_cls = LAMConfig

    def __init__(self, cfg: LAMConfig):
        super().__init__()
        self.cfg = cfg
        grid = (cfg.grid_h, cfg.grid_w)
        self.reg = build_regularizer(cfg.reg, cfg.latent_dim)
        self.idm = InverseDynamics(cfg.idm, cfg.feat_dim, grid, self.reg.raw_dim)
        self.reg.init_head(self.idm.head)
        self.wm = WorldModel(cfg.wm, cfg.feat_dim, grid, cfg.latent_dim)

    def forward(self, s: torch.Tensor, progress: float = 1.0) -> dict:
        """s (B, T, N, D) -> dict(loss, pred_loss, reg_loss, z, pred, stats). pred[:, t] predicts s[:, t+1]."""
        raw = self.idm(s[:, :-1], s[:, 1:])
        z, reg_loss, stats = fp32_regularise(self.reg, raw, progress)
        pred = self.wm(s[:, :-1], z)
        pred_loss = (pred.float() - s[:, 1:].float()).abs().mean()
        loss = pred_loss + reg_loss
        stats = dict(stats, pred_loss=pred_loss.item(), reg_loss=float(reg_loss.detach()))
        return {"loss": loss, "pred_loss": pred_loss, "reg_loss": reg_loss, "z": z, "pred": pred, "stats": stats}

    @torch.no_grad()
    def infer_latents(self, s: torch.Tensor) -> torch.Tensor:
        """Eval-mode latents of every transition, (B, T-1, dz) (noisy: the posterior mean, VQ: the code)."""
        with eval_mode(self):
            return fp32_regularise(self.reg, self.idm(s[:, :-1], s[:, 1:]))[0]

    def predict(self, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Teacher-forced, one pass: s (B, T, N, D), z (B, T, dz) -> predictions of s_1..s_T."""
        return self.wm(s, z).float()

    @torch.no_grad()
    def rollout(self, context_s: torch.Tensor, z_seq: torch.Tensor, context_z: Optional[torch.Tensor] = None):
        """Autoregressive: from context (B, Tc, N, D) apply z_seq (B, H, dz) -> predicted frames (B, H, N, D).

        The context's own transitions are conditioned on `context_z` (B, Tc-1, dz), inferred by the IDM if None.
        """
        with eval_mode(self):
            if context_z is None:
                context_z = self.infer_latents(context_s) if context_s.shape[1] > 1 else z_seq[:, :0]
            cache = self.wm.prefill(context_s[:, :-1], context_z)
            return self.wm.rollout(context_s[:, -1:], z_seq, cache)

    @torch.no_grad()
    def one_step_error(self, s: torch.Tensor, reduce: bool = True):
        """The paper's "capacity": mean L1 of one-step predictions with IDM latents (lower = more capacity)."""
        with eval_mode(self):
            err = (self.predict(s[:, :-1], self.infer_latents(s)) - s[:, 1:].float()).abs()
        return err.mean().item() if reduce else err.mean(dim=(1, 2, 3))
