"""Optimisers and schedule: Muon takes the hidden matrices, AdamW the rest; warmup then cosine."""
from __future__ import annotations

import pytest
import torch

from lawm.models.lam import LatentActionWorldModel, lam_preset
from lawm.training.optim import OptimConfig, build_optimizers, build_schedulers, lr_factor


def test_muon_and_adamw_split_the_parameters_and_both_step():
    model = LatentActionWorldModel(lam_preset("tiny", feat_dim=12, grid_h=2, grid_w=2, latent_dim=8))
    opts = build_optimizers(model, OptimConfig(name="muon"))
    assert [type(o).__name__ for o in opts] == ["AdamW", "Muon"]
    owned = [id(p) for o in opts for g in o.param_groups for p in g["params"]]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    assert all(p.ndim == 2 for g in opts[1].param_groups for p in g["params"])
    s = torch.randn(2, 3, 4, 12)
    before = [p.detach().clone() for p in model.parameters()]
    model(s)["loss"].backward()
    for o in opts:
        o.step()
    moved = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
    assert sum(moved) > len(moved) // 2


def test_warmup_then_cosine():
    cfg = OptimConfig(warmup_frac=0.1, min_lr_frac=0.0)
    factors = [lr_factor(s, 100, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:])) and factors[-1] < 0.01
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_schedulers([opt], 100, cfg)[0]
    for _ in range(10):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(lr_factor(10, 100, cfg))
