"""World model, decoder, controllers, action-conditioned model: causality, AdaLN-zero, shapes, rollout."""
import dataclasses

import pytest
import torch

from lawm.models import (ActionWMConfig, ActionWorldModel, Controller, ControllerConfig, DecoderConfig,
                         FrameDecoder, IDMConfig, LAMConfig, LatentActionWorldModel, RegConfig, WorldModel,
                         WorldModelConfig, controller_loss, lam_preset, pixel_l1, psnr)
from lawm.models.layers import Block, block_causal_mask

B, T, G, D, DZ = 2, 4, 3, 8, 6


def randomise(module: torch.nn.Module) -> torch.nn.Module:
    """Give zero-initialised layers (AdaLN, outputs) weights, so causality tests exercise every path."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return module.eval()


def check_causal(fn, s, *cond):
    """Changing frames (and conditions) after t never changes outputs for frames <= t."""
    base = fn(s, *cond)
    for t in range(s.shape[1] - 1):
        s2 = s.clone()
        s2[:, t + 1:] += torch.randn_like(s2[:, t + 1:])
        cond2 = [c.clone() for c in cond]
        for c in cond2:
            c[:, t + 1:] += torch.randn_like(c[:, t + 1:])
        out = fn(s2, *cond2)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)
        assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])


def test_block_causal_mask():
    m = block_causal_mask(3, 2)
    assert m.shape == (6, 6)
    assert m[2, :4].all() and not m[2, 4:].any() and m[5].all()
    assert block_causal_mask(1, 5) is None


def test_world_model_is_block_causal_in_time():
    wm = randomise(WorldModel(WorldModelConfig(width=24, depth=2, heads=4, cond_width=16), D, (G, G), DZ))
    s, z = torch.randn(B, T, G * G, D), torch.randn(B, T, DZ)
    check_causal(wm, s, z)
    check_causal(wm, s, torch.randn(B, T, G * G, DZ))  # per-token latents


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")  # eager FlexAttention's "use torch.compile"
def test_flex_attention_path_agrees_with_the_masked_sdpa_path():
    """The GPU path (FlexAttention + BlockMask, run eagerly here) computes what the CPU path (SDPA + boolean mask)
    computes: fp32 to float precision, bf16 to bf16 tolerance, and it is block-causal on its own."""
    from lawm.models.layers import Transformer

    torch.manual_seed(0)
    sdpa = randomise(Transformer(32, 2, 4, cond_width=16, attention="sdpa"))
    flex = Transformer(32, 2, 4, cond_width=16, attention="flex").eval()
    flex.load_state_dict(sdpa.state_dict())
    x, c = torch.randn(2, 5, 6, 32), torch.randn(2, 5, 1, 16)  # 30 tokens: not a multiple of the 128-token block
    with torch.no_grad():
        ref = sdpa(x, (2, 3), c)
        torch.testing.assert_close(flex(x, (2, 3), c), ref, rtol=1e-4, atol=1e-5)
        # bf16: the two paths differ from each other by no more than bf16 rounding moves either from fp32
        a, b = flex.to(torch.bfloat16), sdpa.to(torch.bfloat16)
        xb, cb = x.bfloat16(), c.bfloat16()
        fa, fb = a(xb, (2, 3), cb).float(), b(xb, (2, 3), cb).float()
        rounding = (fb - ref).abs().max()
        assert (fa - fb).abs().max() <= 2 * rounding, ((fa - fb).abs().max(), rounding)
        check_causal(lambda s, z: flex.float()(s, (2, 3), z), x, c)
    with pytest.raises(ValueError, match="attention"):
        Transformer(32, 1, 4, attention="fused")


def test_adaln_zero_block_is_identity_at_init():
    torch.manual_seed(0)
    blk = Block(24, 4, cond_width=16)
    x = torch.randn(B, T, 5, 24)
    for c in (torch.randn(B, T, 1, 16), 10 * torch.randn(B, T, 5, 16)):
        assert torch.equal(blk(x, c), x)  # gates are exactly 0: the block is the identity whatever c is
        # and the modulated norm is exactly the plain norm (shift = scale = 0)
        sh, sc = blk.ada(c).chunk(6, -1)[:2]
        assert torch.equal(blk.norm1(x) * (1 + sc) + sh, blk.norm1(x))


def test_world_model_starts_as_copy_and_ignores_z():
    wm = WorldModel(WorldModelConfig(), D, (G, G), DZ)
    s = torch.randn(B, T, G * G, D)
    assert torch.equal(wm(s, torch.randn(B, T, DZ)), s)


def test_presets_resolve_and_can_be_overridden():
    r = WorldModelConfig(size="L").resolved()
    assert (r.width, r.depth, r.heads, r.cond_width) == (1024, 24, 16, 128)
    assert WorldModelConfig(size="S", depth=2).resolved().depth == 2
    assert WorldModelConfig(size="S", depth=2).resolved().width == 384


def test_changing_size_means_the_new_presets_shape():
    """replace(size=...) on a built config gives that preset's shape; explicit overrides still win."""
    tiny = lam_preset("tiny")
    LatentActionWorldModel(dataclasses.replace(tiny, feat_dim=D, grid_h=G, grid_w=G))  # built once, as a stage does
    # the built model has the shape of the size it was given, layer by layer
    wm = WorldModel(dataclasses.replace(tiny.wm, size="S"), D, (G, G), DZ)
    assert wm.inp.out_features == 384 and len(wm.body.blocks) == 12
    big = dataclasses.replace(tiny.wm, size="B").resolved()
    assert (big.width, big.depth, big.heads, big.cond_width) == (768, 12, 12, 128)
    idm = dataclasses.replace(tiny.idm, size="B").resolved()
    assert (idm.width, idm.depth, idm.heads) == (768, 6, 12)
    kept = dataclasses.replace(WorldModelConfig(size="tiny", depth=5), size="S").resolved()
    assert (kept.width, kept.depth) == (384, 5)


