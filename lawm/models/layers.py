"""Transformer pieces shared by every model: 3-axis RoPE, block-causal masks, blocks with optional AdaLN-zero.

Token tensors are kept as (B, T, N, W) so that frame-wise conditioning broadcasts over a frame's N tokens
without materialising a per-token copy; they are flattened to (B, T*N, W) only inside attention.

Autoregressive rollouts step frame by frame with a `KVCache`: block-causal attention means a frame's keys and
values never change once it is seen, so a step computes only the new frame's tokens, attending to the cached keys
of the earlier frames. Without it step t recomputes all t frames (nav planning, 4 context frames + 8 steps: 60
frame passes per candidate instead of 8, and a (12*64)^2 score matrix per head). A cache filled at batch 1 (a
shared context) serves a batch of any size: it is broadcast on the first step, never copied before.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def grid_positions(t: int, h: int, w: int, device=None, t0: int = 0) -> torch.Tensor:
    """(t*h*w, 3) integer positions (time, row, col), time-major like the token order."""
    tt, hh, ww = torch.meshgrid(
        torch.arange(t0, t0 + t, device=device), torch.arange(h, device=device), torch.arange(w, device=device),
        indexing="ij",
    )
    return torch.stack([tt, hh, ww], dim=-1).reshape(-1, 3)


class Rope3D(nn.Module):
    """Rotary embedding over (time, height, width): each axis rotates its own slice of the head dimension.

    Each axis gets 2*(head_dim//6) channels; leftover channels are not rotated (as V-JEPA 2 does).
    """

    def __init__(self, head_dim: int, theta: float = 100.0):
        super().__init__()
        self.axis_dim = 2 * (head_dim // 6)
        if self.axis_dim == 0:
            raise ValueError(f"head_dim {head_dim} too small for 3-axis RoPE (need >= 6)")
        freqs = theta ** (-torch.arange(0, self.axis_dim, 2).float() / self.axis_dim)
        self.register_buffer("freqs", freqs, persistent=False)

    def angles(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos (L, 3) -> cos, sin of shape (L, 3*axis_dim/2)."""
        ang = torch.cat([pos[:, i, None].float() * self.freqs[None] for i in range(3)], dim=-1)
        return ang.cos(), ang.sin()

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, heads, L, head_dim): rotate consecutive channel pairs of the first 2*P channels."""
        p = cos.shape[-1]
        rot, rest = x[..., : 2 * p], x[..., 2 * p :]
        rot = rot.float().unflatten(-1, (p, 2))
        x0, x1 = rot[..., 0], rot[..., 1]
        out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)
        return torch.cat([out, rest], dim=-1)


def block_causal_mask(t: int, n: int, device=None) -> torch.Tensor | None:
    """Bool (t*n, t*n), True = may attend: a token of frame i sees every token of frames <= i."""
    if t <= 1:
        return None
    frame = torch.arange(t, device=device).repeat_interleave(n)
    return frame[:, None] >= frame[None, :]


# Block-causal attention has two paths. CPU (and any device without FlexAttention): SDPA with the boolean mask above,
# which PyTorch's fused GPU kernels refuse (an arbitrary mask sends SDPA to its unfused math kernel and materialises
# the (L, L) scores). CUDA: FlexAttention with a BlockMask built from the same rule, compiled once per process, which
# skips whole masked blocks and never materialises the mask. `attention="sdpa" | "flex"` forces one; the two agree to
# bf16 tolerance (tests/test_models_world.py on CPU, bench/gpu_step.py on the GPU, gradients included).
ATTENTION_KINDS = ("auto", "sdpa", "flex")
_FLEX = {}


def _flex_attention():
    """FlexAttention, compiled on first use (eager FlexAttention is a slow reference); None when torch lacks it."""
    if "fn" not in _FLEX:
        try:
            from torch.nn.attention.flex_attention import flex_attention
        except ImportError:  # torch < 2.5
            _FLEX["fn"] = None
        else:
            _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
            _FLEX["eager"] = flex_attention
    return _FLEX["fn"]


def block_causal_block_mask(t: int, n: int, device) -> "object":
    """The FlexAttention BlockMask of `block_causal_mask(t, n)`: query token q may see key token k iff frame(k) <=
    frame(q), frame = index // n. Cached per shape and device (building one costs a kernel launch per block row)."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (t, n, str(device))
    if key not in _FLEX:
        def rule(b, h, q, k):
            return (k // n) <= (q // n)

        _FLEX[key] = create_block_mask(rule, None, None, t * n, t * n, device=device)
    return _FLEX[key]


class KVCache:
    """Keys and values (after RoPE) of the frames one block has seen, (B, heads, L, head_dim). Tensors are never
    written in place, so `StepCache.fork()` can share them: the fork grows without changing this one (a shared
    context, reused by every rollout of a CEM iteration)."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' keys/values; returns all of them. A batch-1 cache broadcasts to k's batch."""
        if self.k is not None:
            b = k.shape[0]
            k = torch.cat([self.k.expand(b, -1, -1, -1), k], dim=2)
            v = torch.cat([self.v.expand(b, -1, -1, -1), v], dim=2)
        self.k, self.v = k, v
        return k, v


class StepCache:
    """One `KVCache` per block of a Transformer, and how many frames they hold (the next frame's time index)."""

    def __init__(self, depth: int):
        self.layers = [KVCache() for _ in range(depth)]
        self.frames = 0

    def fork(self) -> "StepCache":
        new = StepCache(len(self.layers))
        for mine, theirs in zip(self.layers, new.layers):
            theirs.k, theirs.v = mine.k, mine.v
        new.frames = self.frames
        return new


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, rope=None, mask=None, cache: KVCache | None = None):
        b, l, w = x.shape
        q, k, v = self.qkv(x).view(b, l, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = Rope3D.rotate(q, *rope), Rope3D.rotate(k, *rope)
        if cache is not None:
            k, v = cache.extend(k, v)
        if mask is not None and not isinstance(mask, torch.Tensor):  # a FlexAttention BlockMask
            flex = _FLEX["fn"] if q.is_cuda else _FLEX["eager"]  # eager on CPU: the agreement test only
            y = flex(q, k, v, block_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(b, l, w))


class CrossAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, ctx):
        b, lq, w = x.shape
        h, d = self.heads, w // self.heads
        q = self.q(x).view(b, lq, h, d).transpose(1, 2)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, h, d).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, lq, w))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Mlp(nn.Module):
    """Linear -> GELU -> Linear back to `width`. Parameter names (fc1, fc2), initialisation and the order of random
    draws are those of timm's `Mlp`, which lawm used before: its checkpoints load and a seed builds the same weights.
    Our own because `import timm` cost every process (each training worker, each encode actor) 1.8 s on 2 CPUs."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block. With `cond_width`, AdaLN-zero (DiT): a zero-initialised linear map of the
    conditioning gives shift/scale of both norms and gates of both residual branches, so at initialisation
    the norms are plain LayerNorms and the gates are 0: the block is exactly the identity map, whatever c is.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, cond_width: int | None = None):
        super().__init__()
        self.cond = cond_width is not None
        # affine LN would duplicate what the modulation already learns
        self.norm1 = nn.LayerNorm(width, elementwise_affine=not self.cond, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=not self.cond, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        if self.cond:
            self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_width, 6 * width))
            nn.init.zeros_(self.ada[1].weight)
            nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None, rope=None, mask=None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x (B, T, N, W); c (B, T, 1 or N, C) conditioning per frame (or per token)."""
        b, t, n, w = x.shape
        if self.cond:
            sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=-1)
            h = modulate(self.norm1(x), sh1, sc1)
            x = x + g1 * self.attn(h.reshape(b, t * n, w), rope, mask, cache).view(b, t, n, w)
            x = x + g2 * self.mlp(modulate(self.norm2(x), sh2, sc2))
        else:
            x = x + self.attn(self.norm1(x).reshape(b, t * n, w), rope, mask, cache).view(b, t, n, w)
            x = x + self.mlp(self.norm2(x))
        return x


