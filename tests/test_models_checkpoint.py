"""Checkpoints: one format, config inside, weights_only loading, bit-identical outputs after a round trip."""
import pytest
import torch

from lawm.checkpoint import load_checkpoint, load_model, save_model
from lawm.models import (ActionWMConfig, ActionWorldModel, Controller, ControllerConfig, DecoderConfig,
                         EncoderConfig, FrameDecoder, IDMConfig, LAMConfig, LatentActionWorldModel, RegConfig,
                         WorldModelConfig, build_encoder)

G, D = 3, 8
SMALL_WM = WorldModelConfig(width=24, depth=1, heads=4)


def perturb(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("kind", ["none", "sparse", "noisy", "discrete"])
def test_lam_round_trip_is_bit_identical(tmp_path, kind):
    torch.manual_seed(0)
    cfg = LAMConfig(feat_dim=D, grid_h=G, grid_w=G, latent_dim=6, reg=RegConfig(kind=kind, codebook_size=4),
                    idm=IDMConfig(width=24, depth=1, heads=4), wm=SMALL_WM)
    m = LatentActionWorldModel(cfg)
    s = torch.randn(2, 3, G * G, D)
    m.train()(s)  # VQ: initialises the codebook and usage buffers, which must travel too
    perturb(m)
    path = save_model(tmp_path / "m.pt", m, extra={"step": 7})
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind
    payload = torch.load(path, weights_only=True)
    assert payload["name"] == "lam" and payload["config"]["reg"]["kind"] == kind and payload["extra"]["step"] == 7
    m2 = load_model(path).eval()
    assert m2.cfg == cfg
    assert torch.equal(m2.infer_latents(s), m.infer_latents(s))
    z = torch.randn(2, 2, 6)
    assert torch.equal(m2.predict(s[:, :2], z), m.predict(s[:, :2], z))


def test_other_models_round_trip(tmp_path):
    s, a = torch.randn(2, 3, G * G, D), torch.randn(2, 3, 5)
    models = {
        "controller": (Controller(ControllerConfig(action_dim=5, latent_dim=6, feat_dim=D, grid_h=G, grid_w=G,
                                                   width=24, heads=4)), lambda m: m(a, s)),
        "decoder": (FrameDecoder(DecoderConfig(feat_dim=D, grid_h=G, grid_w=G, image_size=12, width=24, depth=1)),
                    lambda m: m(s)),
        "action_wm": (ActionWorldModel(ActionWMConfig(feat_dim=D, grid_h=G, grid_w=G, action_dim=5, wm=SMALL_WM)),
                      lambda m: m.predict(s, a)),
        "encoder": (build_encoder(EncoderConfig(proj_dim=16, seed=5)), lambda m: m(torch.rand(1, 2, 3, 32, 32))),
    }
    for name, (model, run) in models.items():
        if name != "encoder":
            perturb(model)
        torch.manual_seed(0)
        want = run(model)
        back = load_model(save_model(tmp_path / f"{name}.pt", model))
        torch.manual_seed(0)
        assert torch.equal(run(back.eval()), want), name
        assert load_checkpoint(tmp_path / f"{name}.pt")["name"] == name


def test_rejects_foreign_files(tmp_path):
    torch.save({"a": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a lawm"):
        load_model(tmp_path / "x.pt")


def test_preset_configs_round_trip_as_size_plus_overrides(tmp_path):
    """A checkpoint stores the size and only the overrides; loading resolves the same shape (strict load)."""
    import dataclasses

    cfg = LAMConfig(feat_dim=D, grid_h=G, grid_w=G, latent_dim=6, wm=WorldModelConfig(size="tiny", depth=1),
                    idm=IDMConfig(size="tiny", depth=1))
    m = perturb(LatentActionWorldModel(cfg))
    payload = torch.load(save_model(tmp_path / "m.pt", m), weights_only=True)
    assert payload["config"]["wm"]["size"] == "tiny" and payload["config"]["wm"]["width"] is None
    assert payload["config"]["wm"]["depth"] == 1
    back = load_model(tmp_path / "m.pt").eval()
    assert back.cfg == cfg and len(back.wm.body.blocks) == 1 and back.wm.inp.out_features == 64
    s, z = torch.randn(2, 3, G * G, D), torch.randn(2, 3, 6)
    assert torch.equal(back.predict(s, z), m.predict(s, z))
    # the loaded config is still a request: changing its size gives that preset's shape, the override kept
    assert dataclasses.replace(back.cfg.wm, size="S").resolved().width == 384


def test_our_mlp_is_timms_mlp_for_old_checkpoints_and_seeds():
    """lawm.models.layers.Mlp replaced timm's (whose import cost every process 1.8 s): same parameter names, same
    weights from the same seed, same outputs, so checkpoints written with timm's load and a seed builds the same model."""
    import torch
    import torch.nn as nn
    from timm.layers import Mlp as TimmMlp

    from lawm.models.layers import Mlp

    torch.manual_seed(3)
    theirs = TimmMlp(32, 128, act_layer=nn.GELU)
    torch.manual_seed(3)
    ours = Mlp(32, 128)
    assert list(theirs.state_dict()) == list(ours.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert all(torch.equal(theirs.state_dict()[k], v) for k, v in ours.state_dict().items())
    x = torch.randn(5, 32)
    assert torch.equal(theirs(x), ours(x))
    ours.load_state_dict(TimmMlp(32, 128).state_dict())  # strict: a timm-era state dict loads as is