def test_lam_predict_rollout_and_capacity():
    torch.manual_seed(0)
    cfg = LAMConfig(feat_dim=D, grid_h=G, grid_w=G, latent_dim=DZ, reg=RegConfig(kind="noisy"),
                    idm=IDMConfig(width=24, depth=1, heads=4), wm=WorldModelConfig(width=24, depth=2, heads=4))
    m = randomise(LatentActionWorldModel(cfg))
    s = torch.randn(B, T, G * G, D)
    out = m.train()(s, progress=0.1)
    assert out["pred"].shape == (B, T - 1, G * G, D) and out["z"].shape == (B, T - 1, DZ)
    assert out["reg_loss"].item() == 0.0  # KL off during the first 25 % of training
    assert {"z_norm", "kl", "pred_loss"} <= out["stats"].keys()
    assert all(isinstance(v, float) for v in out["stats"].values())
    z = m.infer_latents(s)
    assert m.training  # restored
    torch.testing.assert_close(z, m.infer_latents(s))  # eval mode: means, deterministic
    # one autoregressive step from the first two frames = the teacher-forced prediction of frame 2
    roll = m.rollout(s[:, :2], z[:, 1:], context_z=z[:, :1])
    pred = m.eval().predict(s[:, :-1], z)
    torch.testing.assert_close(roll[:, 0], pred[:, 1], rtol=1e-4, atol=1e-4)
    assert roll.shape == (B, 2, G * G, D)
    err = m.one_step_error(s)
    assert err == pytest.approx((pred - s[:, 1:]).abs().mean().item(), rel=1e-4)


def _rerun_rollout(wm: WorldModel, context: torch.Tensor, context_z: torch.Tensor, z_seq: torch.Tensor):
    """The rollout without a cache: each step runs the whole sequence so far (the independent reference)."""
    seq, zs, out = context, context_z, []
    for h in range(z_seq.shape[1]):
        zs = torch.cat([zs, z_seq[:, h : h + 1]], dim=1)
        nxt = wm(seq, zs)[:, -1:]
        out.append(nxt)
        seq = torch.cat([seq, nxt], dim=1)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("token_wise", [False, True])
def test_cached_rollout_equals_rerunning_the_whole_sequence(token_wise):
    """The KV-cached rollout (one new frame per step) gives what re-running every frame gives, over several steps,
    from a context cached at batch 1 and stepped at batch 3; forking leaves the shared context as it was."""
    wm = randomise(WorldModel(WorldModelConfig(width=24, depth=2, heads=4), D, (G, G), DZ))
    ctx = torch.randn(1, 3, G * G, D)
    zshape = (G * G, DZ) if token_wise else (DZ,)
    ctx_z, z_seq = torch.randn(1, 2, *zshape), torch.randn(3, 4, *zshape)
    with torch.no_grad():
        ref = _rerun_rollout(wm, ctx.expand(3, -1, -1, -1), ctx_z.expand(3, *ctx_z.shape[1:]), z_seq)
        cache = wm.prefill(ctx[:, :-1], ctx_z)
        assert cache.frames == 2 and cache.layers[0].k.shape[0] == 1
        got = wm.rollout(ctx[:, -1:], z_seq, cache)
        assert cache.frames == 2 and cache.layers[0].k.shape[2] == 2 * G * G  # the fork grew, not the cache
        again = wm.rollout(ctx[:, -1:], z_seq, cache)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    # a changed latent at step 2 changes steps 2.. and not steps 0..1 (the cache keeps frame causality)
    z2 = z_seq.clone()
    z2[:, 2] += 1.0
    with torch.no_grad():
        moved = wm.rollout(ctx[:, -1:], z2, cache)
    torch.testing.assert_close(moved[:, :2], got[:, :2], rtol=0, atol=1e-6)
    assert not torch.allclose(moved[:, 2:], got[:, 2:], atol=1e-4)


