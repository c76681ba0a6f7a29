"""Information-content regularisers on latent actions: sparse, noisy, discrete, none.

Each maps the IDM's raw output (last dim `raw_dim`) to z and returns (z, loss, stats), stats a dict of floats.
All work on the last dimension, so pooled (B, T, dz) and per-token (B, T, N, dz) latents are both fine.
`progress` in [0, 1] drives the warm-up of sparse and noisy (SMALL-SCALE-NOTES: without it the latent is ignored
(sparse) or collapses (noisy)): weight 0 for the first `warmup_start` of training, then a linear ramp.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from lawm.config import require


@dataclass(kw_only=True)
class RegConfig:
    kind: Literal["sparse", "noisy", "discrete", "none"] = "noisy"
    # sparse: capacity knob l1; fixed weights from the paper
    l1: float = 0.01
    l2: float = 1.0
    var: float = 0.1
    cov: float = 0.001
    mean: float = 0.1
    # noisy: capacity knob beta
    beta: float = 5e-5
    logvar_init: float = -4.0
    # discrete: capacity knob codebook_size
    codebook_size: int = 64
    commitment: float = 0.25
    # unused codes are reset after this many latents (paper: ~2.5M; small runs need far fewer)
    reset_every: int = 50_000
    # warm-up of the sparse / noisy terms, as fractions of training
    warmup_start: float = 0.25
    warmup_ramp: float = 0.25
    near_zero: float = 0.05  # |z| below this counts as a near-zero entry in stats

    def validate(self) -> None:
        require(self.codebook_size >= 2, "codebook_size", "needs at least 2 codes")
        require(self.l1 >= 0 and self.beta >= 0, "l1", "weights must be >= 0")
        require(0 <= self.warmup_start <= 1 and self.warmup_ramp >= 0, "warmup_start", "fractions of training")


def warmup(progress: float, start: float, ramp: float) -> float:
    if progress < start:
        return 0.0
    return 1.0 if ramp <= 0 else min(1.0, (progress - start) / ramp)


def latent_stats(z: torch.Tensor, near_zero: float) -> dict[str, float]:
    z = z.detach().float()
    return {"z_norm": z.norm(dim=-1).mean().item(), "z_near_zero": (z.abs() < near_zero).float().mean().item()}


class Regularizer(nn.Module):
    def __init__(self, cfg: RegConfig, dim: int):
        super().__init__()
        self.cfg, self.dim = cfg, dim
        self.raw_dim = dim

    def init_head(self, head: nn.Linear) -> None:
        """Hook to initialise the IDM's output layer (noisy sets the log-variance bias)."""


class NoReg(Regularizer):
    def forward(self, raw, progress: float = 1.0):
        return raw, raw.new_zeros(()), latent_stats(raw, self.cfg.near_zero)


def sparse_terms(z: torch.Tensor, cfg: RegConfig) -> dict[str, torch.Tensor]:
    """Paper's VCM + energy on Z (n, D). Where the transcription looks wrong we chose (and test) this reading:
    - energy norm term max(sqrt(D) - ||z||_2, 0): a floor on the norm (the variance term already puts ||z||_2
      near sqrt(D)); the transcribed ||z||_2^2 would be a much weaker floor of D^(1/4).
    - mean term (1/D) sum_d |mean_n Z_nd|: centres each dimension; the transcribed signed sum is unbounded below.
    """
    n, d = z.shape
    std = torch.sqrt(z.var(dim=0) + 1e-4) if n > 1 else z.new_ones(d)
    var_t = F.relu(1 - std).mean()
    if n > 1 and d > 1:
        zc = z - z.mean(0)
        cov = zc.T @ zc / (n - 1)
        off = cov - torch.diag(torch.diag(cov))
        cov_t = off.pow(2).sum() / (d * (d - 1))
    else:
        cov_t = z.new_zeros(())
    mean_t = z.mean(0).abs().mean()
    norm_t = F.relu(math.sqrt(d) - z.norm(dim=-1)).mean()
    l1_t = z.abs().sum(-1).mean()
    total = cfg.var * var_t + cfg.cov * cov_t + cfg.mean * mean_t + cfg.l2 * norm_t + cfg.l1 * l1_t
    return {"var": var_t, "cov": cov_t, "mean": mean_t, "norm": norm_t, "l1": l1_t, "total": total}


class SparseReg(Regularizer):
    def forward(self, raw, progress: float = 1.0):
        terms = sparse_terms(raw.reshape(-1, self.dim).float(), self.cfg)
        w = warmup(progress, self.cfg.warmup_start, self.cfg.warmup_ramp)
        stats = latent_stats(raw, self.cfg.near_zero)
        stats.update({f"sparse_{k}": v.item() for k, v in terms.items()}, reg_weight=w)
        return raw, w * terms["total"], stats


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per dimension."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)


