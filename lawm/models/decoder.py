"""Frame-causal decoder: representations (B, T, N, D) -> frames (B, T*tubelet, 3, H, W), for pictures and metrics.

A block-causal transformer (frame t sees representations <= t, so it can use past frames for consistency without
ever seeing the future), then each token is mapped to its pixel patch (tubelet frames of it for V-JEPA 2 pairs).
Pixel metrics (L1, PSNR) always work; LPIPS only with weights from local files (`load_lpips`), never downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from einops import rearrange

from lawm.config import require
from lawm.models.layers import Transformer, _init_linear


@dataclass
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


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018) with the AlexNet backbone: channel-normalised feature differences of 5 layers,
    weighted by learned 1x1 convs. Parameter names follow torchvision's alexnet (`features.*`) and the `lpips`
    package's weight file (`lin{k}.model.1.weight`), so both files load as they are.
    """

    taps = (1, 4, 7, 9, 11)  # the ReLU outputs used by LPIPS
    chans = (64, 192, 384, 256, 256)

    def __init__(self):
        super().__init__()
        from torchvision.models import alexnet

        self.features = alexnet(weights=None).features[:12]
        for k, c in enumerate(self.chans):
            setattr(self, f"lin{k}", nn.Module())
            getattr(self, f"lin{k}").model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    def _feats(self, x):
        x = (2 * x - 1 - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Images (..., 3, H, W) in [0, 1] -> per-image distance (...)."""
        lead = a.shape[:-3]
        fa, fb = self._feats(a.flatten(0, -4).float()), self._feats(b.flatten(0, -4).float())
        d = sum(getattr(self, f"lin{k}").model((x - y).pow(2)).mean((2, 3)) for k, (x, y) in enumerate(zip(fa, fb)))
        return d.view(lead)


def load_lpips(lin_path: str, backbone_path: str) -> LPIPS:
    """LPIPS from two local files: the lpips linear weights (e.g. lpips/weights/v0.1/alex.pth) and a torchvision
    AlexNet state dict. Both are read with weights_only=True."""
    m = LPIPS()
    backbone = torch.load(backbone_path, map_location="cpu", weights_only=True)
    feats = {k[len("features."):]: v for k, v in backbone.items() if k.startswith("features.")}
    m.features.load_state_dict({k: v for k, v in feats.items() if int(k.split(".")[0]) < 12})
    lins = torch.load(lin_path, map_location="cpu", weights_only=True)
    m.load_state_dict({**{f"features.{k}": v for k, v in m.features.state_dict().items()}, **lins,
                       "shift": m.shift, "scale": m.scale})
    return m


__all__ = ["DecoderConfig", "FrameDecoder", "pixel_l1", "psnr", "LPIPS", "load_lpips"]
