"""Transfer and the cycle (the paper's Table 2), and transfer against a rendered counterfactual.

Over a horizon of H latent steps after `context` representations:
- error: A rolled out from its context with its own latents z_A, against A's true future (the paper's "original");
- B driven by A: B's context rolled out with z_A;
- cycle: latents re-inferred on [B's context, B driven by A] drive A back; cycle_error is that rollout against A's
  true future, and cycle_increase = cycle_error / error - 1 (0: the latents survive the trip unchanged);
- counterfactual_error (when the true counterfactual — B's scene under A's actions — exists): B driven by A
  against it. The cycle misses leakage (a latent that copies A's frames re-infers them from B's prediction just as
  well); the counterfactual does not.
Baselines of the same rollouts: copy (the context's last frame held), zero z, random z, shifted z (the partner
clip's latents), and for the counterfactual also B's own latents (a model that ignores what it was told).
Errors are mean L1 over the H predicted frames, tokens and channels, per clip.
"""
from __future__ import annotations

import math

import torch

from lawm.eval.common import l1, random_latents


def horizon_steps(seconds: float, fps: float, tubelet: int) -> int:
    """Latent steps covering `seconds` of video at `fps` when one representation spans `tubelet` frames."""
    steps = seconds * fps / tubelet
    if steps < 1:
        raise ValueError(f"{seconds} s at {fps} fps with tubelet {tubelet} is less than one latent step")
    return int(math.floor(steps + 1e-9))


@torch.no_grad()
def transfer_cycle(model, s_a: torch.Tensor, s_b: torch.Tensor, context: int, horizon: int, partner,
                   generator: torch.Generator, s_cf: torch.Tensor | None = None) -> dict:
    """Per-clip errors ("errors": name → (B,)) and the rollouts ("rollouts": name → (B, H, N, D))."""
    if context < 1 or context + horizon > s_a.shape[1]:
        raise ValueError(f"context {context} + horizon {horizon} needs {context + horizon} representations, "
                         f"the clips have {s_a.shape[1]}")
    if s_a.shape != s_b.shape or (s_cf is not None and s_cf.shape != s_b.shape):
        raise ValueError("clips A, B (and the counterfactual) must have one shape")
    end = context + horizon
    z_a = model.infer_latents(s_a[:, :end])[:, context - 1:]  # the H transitions after the context
    z_b = model.infer_latents(s_b[:, :end])[:, context - 1:]
    roll = lambda ctx, z: model.rollout(ctx[:, :context], z).float()  # noqa: E731
    a_own = roll(s_a, z_a)
    b_by_a = roll(s_b, z_a)
    z_back = model.infer_latents(torch.cat([s_b[:, :context].float(), b_by_a], dim=1))[:, context - 1:]
    a_cycle = roll(s_a, z_back)
    true_a = s_a[:, context:end]
    copy_a = s_a[:, context - 1:context].expand_as(true_a)
    rollouts = {"a_own": a_own, "b_by_a": b_by_a, "a_cycle": a_cycle}
    errors = {"error": l1(a_own, true_a), "cycle_error": l1(a_cycle, true_a),
              "error_copy": l1(copy_a, true_a),
              "error_zero_z": l1(roll(s_a, torch.zeros_like(z_a)), true_a),
              "error_random_z": l1(roll(s_a, random_latents(z_a, generator)), true_a),
              "error_shifted_z": l1(roll(s_a, z_a[torch.as_tensor(partner)]), true_a)}
    if s_cf is not None:
        true_cf = s_cf[:, context:end]
        b_own, cf_by_a = roll(s_cf, z_b), roll(s_cf, z_a)
        rollouts.update(cf_own_z=b_own, cf_by_a=cf_by_a)
        errors.update({"counterfactual_error": l1(cf_by_a, true_cf),
                       "counterfactual_error_own_z": l1(b_own, true_cf),
                       "counterfactual_error_copy": l1(s_cf[:, context - 1:context].expand_as(true_cf), true_cf),
                       "counterfactual_error_zero_z": l1(roll(s_cf, torch.zeros_like(z_a)), true_cf),
                       "counterfactual_error_random_z": l1(roll(s_cf, random_latents(z_a, generator)), true_cf)})
    return {"errors": errors, "rollouts": rollouts}


def summarize(errors: dict[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    out = {f"{prefix}{k}": float(v.float().mean()) for k, v in errors.items()}
    if f"{prefix}error" in out:
        direct = out[f"{prefix}error"]
        out[f"{prefix}cycle_increase"] = out[f"{prefix}cycle_error"] / direct - 1 if direct > 0 else float("nan")
    return out