class Transformer(nn.Module):
    """A stack of blocks over (B, T, N, W) tokens with 3-axis RoPE and an optional block-causal mask."""

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float = 4.0, cond_width: int | None = None,
                 causal: bool = True, rope_theta: float = 100.0, attention: str = "auto"):
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention: {attention!r} is not one of {ATTENTION_KINDS}")
        self.causal, self.attention = causal, attention
        self.rope = Rope3D(width // heads, rope_theta)
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, cond_width) for _ in range(depth)])
        self.apply(_init_linear)
        for blk in self.blocks:  # re-zero AdaLN after the generic init
            if blk.cond:
                nn.init.zeros_(blk.ada[1].weight)
                nn.init.zeros_(blk.ada[1].bias)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], c: torch.Tensor | None = None, t0: int = 0,
                cache: StepCache | None = None):
        """x (B, T, N, W) -> (B, T, N, W). With `cache`, x holds the frames after the cached ones (their time index
        starts at cache.frames, and t0 is ignored): they attend to the cached keys, and the cache takes theirs."""
        b, t, n, w = x.shape
        if cache is None:
            mask = self._mask(t, n, x.device) if self.causal and t > 1 else None
        else:
            if not self.causal:
                raise ValueError("a step cache needs a causal Transformer (a full-attention frame sees its future)")
            t0 = cache.frames
            mask = self._mask(t, n, x.device) if t0 == 0 and t > 1 else None
            if t0 > 0 and t > 1:  # several new frames after cached ones: every cached frame, block-causal among new
                frame = torch.arange(t0 + t, device=x.device).repeat_interleave(n)
                mask = frame[t0 * n :, None] >= frame[None, :]
        rope = self.rope.angles(grid_positions(t, grid[0], grid[1], x.device, t0))
        for i, blk in enumerate(self.blocks):
            x = blk(x, c, rope, mask, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.frames += t
        return x

    def new_cache(self) -> StepCache:
        return StepCache(len(self.blocks))

    def _mask(self, t: int, n: int, device: torch.device):
        kind = self.attention
        if kind == "auto":
            kind = "flex" if device.type == "cuda" and _flex_attention() is not None else "sdpa"
        if kind == "flex":
            if _flex_attention() is None:
                raise RuntimeError("attention='flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
            return block_causal_block_mask(t, n, device)
        return block_causal_mask(t, n, device)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
