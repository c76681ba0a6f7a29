"""Training objectives: nn.Modules whose forward(batch, progress) returns (loss, stats).

Wrapping the whole objective (not just a model) lets DistributedDataParallel see every trainable parameter in
one forward. Frozen parts (encoder, the world model under a controller) have requires_grad off and stay in eval.
A batch carries either cached features ("feats", from the encode stage) or frames ("frames"), which are then
encoded on the fly by the frozen encoder.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from lawm.models.action_wm import ActionWorldModel
from lawm.models.controllers import Controller, controller_loss
from lawm.models.decoder import FrameDecoder, pixel_l1, psnr
from lawm.models.encoders import FrameEncoder, align_actions
from lawm.models.lam import LatentActionWorldModel


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class Featurizer(nn.Module):
    """Cached features when the batch has them, else the frozen encoder applied to the frames."""

    def __init__(self, encoder: FrameEncoder | None):
        super().__init__()
        self.encoder = freeze(encoder) if encoder is not None else None

    def forward(self, batch: dict) -> torch.Tensor:
        if "feats" in batch:
            return batch["feats"].float()
        if self.encoder is None:
            raise ValueError("batch has frames but no encoder was given")
        with torch.no_grad():
            return self.encoder(batch["frames"]).float()

    def train(self, mode: bool = True):  # the encoder stays frozen in eval mode
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()
        return self


def batch_actions(batch: dict, tubelet: int, scale: float = 1.0) -> torch.Tensor:
    """Per-representation actions (B, T'-1, A) from the per-frame `action` label (row t: frame t → t+1)."""
    actions = batch["labels"]["action"].float()[:, :-1] * scale
    return align_actions(actions, tubelet)


class _ActionInputs(nn.Module):
    """Representations and the actions aligned with their transitions, for the action-driven objectives."""

    def __init__(self, tubelet: int, action_scale: float, encoder: FrameEncoder | None):
        super().__init__()
        self.feats, self.tubelet, self.action_scale = Featurizer(encoder), tubelet, action_scale

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.feats(batch)
        return s, batch_actions(batch, self.tubelet, self.action_scale)[:, : s.shape[1] - 1]

    def export_extra(self) -> dict:
        """Written into every exported checkpoint: a model taught on scaled actions must be driven by the same
        scale, and planning reads it from here (`trained_action_scale`), never from a config that may differ."""
        return {"action_scale": float(self.action_scale)}


def trained_action_scale(extra: dict, path: str | Path) -> float:
    """The action scale a controller or action-conditioned model was trained with, from the `extra` values of its
    checkpoint at `path` (`export_extra`; `lawm.checkpoint.load_model_with_extra` reads both at once)."""
    scale = extra.get("action_scale")
    if scale is None:
        raise ValueError(f"{path} does not record the action scale it was trained with (trained before lawm "
                         "recorded it): train it again")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"{path}: the recorded action scale {scale!r} is not a positive number")
    return float(scale)


def random_window(s: torch.Tensor, window: int) -> torch.Tensor:
    """A random run of `window` consecutive steps (the same for the whole batch); 0 keeps all. Training on
    short windows costs less attention per sample while every transition is still predicted causally."""
    if window <= 0 or window >= s.shape[1]:
        return s
    start = int(torch.randint(0, s.shape[1] - window + 1, ()))
    return s[:, start : start + window]


class LAMObjective(nn.Module):
    def __init__(self, lam: LatentActionWorldModel, encoder: FrameEncoder | None = None, window: int = 0):
        super().__init__()
        self.lam, self.feats, self.window = lam, Featurizer(encoder), window

    def forward(self, batch: dict, progress: float = 1.0):
        out = self.lam(random_window(self.feats(batch), self.window), progress)
        return out["loss"], out["stats"]

    def exports(self) -> dict[str, nn.Module]:
        return {"lam": self.lam}

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict:
        """Capacity (one-step error with IDM latents), the same with latents shuffled across the batch (how
        much the world model uses z), and copying the current frame (the floor any model must beat)."""
        s = self.feats(batch)
        z = self.lam.infer_latents(s)
        err = lambda z_: (self.lam.predict(s[:, :-1], z_) - s[:, 1:]).abs().mean().item()  # noqa: E731
        return {"one_step_error": err(z), "error_shuffled_z": err(torch.roll(z, 1, dims=0)),
                "copy_error": (s[:, :-1] - s[:, 1:]).abs().mean().item()}


