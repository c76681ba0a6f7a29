"""World model p(s_0:t, z_t) -> s_t+1: a ViT over all tokens of all frames, block-causal in time.

One pass predicts every next frame (teacher forcing): output frame t is the prediction of s_{t+1}. Conditioning is
frame-wise AdaLN-zero on z_t (or token-wise when z carries one latent per token). Frame t's tokens also see the
tokens of earlier frames, which were modulated by earlier latents: these are past actions, so nothing leaks.

Rollouts (`prefill`, then `rollout`) step one frame at a time through a `StepCache` (lawm.models.layers): each
step computes only the new frame, and equals re-running the whole sequence (tests/test_models_world.py).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional

import torch
import torch.nn as nn

from lawm.config import require
from lawm.models.layers import StepCache, Transformer, modulate

# width, depth, heads, cond_width. L: 24 x 1024 ~ 300 M in the blocks; cond_width 128 keeps AdaLN at ~19 M
# (DiT's cond_width = width would add 150 M of modulation weights for a 128-d input).
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (64, 3, 4, 64),
    "S": (384, 12, 6, 128),
    "B": (768, 12, 12, 128),
    "L": (1024, 24, 16, 128),
}


@dataclass(kw_only=True)
class WorldModelConfig:
    """Shape = the preset of `size`, field by field overridden by width/depth/heads/cond_width when set.

    The config holds only what was asked for (None = "from the preset") and `resolved()` works the shape out at
    build time, so `dataclasses.replace(cfg, size="B")` means B's shape, and a checkpoint keeps size + overrides.
    """
    size: Literal["tiny", "S", "B", "L"] = "tiny"
    width: Optional[int] = None  # None = take it from `size`
    depth: Optional[int] = None
    heads: Optional[int] = None
    cond_width: Optional[int] = None
    mlp_ratio: float = 4.0
    # Predict s_t + delta: at init the model is the copy-last-frame baseline, and it only has to learn the change,
    # which is small between consecutive frames (a far easier target than s_{t+1} itself).
    residual: bool = True
    rope_theta: float = 100.0

    def resolved(self) -> "WorldModelConfig":
        """A copy with every shape field filled in: the override where one was given, else the preset's."""
        w, d, h, c = PRESETS[self.size]
        pick = lambda v, default: default if v is None else v  # noqa: E731
        return replace(self, width=pick(self.width, w), depth=pick(self.depth, d), heads=pick(self.heads, h),
                       cond_width=pick(self.cond_width, c))

    def validate(self) -> None:
        r = self.resolved()
        require(all(v >= 1 for v in (r.width, r.depth, r.heads, r.cond_width)), "width",
                "width, depth, heads and cond_width must be >= 1")
        require(r.width % r.heads == 0, "width", "must be divisible by heads")
        require(r.width // r.heads >= 6, "heads", "head dim must be >= 6 for 3-axis RoPE")


class WorldModel(nn.Module):
    def __init__(self, cfg: WorldModelConfig, feat_dim: int, grid: tuple[int, int], cond_dim: int):
        super().__init__()
        self.cfg, self.grid = cfg, tuple(grid)  # cfg as given (size + overrides): what a checkpoint stores
        shape = cfg.resolved()
        w, cw = shape.width, shape.cond_width
        self.inp = nn.Linear(feat_dim, w)
        # default (fan-in) init keeps z's signal at unit scale; std 0.02 would shrink it ~100x at small widths
        self.cond = nn.Sequential(nn.Linear(cond_dim, cw), nn.SiLU(), nn.Linear(cw, cw))
        self.body = Transformer(w, shape.depth, shape.heads, cfg.mlp_ratio, cond_width=cw, causal=True,
                                rope_theta=cfg.rope_theta)
        self.norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(cw, 2 * w))
        self.out = nn.Linear(w, feat_dim)
        for lin in (self.final_ada[1], self.out):  # zero output: prediction = s_t at init (residual)
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, s: torch.Tensor, z: torch.Tensor, t0: int = 0, cache: StepCache | None = None
                ) -> torch.Tensor:
        """s (B, T, N, D), z (B, T, dz) or (B, T, N, dz) -> predictions of s_1..s_T, (B, T, N, D).
        With `cache`: s holds the frames after the cached ones (see `Transformer.forward`)."""
        c = self.cond(z)
        if c.dim() == 3:
            c = c[:, :, None]  # frame-wise: broadcast over the frame's tokens
        x = self.body(self.inp(s), self.grid, c, t0, cache)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        delta = self.out(modulate(self.norm(x), shift, scale))
        return s + delta.to(s.dtype) if self.cfg.residual else delta.to(s.dtype)

    @torch.no_grad()
    def prefill(self, s: torch.Tensor, z: torch.Tensor) -> StepCache:
        """A cache over frames s (B, T, N, D) conditioned on z (B, T, dz); T may be 0. Batch 1 serves any batch."""
        if z.shape[1] != s.shape[1]:
            raise ValueError(f"prefill: {s.shape[1]} frames need {s.shape[1]} conditions (latents or actions), "
                             f"got {z.shape[1]}")
        cache = self.body.new_cache()
        if s.shape[1]:
            self(s, z, cache=cache)
        return cache

    @torch.no_grad()
    def rollout(self, last: torch.Tensor, z_seq: torch.Tensor, cache: StepCache) -> torch.Tensor:
        """From the last observed frame (B, 1, N, D), the frames before it in `cache` (left as it was: forked),
        apply z_seq (B, H, dz) autoregressively -> the predicted frames (B, H, N, D), float32."""
        cache, out = cache.fork(), []
        last = last.expand(z_seq.shape[0], -1, -1, -1)
        for h in range(z_seq.shape[1]):
            nxt = self(last, z_seq[:, h : h + 1], cache=cache)
            out.append(nxt.float())
            last = nxt
        return torch.cat(out, dim=1)
