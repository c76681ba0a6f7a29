"""One checkpoint format for every model: {format, name, config, state_dict}, loadable with weights_only=True.

`name` is the model's registry name; `config` is the plain dict of its config dataclass, so `load_model`
rebuilds the class strictly through `lawm.config.from_dict` and then loads the weights (strict).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from lawm.config import from_dict, to_dict
from lawm.files import atomic_file

FORMAT = "lawm-model-v1"


def _registry() -> dict[str, tuple[type, Callable[[Any], nn.Module]]]:
    from lawm.models.action_wm import ActionWorldModel
    from lawm.models.controllers import Controller
    from lawm.models.decoder import FrameDecoder
    from lawm.models.encoders import EncoderConfig, build_encoder
    from lawm.models.lam import LatentActionWorldModel

    reg = {cls.registry_name: (cls.config_cls, cls) for cls in
           (LatentActionWorldModel, ActionWorldModel, Controller, FrameDecoder)}
    # frozen encoders rebuild from their own weights source (cfg.weights must still resolve on load)
    reg["encoder"] = (EncoderConfig, build_encoder)
    return reg


def registry_name(model: nn.Module) -> str:
    from lawm.models.encoders import FrameEncoder

    return "encoder" if isinstance(model, FrameEncoder) else type(model).registry_name


def save_model(path: str | Path, model: nn.Module, extra: dict[str, Any] | None = None) -> Path:
    """Write atomically (temp file in the same folder, then rename): a crash never leaves half a checkpoint.
    `extra` holds plain values (step, metrics...) and must itself be weights_only-loadable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "name": registry_name(model), "config": to_dict(model.cfg),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "extra": extra or {}}
    with atomic_file(path) as f:
        torch.save(payload, f)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} checkpoint")
    return payload


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    return load_model_with_extra(path, map_location)[0]


def load_model_with_extra(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The model and the `extra` values saved beside it, from one read of the file."""
    payload = load_checkpoint(path)
    reg = _registry()
    if payload["name"] not in reg:
        raise ValueError(f"{path}: unknown model {payload['name']!r} (known: {sorted(reg)})")
    cfg_cls, build = reg[payload["name"]]
    model = build(from_dict(cfg_cls, payload["config"]))
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.to(map_location), payload["extra"]