class ControllerObjective(_ActionInputs):
    """Both controllers (action-only MLP and cross-attention) regress the frozen IDM's latents (L2)."""

    def __init__(self, lam: LatentActionWorldModel, controllers: dict[str, Controller], tubelet: int = 1,
                 action_scale: float = 1.0, encoder: FrameEncoder | None = None):
        super().__init__(tubelet, action_scale, encoder)
        self.lam = freeze(lam)
        self.controllers = nn.ModuleDict(controllers)

    def train(self, mode: bool = True):
        super().train(mode)
        self.lam.eval()
        return self

    def forward(self, batch: dict, progress: float = 1.0):
        s, actions = self.inputs(batch)
        target = self.lam.infer_latents(s)
        loss, stats = 0.0, {}
        for name, ctrl in self.controllers.items():
            pred = ctrl(actions, s[:, :-1])
            part = controller_loss(pred, target)
            loss = loss + part
            stats[f"{name}_l2"] = part.item()
        stats["target_z_var"] = target.var(0).mean().item()
        return loss, stats

    def exports(self) -> dict[str, nn.Module]:
        return {f"controller_{name}": ctrl for name, ctrl in self.controllers.items()}

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict:
        """One-step prediction error of the world model driven by IDM latents vs by each controller's latents."""
        s, actions = self.inputs(batch)
        target = self.lam.infer_latents(s)
        err = lambda z: (self.lam.predict(s[:, :-1], z) - s[:, 1:]).abs().mean().item()  # noqa: E731
        out = {"wm_error_idm": err(target), "wm_error_zero_z": err(torch.zeros_like(target))}
        for name, ctrl in self.controllers.items():
            ctrl.eval()
            pred = ctrl(actions, s[:, :-1])
            out[f"wm_error_{name}"] = err(pred)
            out[f"{name}_l2"] = controller_loss(pred, target).item()
        return out


class ActionWMObjective(_ActionInputs):
    def __init__(self, model: ActionWorldModel, tubelet: int = 1, action_scale: float = 1.0,
                 encoder: FrameEncoder | None = None):
        super().__init__(tubelet, action_scale, encoder)
        self.model = model

    def forward(self, batch: dict, progress: float = 1.0):
        s, actions = self.inputs(batch)
        out = self.model(s, actions, progress)
        return out["loss"], out["stats"]

    def exports(self) -> dict[str, nn.Module]:
        return {"action_wm": self.model}

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict:
        s, actions = self.inputs(batch)
        return {"one_step_error": (self.model.predict(s[:, :-1], actions) - s[:, 1:]).abs().mean().item(),
                "copy_error": (s[:, :-1] - s[:, 1:]).abs().mean().item()}


class DecoderObjective(nn.Module):
    """Frames ← representations; needs the frames, so it reads clips and encodes them itself."""

    def __init__(self, decoder: FrameDecoder, encoder: FrameEncoder):
        super().__init__()
        self.decoder, self.feats = decoder, Featurizer(encoder)

    def _target(self, batch: dict) -> torch.Tensor:
        """The frames at the encoder's resolution: what its representations can describe."""
        return self.feats.encoder.resize(batch["frames"])

    def forward(self, batch: dict, progress: float = 1.0):
        frames = self._target(batch)
        loss = self.decoder.loss(self.feats({"frames": frames}), frames)
        return loss, {"pixel_l1": loss.item()}

    def exports(self) -> dict[str, nn.Module]:
        return {"decoder": self.decoder}

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict:
        frames = self._target(batch)
        pred = self.decoder(self.feats({"frames": frames}))
        frames = frames[:, : pred.shape[1]]
        return {"pixel_l1": pixel_l1(pred, frames), "psnr": psnr(pred, frames)}
