"""The training objectives each training stage fits, built from plain configs: `build_*(**kwargs) -> nn.Module`.

They run inside every Ray Train worker, which imports them by module path when it unpickles its job, so this module
imports only lawm: the stage module (jobs/train_stages.py) also pulls in MLflow and matplotlib, which cost each new
worker process ~4 s of imports on 2 CPUs (measured with the science benchmark beside it: 6.8 s vs 2.5 s).
"""
from __future__ import annotations

import dataclasses

from lawm.checkpoint import load_model
from lawm.models.action_wm import ActionWMConfig, ActionWorldModel
from lawm.models.controllers import Controller, ControllerConfig
from lawm.models.decoder import DecoderConfig, FrameDecoder
from lawm.models.encoders import EncoderConfig, build_encoder
from lawm.models.lam import LAMConfig, LatentActionWorldModel
from lawm.training.objectives import ActionWMObjective, ControllerObjective, DecoderObjective, LAMObjective


def build_lam(lam_cfg: LAMConfig, window: int) -> LAMObjective:
    return LAMObjective(LatentActionWorldModel(lam_cfg), window=window)


def build_decoder(dec_cfg: DecoderConfig, enc_cfg: EncoderConfig) -> DecoderObjective:
    return DecoderObjective(FrameDecoder(dec_cfg), build_encoder(enc_cfg))


def build_controllers(lam_path: str, ctrl_cfg: ControllerConfig, tubelet: int, scale: float) -> ControllerObjective:
    ctrls = {kind: Controller(dataclasses.replace(ctrl_cfg, kind=kind)) for kind in ("mlp", "cross_attention")}
    return ControllerObjective(load_model(lam_path), ctrls, tubelet, scale)


def build_action_wm(model_cfg: ActionWMConfig, tubelet: int, scale: float) -> ActionWMObjective:
    return ActionWMObjective(ActionWorldModel(model_cfg), tubelet, scale)
