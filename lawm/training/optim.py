"""Optimisers and schedule: AdamW, or Muon (the hidden matrices of attention and MLPs) + AdamW (the rest) as in
the paper; linear warmup then cosine decay.

Which parameters Muon takes is decided by module role, never by parameter name (`muon_parameters`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from lawm.config import require

# Modules whose nn.Linear weights are hidden matrices (input and output both internal activations): self- and
# cross-attention projections and the transformer MLP. Everything else goes to AdamW, by decision:
# - input projections (`inp`, the conditioning MLPs embedding z or an action, the controller's action MLP) and
#   output heads (`out`, the IDM's `head`): they talk to the outside space, not to the residual stream, and
#   Muon's recipe (Jordan et al.) keeps embeddings and heads on AdamW;
# - AdaLN-zero modulations (`ada`, `final_ada`): zero-initialised maps writing the per-channel shift/scale/gate
#   of every block. The paper names no rule for them. On AdamW their first steps have RMS ~lr = 6.25e-4, so each
#   block leaves the identity gradually (as in DiT); Muon would give the L preset's (6144, 128) map steps of
#   0.02/sqrt(128) = 1.8e-3 in every singular direction at once (2.8x larger, full rank from step one);
# - norms, biases, the VQ codebook: not matrices in Muon's sense (vectors, or a set of points).


def muon_module_types() -> tuple[type[nn.Module], ...]:
    """(Attention, CrossAttention, Mlp); imported on use, so the loop imports without the model stack."""
    from lawm.models.layers import Attention, CrossAttention, Mlp

    return Attention, CrossAttention, Mlp


@dataclass(kw_only=True)
class OptimConfig:
    name: Literal["adamw", "muon"] = "adamw"
    lr: float = 6.25e-4  # AdamW learning rate (paper: 6.25e-4 at batch 1024)
    muon_lr: float = 0.02  # paper: 0.02 for the Muon part
    # How Muon turns muon_lr into a step (torch.optim.Muon's adjust_lr_fn). The orthogonalised update O of an
    # (out, in) matrix has singular values ~1, so RMS(O) = 1/sqrt(max(out, in)).
    # - "original" (default; Keller Jordan's Muon, the recipe "Muon at lr 0.02" comes from): step = lr *
    #   sqrt(max(1, out/in)) * O, so RMS(step) = lr / sqrt(in) whatever the shape. At the paper's width 1024:
    #   0.02 / sqrt(1024) = 6.25e-4 = the paper's AdamW lr — the two optimisers take steps of the same RMS.
    # - "match_rms_adamw" (Moonlight): step = lr * 0.2 * sqrt(max(out, in)) * O, so RMS(step) = 0.2 * lr = 4e-3
    #   for every shape: 6.4x the original on a 1024x1024 matrix, 12.8x on the MLP's 1024x4096 fc2. Meant for
    #   reusing an AdamW lr (~2e-4 to 1e-3) as muon_lr, not for lr 0.02.
    muon_scaling: Literal["original", "match_rms_adamw"] = "original"
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


def muon_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable weights Muon takes: 2-D weights of the nn.Linear layers inside muon_module_types(), by name."""
    out, seen, kinds = [], set(), muon_module_types()
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, kinds):
            continue
        for lin_name, lin in mod.named_modules():
            w = getattr(lin, "weight", None)
            if isinstance(lin, nn.Linear) and w is not None and w.requires_grad and w.ndim == 2 and id(w) not in seen:
                seen.add(id(w))
                out.append((".".join(n for n in (mod_name, lin_name, "weight") if n), w))
    return out


def build_optimizers(model: nn.Module, cfg: OptimConfig) -> list[torch.optim.Optimizer]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = lambda p: p.ndim >= 2  # noqa: E731 - no weight decay on norms and biases
    muon = [p for _, p in muon_parameters(model)] if cfg.name == "muon" else []
    muon_ids = {id(p) for p in muon}
    rest = [(n, p) for n, p in params if id(p) not in muon_ids]
    groups = [{"params": [p for _, p in rest if decay(p)], "weight_decay": cfg.weight_decay},
              {"params": [p for _, p in rest if not decay(p)], "weight_decay": 0.0}]
    opts: list[torch.optim.Optimizer] = [torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr,
                                                           betas=tuple(cfg.betas))]
    if muon:
        opts.append(torch.optim.Muon(muon, lr=cfg.muon_lr, weight_decay=cfg.weight_decay,
                                     adjust_lr_fn=cfg.muon_scaling))
    return opts


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    warm = int(cfg.warmup_frac * total)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_schedulers(opts: list[torch.optim.Optimizer], total: int, cfg: OptimConfig):
    return [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, total, cfg)) for o in opts]
