"""Frame-causal decoder: representations (B, T, N, D) -> frames (B, T*tubelet, 3, H, W), for pictures and metrics.

A block-causal transformer (frame t sees representations <= t, so it can use past frames for consistency without
ever seeing the future), then each token is mapped to its pixel patch (tubelet frames of it for V-JEPA 2 pairs).
Pixel metrics: L1 and PSNR.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from einops import rearrange

from lawm.config import require
from lawm.models.layers import Transformer, _init_linear


@dataclass(kw_only=True)
class DecoderConfig:
    feat_dim: int = 48
    grid_h: int = 8
    grid_w: int = 8
    image_size: int = 32
    tubelet: int = 1  # frames per representation (encoder.tubelet)
    width: int = 128
    depth: int = 4
    heads: int = 4

    def validate(self) -> None:
        require(self.image_size % self.grid_h == 0 and self.image_size % self.grid_w == 0, "image_size",
                "must be a multiple of the token grid")
        require(self.width % self.heads == 0 and self.width // self.heads >= 6, "heads", "bad width/heads")


class FrameDecoder(nn.Module):
    registry_name = "decoder"
    config_cls = DecoderConfig

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.ph, self.pw = cfg.image_size // cfg.grid_h, cfg.image_size // cfg.grid_w
        self.inp = nn.Linear(cfg.feat_dim, cfg.width)
        self.body = Transformer(cfg.width, cfg.depth, cfg.heads, causal=True)
        self.norm = nn.LayerNorm(cfg.width)
        self.out = nn.Linear(cfg.width, cfg.tubelet * 3 * self.ph * self.pw)
        _init_linear(self.inp)
        _init_linear(self.out)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        x = self.out(self.norm(self.body(self.inp(s), (self.cfg.grid_h, self.cfg.grid_w))))
        return rearrange(x, "b t (h w) (u c p q) -> b (t u) c (h p) (w q)", h=self.cfg.grid_h, w=self.cfg.grid_w,
                         u=self.cfg.tubelet, c=3, p=self.ph, q=self.pw)

    def loss(self, s: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """L1 to the frames the representations came from (frames cut to T*tubelet)."""
        pred = self(s)
        return (pred - frames[:, : pred.shape[1]]).abs().mean()


def pixel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float().clamp(0, 1) - b.float().clamp(0, 1)).abs().mean().item()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR (dB) over images of the last three dims, values in [0, 1]."""
    mse = (a.float().clamp(0, 1) - b.float().clamp(0, 1)).pow(2).flatten(-3).mean(-1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean().item()


__all__ = ["DecoderConfig", "FrameDecoder", "pixel_l1", "psnr"]
