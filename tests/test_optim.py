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


def _objectives() -> dict:
    """One small instance of every training objective, as the stages build them."""
    import dataclasses

    from lawm.models import (ActionWMConfig, ActionWorldModel, Controller, ControllerConfig, DecoderConfig,
                             EncoderConfig, FrameDecoder, IDMConfig, LAMConfig, RegConfig, WorldModelConfig,
                             build_encoder)
    from lawm.training.objectives import ActionWMObjective, ControllerObjective, DecoderObjective, LAMObjective

    wm = WorldModelConfig(width=24, depth=2, heads=4, cond_width=16)
    lam = lambda: LatentActionWorldModel(LAMConfig(  # noqa: E731 - the controllers freeze theirs
        feat_dim=12, grid_h=2, grid_w=2, latent_dim=8, wm=wm, idm=IDMConfig(width=24, depth=1, heads=4),
        reg=RegConfig(kind="discrete", codebook_size=4)))
    ctrl = ControllerConfig(action_dim=3, latent_dim=8, feat_dim=12, grid_h=2, grid_w=2, width=24, depth=2, heads=4)
    enc = build_encoder(EncoderConfig(kind="patch", image_size=8, patch_size=4))
    return {
        "lam": LAMObjective(lam()),
        "decoder": DecoderObjective(FrameDecoder(DecoderConfig(feat_dim=enc.dim, grid_h=2, grid_w=2, image_size=8,
                                                               width=24, depth=3, heads=4)), enc),
        "controller": ControllerObjective(lam(), {k: Controller(dataclasses.replace(ctrl, kind=k))
                                                for k in ("mlp", "cross_attention")}),
        "action_wm": ActionWMObjective(ActionWorldModel(ActionWMConfig(feat_dim=12, grid_h=2, grid_w=2, action_dim=3,
                                                                       wm=wm))),
    }


def _excluded_roles(obj: torch.nn.Module) -> dict[int, str]:
    """Parameters that must stay on AdamW, found by role: vectors (norms, biases), frozen weights, the VQ codebook,
    AdaLN modulations, and the input/output projections and conditioning/action embeddings of every model."""
    from lawm.models.layers import Block

    out = {id(p): f"{n} (vector)" for n, p in obj.named_parameters() if p.ndim != 2}
    out.update({id(p): f"{n} (frozen)" for n, p in obj.named_parameters() if not p.requires_grad})
    for name, m in obj.named_modules():
        roles = []
        if isinstance(m, Block) and m.cond:
            roles.append(("ada", m.ada))
        for attr in ("inp", "out", "head", "final_ada", "cond", "act", "net", "codebook"):
            if isinstance(getattr(m, attr, None), (torch.nn.Module, torch.nn.Parameter)):
                roles.append((attr, getattr(m, attr)))
        for role, sub in roles:
            for p in ([sub] if isinstance(sub, torch.nn.Parameter) else sub.parameters()):
                out[id(p)] = f"{name}.{role}"
    return out


def test_muon_takes_the_hidden_matrices_of_every_objective():
    # hidden matrices per transformer block: qkv, proj, fc1, fc2; the cross-attention controller adds q, kv, proj
    # and its MLP's two; the action-only controller and the frozen world model under the controllers add none
    expected = {"lam": 4 * (1 + 2), "decoder": 4 * 3, "controller": 4 * 2 + 3 + 2, "action_wm": 4 * 2}
    for name, obj in _objectives().items():
        opts = build_optimizers(obj, OptimConfig(name="muon"))
        assert len(opts) == 2, f"{name}: no Muon optimiser"
        muon = [p for g in opts[1].param_groups for p in g["params"]]
        assert len(muon) == expected[name], name
        from lawm.training.optim import muon_parameters

        assert {id(p) for p in muon} == {id(p) for _, p in muon_parameters(obj)}
        excluded = _excluded_roles(obj)
        wrong = [excluded[id(p)] for p in muon if id(p) in excluded]
        assert not wrong, f"{name}: Muon took {wrong}"
        adamw = {id(p) for g in opts[0].param_groups for p in g["params"]}
        trainable = {id(p) for p in obj.parameters() if p.requires_grad}
        assert adamw | {id(p) for p in muon} == trainable and not adamw & {id(p) for p in muon}


def _one_muon_step(cfg: OptimConfig) -> dict[str, float]:
    """RMS of the first update of each Muon matrix of a transformer MLP (64 -> 256 -> 64), weights from 0."""
    from lawm.models.layers import Mlp

    torch.manual_seed(0)
    mlp = Mlp(64, 256)
    with torch.no_grad():
        for p in mlp.parameters():
            p.zero_()
    opt = build_optimizers(mlp, cfg)[-1]
    assert type(opt).__name__ == "Muon"
    for p in mlp.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return {"fc1": mlp.fc1.weight.pow(2).mean().sqrt().item(), "fc2": mlp.fc2.weight.pow(2).mean().sqrt().item()}


def test_muon_default_step_is_the_papers_recipe_with_the_original_scaling():
    """Default: RMS(update) = muon_lr / sqrt(fan_in) for every shape (0.02/sqrt(1024) = 6.25e-4 at width 1024, the
    paper's AdamW lr). Newton-Schulz's 5 steps leave singular values a little under 1 (measured 0.86-0.89)."""
    cfg = OptimConfig(name="muon", weight_decay=0.0)
    rms = _one_muon_step(cfg)
    assert cfg.muon_lr == 0.02
    assert rms["fc1"] == pytest.approx(0.02 / 64 ** 0.5, rel=0.2)  # (256, 64): fan_in 64 -> 2.5e-3
    assert rms["fc2"] == pytest.approx(0.02 / 256 ** 0.5, rel=0.2)  # (64, 256): fan_in 256 -> 1.25e-3
    assert cfg.muon_scaling == "original"
    # the option keeps Moonlight's reading: 0.2 * lr whatever the shape (2.5x and 3.2x larger steps here)
    other = _one_muon_step(OptimConfig(name="muon", weight_decay=0.0, muon_scaling="match_rms_adamw"))
    assert other["fc1"] / rms["fc1"] == pytest.approx(0.2 * 256 ** 0.5 / 4 ** 0.5, rel=1e-4)
    assert other["fc2"] / rms["fc2"] == pytest.approx(0.2 * 256 ** 0.5, rel=1e-4)
