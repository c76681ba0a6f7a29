"""The scene-cut leakage test (the paper's Table 1): does the latent carry the future frame itself?

Clip A's context s_a[:cut] is followed by clip B's frame s_b[cut] (another video: a scene cut). The IDM infers the
latent of the cut transition from (s_a[cut-1], s_b[cut]) and the world model predicts the first frame after the cut.
A latent that describes motion cannot say what B looks like, so the prediction stays near A and the error approaches
that of copying A's last frame across the cut (`vs_copy` ≈ 1). A latent that leaks the next frame rebuilds B
(`vs_copy` ≪ 1). `ratio` (cut error ÷ uncut error) is the paper's figure; on its own it cannot tell models apart at
small scale (SMALL-SCALE-NOTES: pooled latents 4.5–5.6 with no leak at all), so `vs_copy` is the verdict.

All errors are mean L1 over tokens and channels, per clip; the summary averages over clips.
"""
from __future__ import annotations

import torch

from lawm.eval.common import l1, random_latents, ratio


def splice(s_a: torch.Tensor, s_b: torch.Tensor, cut: int) -> torch.Tensor:
    """A's representations before `cut`, B's from `cut` on: (B, T, N, D)."""
    return torch.cat([s_a[:, :cut], s_b[:, cut:]], dim=1)


@torch.no_grad()
def scene_cut(model, s_a: torch.Tensor, s_b: torch.Tensor, cut: int, partner, generator: torch.Generator) -> dict:
    """Predictions of the frame at `cut` (B, N, D) from A's context, with:
    nocut: the latent inferred on A itself; cut: inferred across the cut onto B; and the baselines for the cut
    transition — zero z, random z, the partner clip's cut latent (shifted z) — plus copying A's last frame."""
    if not 1 <= cut < s_a.shape[1]:
        raise ValueError(f"cut must be in [1, {s_a.shape[1] - 1}], got {cut}")
    if s_a.shape != s_b.shape:
        raise ValueError(f"clips A {tuple(s_a.shape)} and B {tuple(s_b.shape)} differ in shape")
    context = s_a[:, :cut]
    z_a = model.infer_latents(s_a[:, : cut + 1])
    z_cut = model.infer_latents(splice(s_a, s_b, cut)[:, : cut + 1])  # context latents equal z_a's

    def predict_with(last_z: torch.Tensor) -> torch.Tensor:
        z = torch.cat([z_a[:, : cut - 1], last_z[:, None]], dim=1)
        return model.predict(context, z)[:, -1]

    last = z_cut[:, -1]
    return {"nocut": predict_with(z_a[:, -1]), "cut": predict_with(last),
            "cut_zero_z": predict_with(torch.zeros_like(last)),
            "cut_random_z": predict_with(random_latents(last, generator)),
            "cut_shifted_z": predict_with(last[torch.as_tensor(partner)]),
            "copy": s_a[:, cut - 1].float()}


def leakage_errors(preds: dict, s_a: torch.Tensor, s_b: torch.Tensor, cut: int) -> dict[str, torch.Tensor]:
    """Per-clip errors: each prediction against the frame it should be (A's for nocut, B's after the cut)."""
    a, b = s_a[:, cut], s_b[:, cut]
    out = {"error_nocut": l1(preds["nocut"], a), "error_cut": l1(preds["cut"], b),
           "copy_nocut": l1(preds["copy"], a), "copy_cut": l1(preds["copy"], b)}
    for name in ("zero_z", "random_z", "shifted_z"):
        out[f"error_cut_{name}"] = l1(preds[f"cut_{name}"], b)
    return out


def summarize(errors: dict[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    """Means over clips, plus ratio = cut ÷ nocut and vs_copy = cut ÷ copying A's last frame across the cut."""
    out = {f"{prefix}{k}": float(v.float().mean()) for k, v in errors.items()}
    out[f"{prefix}ratio"] = ratio(out[f"{prefix}error_cut"], out[f"{prefix}error_nocut"])
    out[f"{prefix}vs_copy"] = ratio(out[f"{prefix}error_cut"], out[f"{prefix}copy_cut"])
    return out


@torch.no_grad()
def decode_at(decoder, context: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """Pixels of `frame` (B, N, D) decoded after `context` (B, T, N, D) (the decoder is frame-causal, so the context
    only helps consistency): the last tubelet's frames, (B, u, 3, H, W)."""
    frames = decoder(torch.cat([context, frame[:, None].to(context.dtype)], dim=1))
    u = frames.shape[1] // (context.shape[1] + 1)
    return frames[:, -u:]


@torch.no_grad()
def pixel_errors(decoder, preds: dict, s_a: torch.Tensor, s_b: torch.Tensor, cut: int, frames_a: torch.Tensor,
                 frames_b: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same test in pixels: decoded predictions against the true frames of A / B at the cut (B, T, 3, H, W,
    resized as the encoder does). `copy` goes through the same decoder, so both sides carry its reconstruction
    error; `decoder_floor` is B's own representation decoded, the best any prediction can score."""
    context = s_a[:, :cut]
    u = decode_at(decoder, context, preds["copy"]).shape[1]
    true_a, true_b = frames_a[:, cut * u:(cut + 1) * u], frames_b[:, cut * u:(cut + 1) * u]
    px = lambda x, truth: l1(decode_at(decoder, context, x).clamp(0, 1), truth)  # noqa: E731
    out = {"error_nocut": px(preds["nocut"], true_a), "error_cut": px(preds["cut"], true_b),
           "copy_nocut": px(preds["copy"], true_a), "copy_cut": px(preds["copy"], true_b),
           "decoder_floor": px(s_b[:, cut], true_b)}
    for name in ("zero_z", "random_z", "shifted_z"):
        out[f"error_cut_{name}"] = px(preds[f"cut_{name}"], true_b)
    return out
