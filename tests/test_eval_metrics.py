"""The evaluation metrics on cases with known answers: a ridge probe on a known linear map and on noise, the transfer
cycle on a hand-made world model, clip pairing and the latent baselines."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lawm.eval import probe, transfer
from lawm.eval.common import partner_index, random_latents


# ----------------------------------------------------------------------------------------------------- probe

def _groups(n: int, per: int = 10) -> list[str]:
    return [f"video{i // per}" for i in range(n)]


def test_probe_recovers_a_known_linear_map_and_not_noise():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 3, generator=g, dtype=torch.float64)
    x_train = torch.randn(400, 16, generator=g, dtype=torch.float64)
    x_val = torch.randn(200, 16, generator=g, dtype=torch.float64)
    noise = lambda n: 0.01 * torch.randn(n, 3, generator=g, dtype=torch.float64)  # noqa: E731
    fit = probe.ridge_probe(x_train, x_train @ w + noise(400), _groups(400), x_val, x_val @ w + noise(200))
    assert fit["r2"] > 0.99
    assert fit["alpha"] < 1.0  # clean data: cross-validation picks little shrinkage
    # targets independent of the inputs: nothing to recover, a held-out R² near 0 (never near 1)
    junk = probe.ridge_probe(x_train, torch.randn(400, 3, generator=g, dtype=torch.float64), _groups(400), x_val,
                             torch.randn(200, 3, generator=g, dtype=torch.float64))
    assert -0.1 < junk["r2"] < 0.05
    assert junk["alpha"] > fit["alpha"]  # noise: cross-validation shrinks hard


def test_probe_r2_definition_and_bad_input():
    y = torch.tensor([[1.0], [2.0], [3.0]])
    assert probe.r2(y, y) == pytest.approx(1.0)
    assert probe.r2(y, torch.full_like(y, 2.0)) == pytest.approx(0.0)  # the val mean
    assert probe.r2(y, torch.zeros_like(y)) == pytest.approx(1 - 14 / 2)
    with pytest.raises(ValueError, match="two groups"):
        probe.choose_alpha(torch.randn(10, 2, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64),
                           ["one"] * 10)
    with pytest.raises(ValueError, match="non-finite"):
        bad = torch.randn(20, 2, dtype=torch.float64)
        bad[3, 1] = float("nan")
        probe.ridge_probe(bad, torch.randn(20, 1), _groups(20, 5), bad[:5], torch.randn(5, 1))


def test_probe_targets_follow_the_tubelet_alignment():
    # agent 0 moves +1 in x per frame; camera pans +0.5 in y per frame; zoom constant
    t = 6
    pos = torch.zeros(1, t, 2, 2)
    pos[0, :, 0, 0] = torch.arange(t, dtype=torch.float32)
    cam = torch.zeros(1, t, 3)
    cam[0, :, 1] = 0.5 * torch.arange(t)
    cam[0, :, 2] = 1.0
    got = probe.synthetic_targets({"agent_pos": pos, "camera": cam}, tubelet=2, steps=2)
    assert torch.allclose(got["agent"], torch.tensor([[2.0, 0.0], [2.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(got["camera"], torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64))
    assert torch.allclose(got["zoom"], torch.zeros(2, 1, dtype=torch.float64))
    action = torch.arange(8, dtype=torch.float32).reshape(1, 4, 2)  # rows: frame t -> t+1
    nav = probe.action_targets({"action": action}, tubelet=1, steps=3, domain="nav")
    assert torch.equal(nav["v"].flatten(), torch.tensor([0.0, 2.0, 4.0], dtype=torch.float64))
    assert torch.equal(nav["omega"].flatten(), torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64))


# ----------------------------------------------------------------------------------------------- pairing

def test_partner_is_another_video_never_itself():
    groups = ["a", "a", "b", "c", "c", "c"]
    p = partner_index(groups)
    assert list(p) == [2, 2, 3, 0, 0, 0]
    assert all(groups[i] != groups[j] for i, j in enumerate(p))
    with pytest.raises(ValueError, match="two videos"):
        partner_index(["a", "a"])


def test_random_latents_match_the_marginal():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5000, 4, generator=g) * torch.tensor([1.0, 2.0, 0.1, 3.0]) + torch.tensor([0.0, 1.0, -2.0, 5.0])
    r = random_latents(z, torch.Generator().manual_seed(1))
    assert torch.allclose(r.mean(0), z.mean(0), atol=0.1)
    assert torch.allclose(r.std(0), z.std(0), rtol=0.05)
    assert not torch.allclose(r, z)


# ---------------------------------------------------------------------------------------------- transfer

class QuantisedWallWorld:
    """A hand-made latent action world model on 1-d positions s (B, T, 1, 1): the IDM reads the displacement rounded
    to multiples of 0.5, the world model adds the latent and stops at a wall at 1.0."""

    wall, step = 1.0, 0.5

    def infer_latents(self, s):
        return torch.round((s[:, 1:] - s[:, :-1]).mean((2, 3)) / self.step)[..., None] * self.step

    def predict(self, s, z):
        return (s + z[:, :, None, :]).clamp(max=self.wall)

    def rollout(self, context_s, z_seq):
        cur, out = context_s[:, -1], []
        for h in range(z_seq.shape[1]):
            cur = (cur + z_seq[:, h, None, :]).clamp(max=self.wall)
            out.append(cur)
        return torch.stack(out, dim=1)


def _clip(*values):
    return torch.tensor(values, dtype=torch.float32)[:, None, None]


def test_transfer_cycle_on_a_hand_made_world_model():
    # A moves 0.4 per step: its latents round to 0.5, so its own rollout [0.5, 1.0] misses [0.4, 0.8] by 0.15.
    # B sits at 0.5: driven by A it reaches the wall at once, [1.0, 1.0]; the latents re-inferred from that are
    # [0.5, 0.0], which drive A to [0.5, 0.5]: cycle error (0.1 + 0.3) / 2 = 0.2, an increase of 0.2 / 0.15 - 1.
    # The counterfactual (B's scene under A's motion, stopped by the wall) is [0.5, 0.9, 1.0]: B driven by A misses it
    # by (0.1 + 0) / 2 = 0.05; B's own latents (zero) by (0.4 + 0.5) / 2 = 0.45.
    s_a = torch.stack([_clip(0.0, 0.4, 0.8), _clip(0.5, 0.5, 0.5)])
    s_b = s_a[[1, 0]]
    s_cf = torch.stack([_clip(0.5, 0.9, 1.0), _clip(0.0, 0.0, 0.0)])
    out = transfer.transfer_cycle(QuantisedWallWorld(), s_a, s_b, context=1, horizon=2, partner=[1, 0],
                                  generator=torch.Generator().manual_seed(0), s_cf=s_cf)
    e = {k: float(v[0]) for k, v in out["errors"].items()}
    assert e["error"] == pytest.approx(0.15)
    assert e["cycle_error"] == pytest.approx(0.2)
    assert e["error_copy"] == pytest.approx(0.6) and e["error_zero_z"] == pytest.approx(0.6)
    assert e["error_shifted_z"] == pytest.approx(0.6)  # the partner (B) does not move
    assert e["counterfactual_error"] == pytest.approx(0.05)
    assert e["counterfactual_error_own_z"] == pytest.approx(0.45)
    assert torch.allclose(out["rollouts"]["b_by_a"][0].flatten(), torch.tensor([1.0, 1.0]))
    summary = transfer.summarize({k: v[:1] for k, v in out["errors"].items()}, "transfer/")
    assert summary["transfer/cycle_increase"] == pytest.approx(0.2 / 0.15 - 1)


def test_transfer_horizon_and_bad_shapes():
    assert transfer.horizon_steps(2.0, 4.0, 1) == 8  # the demo: 2 s at 4 fps, patch encoder
    assert transfer.horizon_steps(2.0, 4.0, 2) == 4  # V-JEPA 2 pairs
    with pytest.raises(ValueError, match="less than one latent step"):
        transfer.horizon_steps(0.2, 4.0, 2)
    s = torch.zeros(2, 3, 1, 1)
    with pytest.raises(ValueError, match="needs 4 representations"):
        transfer.transfer_cycle(QuantisedWallWorld(), s, s, context=1, horizon=3, partner=[1, 0],
                                generator=torch.Generator())
    with pytest.raises(ValueError, match="one shape"):
        transfer.transfer_cycle(QuantisedWallWorld(), s, torch.zeros(2, 4, 1, 1), context=1, horizon=2,
                                partner=[1, 0], generator=torch.Generator())
    assert np.isfinite(transfer.summarize({"error": torch.ones(2), "cycle_error": torch.ones(2)})["cycle_increase"])
