"""A plain training loop: accumulation, clipping, warmup+cosine, bf16 autocast on GPU, resumable state.

No Ray and no MLflow here: the caller gives the batches and callbacks (`on_log`, `on_checkpoint`); jobs/train.py
runs this inside Ray Train workers, a test or notebook can run it directly.
"""
from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from lawm.config import require
from lawm.training.optim import OptimConfig, build_optimizers, build_schedulers


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 32  # per worker
    optim: OptimConfig = field(default_factory=OptimConfig)
    log_every: int = 50
    ckpt_every: int = 500
    loader_workers: int = 1  # DataLoader processes per training worker
    shuffle: int = 512  # sample shuffle buffer
    bf16: bool = True  # autocast on CUDA

    def validate(self) -> None:
        require(self.steps >= 1, "steps", "must be at least 1")
        require(self.batch_size >= 1, "batch_size", "must be at least 1")
        require(self.log_every >= 1 and self.ckpt_every >= 1, "ckpt_every", "log_every and ckpt_every must be >= 1")
        require(self.loader_workers >= 0, "loader_workers", "must be >= 0")


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors, and dicts of tensors (labels), moved to `device`; keys and metadata left as they are."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else
                {n: t.to(device) for n, t in v.items()} if isinstance(v, dict) else v)
            for k, v in batch.items()}


class Trainer:
    """Optimises `objective` (an nn.Module whose forward(batch, progress) returns (loss, stats)).

    `module` is what forward is called on: the objective itself, or its DistributedDataParallel wrapper.
    """

    def __init__(self, objective: nn.Module, cfg: TrainConfig, module: nn.Module | None = None,
                 device: torch.device | str = "cpu"):
        self.objective, self.cfg = objective, cfg
        self.module = module if module is not None else objective
        self.device = torch.device(device)
        self.opts = build_optimizers(objective, cfg.optim)
        self.scheds = build_schedulers(self.opts, cfg.steps, cfg.optim)
        self.step = 0
        self.batches_seen = 0  # data position: batches consumed so far (a resume continues after them)

    def state_dict(self) -> dict:
        return {"objective": self.objective.state_dict(), "opts": [o.state_dict() for o in self.opts],
                "scheds": [s.state_dict() for s in self.scheds], "step": self.step,
                "batches_seen": self.batches_seen, "rng": rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.objective.load_state_dict(state["objective"])
        for o, s in zip(self.opts, state["opts"]):
            o.load_state_dict(s)
        for sch, s in zip(self.scheds, state["scheds"]):
            sch.load_state_dict(s)
        self.step, self.batches_seen = state["step"], state["batches_seen"]
        set_rng_state(state["rng"])

    def fit(self, make_batches: Callable[[int], Iterator[dict]], on_log: Callable[[dict, int], None] = lambda m, s: None,
            on_checkpoint: Callable[[dict, int, dict], None] = lambda st, s, m: None) -> dict:
        """Train until cfg.steps. `make_batches(n)` gives endless batches after the first n (a resume);
        `on_log(metrics, step)` every log_every steps; `on_checkpoint(state, step, metrics)` every ckpt_every
        steps and at the end. Returns the last logged metrics."""
        cfg, accum = self.cfg, self.cfg.optim.grad_accum
        batches = make_batches(self.batches_seen)
        sums: dict[str, float] = defaultdict(float)
        wait = busy = 0.0
        samples = 0
        last: dict = {}
        self.module.train()
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            for opt in self.opts:
                opt.zero_grad(set_to_none=True)
            for _ in range(accum):
                tw = time.perf_counter()
                try:
                    batch = to_device(next(batches), self.device)
                except StopIteration:
                    raise RuntimeError("the training data ran out: too few samples for this worker's batch size?") from None
                self.batches_seen += 1
                wait += time.perf_counter() - tw
                with torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda" and cfg.bf16):
                    loss, stats = self.module(batch, self.step / cfg.steps)
                (loss / accum).backward()
                samples += len(batch.get("key", ())) or cfg.batch_size
                for k, v in stats.items():
                    sums[k] += float(v) / accum
            if cfg.optim.grad_clip > 0:
                sums["grad_norm"] += float(nn.utils.clip_grad_norm_(self.objective.parameters(), cfg.optim.grad_clip))
            for opt, sched in zip(self.opts, self.scheds):
                opt.step()
                sched.step()
            self.step += 1
            busy += time.perf_counter() - t0
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                n = cfg.log_every if self.step % cfg.log_every == 0 else self.step % cfg.log_every
                last = {k: v / n for k, v in sums.items()}
                last.update(samples_per_s=samples / busy, data_wait_share=wait / busy, lr=self.scheds[0].get_last_lr()[0])
                on_log(last, self.step)
                sums.clear()
                wait = busy = 0.0
                samples = 0
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                on_checkpoint(self.state_dict(), self.step, last)
        return last
