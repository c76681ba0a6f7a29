"""Learning checks on synthetic features: overfitting a batch, and the direction of the scene-cut (leakage) effect."""
import pytest
import torch

from lawm.models import IDMConfig, LAMConfig, LatentActionWorldModel, RegConfig, WorldModelConfig

G, D = 4, 8  # 4x4 token grid, 8 channels per token
ACTIONS = torch.randn(8, D, generator=torch.Generator().manual_seed(123))


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models on a shared 2-core machine: one thread avoids oversubscription (3x faster here)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def clips(b: int, t: int, gen: torch.Generator, noise: float = 0.5) -> torch.Tensor:
    """(b, t, G*G, D): a random scene moved by one of 8 global actions per step, plus per-token innovations that
    nothing in the past predicts (what a latent can leak: a per-token latent can carry them, a pooled one cannot)."""
    frames = [torch.randn(b, G * G, D, generator=gen)]
    acts = torch.randint(0, len(ACTIONS), (b, t - 1), generator=gen)
    for k in range(t - 1):
        frames.append(frames[-1] + ACTIONS[acts[:, k]][:, None] + noise * torch.randn(b, G * G, D, generator=gen))
    return torch.stack(frames, 1)


def tiny_cfg(reg: RegConfig, mode: str = "pooled", latent: int = 32, width: int = 32, depth: int = 1) -> LAMConfig:
    return LAMConfig(feat_dim=D, grid_h=G, grid_w=G, latent_dim=latent,
                     idm=IDMConfig(width=width, depth=depth, heads=4, mode=mode),
                     wm=WorldModelConfig(width=width, depth=depth, heads=4, cond_width=width), reg=reg)


def train(model, steps, batch_fn, lr=1e-2):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        out = model(batch_fn(step), progress=step / steps)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        sched.step()
    return model


def copy_error(s: torch.Tensor) -> float:
    return (s[:, 1:] - s[:, :-1]).abs().mean().item()


def test_tiny_model_overfits_a_batch_tenfold():
    torch.manual_seed(0)
    s = clips(8, 4, torch.Generator().manual_seed(0), noise=0.0)
    model = LatentActionWorldModel(tiny_cfg(RegConfig(kind="none"), width=48, depth=2))
    first = model(s)["pred_loss"].item()
    assert first == pytest.approx(copy_error(s), rel=1e-5)  # residual + zero init: starts as copying
    train(model, 200, lambda _: s, lr=3e-3)
    assert model.one_step_error(s) < first / 10


def cut_errors(model, gen):
    """(model error across a cut, copying error across the cut) on fresh clips whose last frame is foreign."""
    a, b = clips(64, 3, gen), clips(64, 3, gen)
    cut = torch.cat([a[:, :2], b[:, 2:]], 1)
    pred = model.predict(cut[:, :-1], model.infer_latents(cut))[:, -1]
    return (pred - cut[:, -1]).abs().mean().item(), (cut[:, 1] - cut[:, -1]).abs().mean().item()


def test_scene_cut_leaks_only_with_per_token_unregularised_latent():
    gen = torch.Generator().manual_seed(1)
    results = {}
    for name, cfg in {
        "per_token_none": tiny_cfg(RegConfig(kind="none"), mode="per_token", latent=16),
        "pooled_vq": tiny_cfg(RegConfig(kind="discrete", codebook_size=8, reset_every=2000)),
        "pooled_noisy": tiny_cfg(RegConfig(kind="noisy", beta=1e-3)),
    }.items():
        torch.manual_seed(0)
        model = train(LatentActionWorldModel(cfg), 400, lambda _: clips(32, 3, gen))
        val = clips(64, 3, gen)
        results[name] = (model.one_step_error(val), copy_error(val), *cut_errors(model, gen))
    leak_err, leak_copy = results["per_token_none"][2:]
    assert leak_err < 0.4 * leak_copy, results  # rebuilds a foreign frame through z
    for name in ("pooled_vq", "pooled_noisy"):  # sparse behaves the same (checked by hand; left out for time)
        normal, copy, err, cut_copy = results[name]
        assert normal < 0.8 * copy, results  # the pooled model did learn the dynamics...
        assert err > 0.8 * cut_copy, results  # ...but cannot predict across the cut