def test_several_frames_after_a_cache_see_the_cache_and_are_block_causal_among_themselves():
    wm = randomise(WorldModel(WorldModelConfig(width=24, depth=2, heads=4), D, (G, G), DZ))
    s, z = torch.randn(B, 5, G * G, D), torch.randn(B, 5, DZ)
    with torch.no_grad():
        whole = wm(s, z)
        cache = wm.prefill(s[:, :2], z[:, :2])
        rest = wm(s[:, 2:], z[:, 2:], cache=cache)
    torch.testing.assert_close(rest, whole[:, 2:], rtol=1e-5, atol=1e-5)
    assert cache.frames == 5
    with pytest.raises(ValueError, match="causal"):
        from lawm.models.layers import Transformer

        full = Transformer(24, 1, 4, causal=False)
        full(torch.randn(1, 1, G * G, 24), (G, G), cache=full.new_cache())


def test_decoder_is_frame_causal_and_handles_tubelets():
    for tub in (1, 2):
        dec = randomise(FrameDecoder(DecoderConfig(feat_dim=D, grid_h=G, grid_w=G, image_size=12, tubelet=tub,
                                                   width=24, depth=2)))
        s = torch.randn(B, T, G * G, D)
        assert dec(s).shape == (B, T * tub, 3, 12, 12)
        check_causal(lambda x: dec(x).unflatten(1, (T, tub)), s)
        frames = torch.rand(B, T * tub + 1, 3, 12, 12)
        dec.loss(s, frames).backward()


def test_pixel_metrics():
    a = torch.rand(2, 3, 3, 8, 8)
    assert pixel_l1(a, a) == 0.0 and psnr(a, a) == pytest.approx(100.0)
    assert psnr(torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.1)) == pytest.approx(20.0, abs=1e-4)


def test_controllers_and_action_world_model():
    torch.manual_seed(0)
    s, a = torch.randn(B, T, G * G, D), torch.randn(B, T, 5)
    for kind in ("mlp", "cross_attention"):
        c = Controller(ControllerConfig(kind=kind, action_dim=5, latent_dim=DZ, feat_dim=D, grid_h=G, grid_w=G,
                                        width=24, heads=4))
        z = c(a, s)
        assert z.shape == (B, T, DZ)
        loss = controller_loss(z, torch.randn(B, T, DZ))
        loss.backward()
    check_causal(lambda x, y: c.eval()(y, x), s, a)  # z_t only uses s_0..s_t and a_t
    awm = randomise(ActionWorldModel(ActionWMConfig(feat_dim=D, grid_h=G, grid_w=G, action_dim=5,
                                                    wm=WorldModelConfig(width=24, depth=1, heads=4))))
    assert awm(s, a[:, :-1])["pred"].shape == (B, T - 1, G * G, D)
    check_causal(awm.predict, s, a)
    roll = awm.rollout(s[:, :2], a[:, 1:3], context_actions=a[:, :1])
    torch.testing.assert_close(roll[:, 0], awm.predict(s[:, :2], a[:, :2])[:, 1])


def test_gpu_step_script_runs_its_smoke_preset_on_cpu():
    """bench/gpu_step.py is the prepared GPU measurement (L preset MFU, FlexAttention vs SDPA, V-JEPA 2-L encode);
    its --cpu-smoke mode runs every part of it on a tiny preset, so the script cannot rot while no GPU is at hand."""
    import json
    import math
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "bench" / "gpu_step.py"), "--cpu-smoke"], cwd=root,
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                            "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(done.stdout[done.stdout.index("{"):])
    for key in ("step_s", "mfu", "attention_flex_s", "attention_sdpa_s", "encode_clips_per_s"):
        assert math.isfinite(res[key]) and res[key] > 0, key
    assert res["attention_out_max_diff"] <= 2 * res["attention_bf16_rounding"] and res["attention_bf16_rounding"] > 0
