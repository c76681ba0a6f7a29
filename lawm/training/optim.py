"""Optimisers and schedule: AdamW, or Muon (hidden 2-D weights) + AdamW (the rest) as in the paper; linear warmup
then cosine decay."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from lawm.config import require


@dataclass
class OptimConfig:
    name: Literal["adamw", "muon"] = "adamw"
    lr: float = 6.25e-4  # AdamW learning rate (paper: 6.25e-4 at batch 1024)
    muon_lr: float = 0.02  # paper: 0.02 for the Muon part
    weight_decay: float = 0.04
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_frac: float = 0.1
    min_lr_frac: float = 0.0  # cosine decays to this fraction of the peak
    grad_clip: float = 1.0  # 0 disables
    grad_accum: int = 1

    def validate(self) -> None:
        require(self.lr > 0 and self.muon_lr > 0, "lr", "must be positive")
        require(0 <= self.warmup_frac < 1, "warmup_frac", "must be in [0, 1)")
        require(self.grad_accum >= 1, "grad_accum", "must be at least 1")
        require(len(self.betas) == 2, "betas", "needs two values")


def _muon_eligible(name: str, p: torch.Tensor) -> bool:
    """Muon orthogonalises matrix updates: hidden 2-D weights only, not embeddings, heads or AdaLN modulations
    (the zero-initialised modulation starts at 0, where orthogonalisation is undefined)."""
    return p.ndim == 2 and not any(k in name for k in ("embed", "head", "ada", "mod", "codebook", "out"))


def build_optimizers(model: nn.Module, cfg: OptimConfig) -> list[torch.optim.Optimizer]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = lambda p: p.ndim >= 2  # noqa: E731 - no weight decay on norms and biases
    muon = [p for n, p in params if cfg.name == "muon" and _muon_eligible(n, p)]
    muon_ids = {id(p) for p in muon}
    rest = [(n, p) for n, p in params if id(p) not in muon_ids]
    groups = [{"params": [p for _, p in rest if decay(p)], "weight_decay": cfg.weight_decay},
              {"params": [p for _, p in rest if not decay(p)], "weight_decay": 0.0}]
    opts: list[torch.optim.Optimizer] = [torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr,
                                                           betas=tuple(cfg.betas))]
    if muon:
        opts.append(torch.optim.Muon(muon, lr=cfg.muon_lr, weight_decay=cfg.weight_decay,
                                     adjust_lr_fn="match_rms_adamw"))
    return opts


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    warm = int(cfg.warmup_frac * total)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_schedulers(opts: list[torch.optim.Optimizer], total: int, cfg: OptimConfig):
    return [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, total, cfg)) for o in opts]
