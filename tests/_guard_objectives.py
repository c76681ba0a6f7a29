"""Helpers of test_training_guard.py: a small objective that goes non-finite on cue, and a torch.distributed rank.

Kept apart from the tests so that a spawned rank imports only torch and the training loop (not the model stack).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from lawm.training.loop import Trainer, TrainConfig
from lawm.training.optim import OptimConfig


class Poisoned(nn.Module):
    """A small regression objective that goes non-finite at chosen steps: in the loss, or (loss finite) only in
    the gradients, or by writing NaN into a buffer during the forward (as a VQ reset from NaN latents would)."""

    def __init__(self, bad_steps=(), mode: str = "loss"):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 1))
        self.register_buffer("ema", torch.zeros(1))
        self.bad_steps, self.mode, self.calls = set(bad_steps), mode, 0

    def forward(self, batch: dict, progress: float = 1.0):
        bad = self.calls in self.bad_steps or "always" in self.bad_steps
        self.calls += 1
        h = self.net[0](batch["x"])
        if bad and self.mode == "grad":
            h.register_hook(lambda g: g * float("nan"))
        loss = (self.net[2](self.net[1](h)) - batch["y"]).pow(2).mean()
        if bad and "buffer" in self.mode:
            self.ema.fill_(float("nan"))
        if bad and "loss" in self.mode:
            loss = loss * float("inf") - loss * float("inf")  # NaN loss and NaN gradients
        return loss, {"mse": loss.item()}


def batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(8, 4, generator=g)
        yield {"x": x, "y": x.sum(1, keepdim=True)}


def rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial weights on both ranks; no DDP, so only the guard can keep them equal
        obj = Poisoned(bad_steps={2} if rank == 1 else ())
        trainer = Trainer(obj, TrainConfig(steps=4, log_every=4, ckpt_every=4,
                                           optim=OptimConfig(lr=1e-2, warmup_frac=0.0)))
        trainer.fit(lambda n: batches(seed=0))
        torch.save({"weights": obj.state_dict(), "nonfinite": trainer.nonfinite_steps},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()