class NoisyReg(Regularizer):
    def __init__(self, cfg, dim):
        super().__init__(cfg, dim)
        self.raw_dim = 2 * dim  # mean and log-variance

    def init_head(self, head):
        # a small initial variance lets the world model learn to use z before the KL (warm-up) squeezes it
        with torch.no_grad():
            head.bias[self.dim :].fill_(self.cfg.logvar_init)

    def forward(self, raw, progress: float = 1.0):
        mu, logvar = raw.float().chunk(2, dim=-1)
        logvar = logvar.clamp(-20, 10)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        kl_dim = gaussian_kl(mu, logvar)
        kl = kl_dim.sum(-1).mean()
        w = warmup(progress, self.cfg.warmup_start, self.cfg.warmup_ramp)
        stats = latent_stats(mu, self.cfg.near_zero)
        per_dim = kl_dim.detach().reshape(-1, self.dim).mean(0)
        stats.update(kl=kl.item(), kl_active_dims=(per_dim > 0.01).float().mean().item(),
                     z_std=(0.5 * logvar.detach()).exp().mean().item(), reg_weight=w)
        return z.to(raw.dtype), w * self.cfg.beta * kl, stats


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def _broadcast_from_rank0(t: torch.Tensor) -> None:
    if _distributed():
        torch.distributed.broadcast(t, src=0)


class VectorQuantizer(Regularizer):
    """VQ with a straight-through gradient, commitment loss and dead-code reset.

    Unused codes (no assignment since the last reset) are moved onto random latents of the current batch every
    `reset_every` latents, so they compete again (LAPA/LAPO report index collapse without it). Codes are first
    set from the first training batch.

    Under torch.distributed (DDP) the codebook stays identical on every rank: the first-batch initialisation and
    every reset are computed on each rank and then rank 0's codebook is broadcast; usage counts and the number of
    latents seen are all-reduced every training step, so all ranks find the same dead codes at the same step.
    Gradients are averaged by DDP, so identical codebooks stay identical. Evaluation (eval mode) makes no
    collective calls, so one rank alone may evaluate. A single process is unchanged.
    """

    def __init__(self, cfg, dim):
        super().__init__(cfg, dim)
        k = cfg.codebook_size
        self.codebook = nn.Parameter(torch.randn(k, dim) / math.sqrt(dim))
        self.register_buffer("usage", torch.zeros(k))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def quantise(self, flat: torch.Tensor) -> torch.Tensor:
        cb = self.codebook.float()
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ cb.T + cb.pow(2).sum(1)[None]
        return d.argmin(1)

    @torch.no_grad()
    def reset_dead_codes(self, flat: torch.Tensor) -> int:
        dead = (self.usage == 0).nonzero().flatten()
        if len(dead):
            pick = torch.randint(len(flat), (len(dead),), device=flat.device)
            noise = 0.01 * flat.std() * torch.randn(len(dead), self.dim, device=flat.device)
            self.codebook.data[dead] = (flat[pick] + noise).to(self.codebook.dtype)
            _broadcast_from_rank0(self.codebook.data)  # rank 0's batch supplies the new codes on every rank
        self.usage.zero_()
        self.seen.zero_()
        return len(dead)

    def forward(self, raw, progress: float = 1.0):
        flat = raw.reshape(-1, self.dim).float()
        if self.training and not bool(self.initialised):
            with torch.no_grad():
                pick = torch.randint(len(flat), (self.cfg.codebook_size,), device=flat.device)
                self.codebook.data.copy_(flat[pick] + 0.01 * flat.std() * torch.randn_like(self.codebook))
                _broadcast_from_rank0(self.codebook.data)
                self.initialised.fill_(True)
        idx = self.quantise(flat.detach())
        q = self.codebook.float()[idx]
        loss = F.mse_loss(q, flat.detach()) + self.cfg.commitment * F.mse_loss(flat, q.detach())
        z = flat + (q - flat).detach()  # straight-through
        counts = torch.bincount(idx, minlength=self.cfg.codebook_size).float()
        n_seen = counts.new_tensor([len(flat)])
        if self.training and _distributed():  # every rank counts every rank's assignments
            both = torch.cat([counts, n_seen])
            torch.distributed.all_reduce(both)
            counts, n_seen = both[:-1], both[-1:]
        stats = latent_stats(q, self.cfg.near_zero)
        p = counts / counts.sum()
        stats.update(code_usage=(counts > 0).float().mean().item(),
                     perplexity=torch.exp(-(p * (p + 1e-10).log()).sum()).item())
        if self.training:
            self.usage += counts
            self.seen += int(n_seen.item())
            stats["codes_reset"] = float(self.reset_dead_codes(flat.detach())) if self.seen >= self.cfg.reset_every else 0.0
        return z.view_as(raw).to(raw.dtype), loss, stats


def build_regularizer(cfg: RegConfig, dim: int) -> Regularizer:
    kinds = {"sparse": SparseReg, "noisy": NoisyReg, "discrete": VectorQuantizer, "none": NoReg}
    return kinds[cfg.kind](cfg, dim)
