"""Model library: frozen frame encoders, IDM, regularisers, world models, decoder and controllers."""
from lawm.models.action_wm import ActionWMConfig, ActionWorldModel
from lawm.models.controllers import Controller, ControllerConfig, controller_loss
from lawm.models.decoder import DecoderConfig, FrameDecoder, pixel_l1, psnr
from lawm.models.encoders import EncoderConfig, FrameEncoder, align_actions, build_encoder
from lawm.models.idm import IDMConfig, InverseDynamics
from lawm.models.lam import LAMConfig, LatentActionWorldModel, lam_preset
from lawm.models.regularizers import RegConfig, build_regularizer
from lawm.models.world_model import WorldModel, WorldModelConfig

__all__ = [
    "ActionWMConfig", "ActionWorldModel", "Controller", "ControllerConfig", "controller_loss",
    "DecoderConfig", "FrameDecoder", "pixel_l1", "psnr", "EncoderConfig", "FrameEncoder",
    "align_actions", "build_encoder", "IDMConfig", "InverseDynamics", "LAMConfig", "LatentActionWorldModel",
    "lam_preset", "RegConfig", "build_regularizer", "WorldModel", "WorldModelConfig",
]
