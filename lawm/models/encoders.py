"""Frozen, frame-causal frame encoders: frames (B, T, 3, H, W) in [0, 1] -> features (B, T', N, D).

Three kinds behind `build_encoder(cfg)`:
- `patch`  (default, CPU): raw 4x4 pixel patches, optionally through a fixed random projection. No learning, no
  semantics: it keeps every pixel (noise, texture, lighting) so the world model must predict all of it, has no
  invariance to small shifts or colour changes, and its size grows with resolution. Fine for synthetic video.
- `timm`   : an image backbone (e.g. a DINOv2 ViT) applied to each frame on its own -> trivially frame-causal.
- `vjepa2` : V-JEPA 2 from Hugging Face transformers. Its 3D patch embedding fuses `tubelet` (=2) frames into one
  token, so one representation covers a frame pair. It is made frame-causal by encoding every pair on its own
  (a 2-frame clip per pair, no attention across pairs): representation k sees frames 2k and 2k+1 only.
  With `vjepa2_tubelet: duplicate` every frame is instead duplicated to fill a tubelet (the paper's controller
  recipe), giving one representation per frame (T' = T) at twice the cost.

Action alignment (tubelet 2, `pairs`): representation k is the state as of frame 2k+1 (its last frame), so the
latent z_k = g(s_k, s_{k+1}) spans the frame transitions 2k+1 -> 2k+3, i.e. real actions a_{2k+1} and a_{2k+2}
(a_t moves frame t to t+1). `align_actions` sums (or stacks) them; with `duplicate` z_t matches a_t exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from lawm.config import require

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(kw_only=True)
class EncoderConfig:
    kind: Literal["patch", "timm", "vjepa2"] = "patch"
    image_size: int = 32  # frames are resized (bilinear, frame by frame) to this square size if they differ
    # patch
    patch_size: int = 4
    proj_dim: Optional[int] = None  # fixed random orthogonal projection of each 3*p*p patch; None = raw pixels
    seed: int = 0
    # timm
    timm_name: str = "vit_small_patch14_dinov2"
    # timm: a local checkpoint file; vjepa2: a local folder or a hub id already in the local cache. Never downloads.
    weights: Optional[str] = None
    # vjepa2
    vjepa2_tubelet: Literal["pairs", "duplicate"] = "pairs"

    def validate(self) -> None:
        require(self.image_size > 0, "image_size", "must be positive")
        if self.kind == "patch":
            require(self.image_size % self.patch_size == 0, "patch_size", "must divide image_size")
        if self.kind == "vjepa2":
            require(self.weights is not None, "weights", "vjepa2 needs a local folder or cached hub id")


class FrameEncoder(nn.Module):
    """Base: frozen, eval-only. Subclasses set dim, grid, tubelet and implement `encode`."""

    dim: int
    grid: tuple[int, int]
    tubelet: int = 1

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg

    def freeze(self) -> "FrameEncoder":
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "FrameEncoder":
        return super().train(False)  # frozen: dropout/droppath must never switch on

    def resize(self, frames: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = frames.shape
        s = self.cfg.image_size
        if (h, w) == (s, s):
            return frames
        x = F.interpolate(frames.flatten(0, 1), size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return x.unflatten(0, (b, t))

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        t = frames.shape[1] // self.tubelet * self.tubelet
        return self.encode(self.resize(frames[:, :t].float()))

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PatchEncoder(FrameEncoder):
    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        p = cfg.patch_size
        self.grid = (cfg.image_size // p, cfg.image_size // p)
        raw = 3 * p * p
        self.dim = cfg.proj_dim or raw
        if cfg.proj_dim:
            g = torch.Generator().manual_seed(cfg.seed)
            q, _ = torch.linalg.qr(torch.randn(max(raw, cfg.proj_dim), max(raw, cfg.proj_dim), generator=g))
            # orthonormal columns keep distances (and L1 scales) comparable with raw patches
            self.register_buffer("proj", q[:raw, : cfg.proj_dim].contiguous())
        else:
            self.proj = None
        self.freeze()

    def encode(self, frames):
        p = self.cfg.patch_size
        x = rearrange(frames, "b t c (h p) (w q) -> b t (h w) (p q c)", p=p, q=p)
        return x @ self.proj if self.proj is not None else x


class TimmEncoder(FrameEncoder):
    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        import timm

        kw = dict(pretrained=False, num_classes=0, img_size=cfg.image_size)
        if cfg.weights:
            kw["checkpoint_path"] = cfg.weights
        self.net = timm.create_model(cfg.timm_name, **kw)
        self.dim = self.net.num_features
        self.grid = tuple(self.net.patch_embed.grid_size)
        self.prefix = getattr(self.net, "num_prefix_tokens", 0)
        dc = self.net.pretrained_cfg
        self.register_buffer("mean", torch.tensor(dc.get("mean", IMAGENET_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(dc.get("std", IMAGENET_STD)).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def encode(self, frames):
        b, t = frames.shape[:2]
        x = (frames.flatten(0, 1) - self.mean) / self.std  # frames are independent images: frame-causal
        tok = self.net.forward_features(x)[:, self.prefix :]
        return tok.unflatten(0, (b, t))


class VJEPA2Encoder(FrameEncoder):
    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        from transformers import VJEPA2Model

        model = VJEPA2Model.from_pretrained(cfg.weights, local_files_only=True)
        self.net = model.encoder  # the predictor is not needed for features
        hc = model.config
        self.dim = hc.hidden_size
        self.grid = (cfg.image_size // hc.patch_size, cfg.image_size // hc.patch_size)
        self.hf_tubelet = hc.tubelet_size
        self.tubelet = 1 if cfg.vjepa2_tubelet == "duplicate" else hc.tubelet_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1), persistent=False)
        self.freeze()

    def encode(self, frames):
        b = frames.shape[0]
        x = (frames - self.mean) / self.std
        if self.tubelet == 1:  # duplicate each frame to fill a tubelet
            x = x.repeat_interleave(self.hf_tubelet, dim=1)
        # one independent clip per tubelet: no attention crosses a pair boundary -> frame-causal
        clips = rearrange(x, "b (k u) c h w -> (b k) u c h w", u=self.hf_tubelet)
        tok = self.net(pixel_values_videos=clips).last_hidden_state  # (b*k, h*w, D)
        return tok.float().unflatten(0, (b, -1))


def build_encoder(cfg: EncoderConfig) -> FrameEncoder:
    kinds = {"patch": PatchEncoder, "timm": TimmEncoder, "vjepa2": VJEPA2Encoder}
    return kinds[cfg.kind](cfg)


def align_actions(actions: torch.Tensor, tubelet: int, mode: Literal["sum", "stack"] = "sum") -> torch.Tensor:
    """Per-frame actions (B, T-1, A) (a_t: frame t -> t+1) -> per-latent actions (B, T'-1, A or tubelet*A).

    Representation k ends at frame (k+1)*u - 1, so latent k spans actions a_{(k+1)u-1} ... a_{(k+2)u-2}.
    `sum` suits displacements (delta xyz, velocities); `stack` keeps them all for a controller.
    """
    if tubelet == 1:
        return actions
    b, n, a = actions.shape
    t_prime = (n + 1) // tubelet
    idx = torch.arange(t_prime - 1, device=actions.device)[:, None] * tubelet + tubelet - 1
    idx = idx + torch.arange(tubelet, device=actions.device)[None]  # (T'-1, u)
    got = actions[:, idx]  # (B, T'-1, u, A)
    return got.sum(2) if mode == "sum" else got.flatten(2)
