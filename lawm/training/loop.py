"""A plain training loop: accumulation, clipping, warmup+cosine, bf16 autocast (one switch), a non-finite guard,
resumable state.

No Ray and no MLflow here: the caller gives the batches and callbacks (`on_log`, `on_checkpoint`); jobs/ray_train.py
runs this inside Ray Train workers, a test or notebook can run it directly.

Non-finite guard (every step): the loss summed over the micro-batches and the total gradient norm (which clipping
needs anyway) are checked together, with one host sync. A non-finite step is skipped: its gradients are dropped,
no optimiser steps, the step still counts (the schedule and the data move on) and `nonfinite_steps` counts it.
Under torch.distributed the decision is all-reduced, so every rank skips the same steps (no deadlock, no drift).
More than `max_nonfinite_steps` skipped steps in a run fail it with a RuntimeError. Weights are checked before
every `on_checkpoint` call: non-finite weights (a forward pass can write parameters and buffers directly, e.g.
a VQ codebook reset from NaN latents) are never handed out, the run fails instead.
"""
from __future__ import annotations

import random
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from lawm.config import require
from lawm.training.optim import OptimConfig, build_optimizers, build_schedulers


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 2000
    batch_size: int = 32  # per worker
    optim: OptimConfig = field(default_factory=OptimConfig)
    log_every: int = 50
    ckpt_every: int = 500
    loader_workers: int = 1  # DataLoader processes per training worker
    shuffle: int = 512  # sample shuffle buffer
    # The one precision switch: bf16 autocast around the objective's forward, on the training device (the models
    # never autocast by themselves; regularisers always run in fp32). None = on CUDA only; true forces it on any
    # device (CPU included), false turns it off everywhere.
    bf16: Optional[bool] = None
    # skipped (non-finite loss or gradient) steps allowed in a whole run before it fails
    max_nonfinite_steps: int = 20

    def validate(self) -> None:
        require(self.steps >= 1, "steps", "must be at least 1")
        require(self.batch_size >= 1, "batch_size", "must be at least 1")
        require(self.log_every >= 1 and self.ckpt_every >= 1, "ckpt_every", "log_every and ckpt_every must be >= 1")
        require(self.loader_workers >= 0, "loader_workers", "must be >= 0")
        require(self.max_nonfinite_steps >= 0, "max_nonfinite_steps", "must be >= 0")


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity (one host sync for all of them)."""
    names = [n for n, t in tensors.items() if torch.is_tensor(t) and t.is_floating_point() and t.numel()]
    if not names:
        return []
    ok = torch.stack([torch.isfinite(tensors[n]).all() for n in names]).tolist()
    return [n for n, good in zip(names, ok) if not good]


def _all_ranks_max(values: torch.Tensor) -> list[float]:
    """Element-wise max over ranks under torch.distributed (every rank must call it), as floats: one host sync."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return values.tolist()


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
        self.bf16 = cfg.bf16 if cfg.bf16 is not None else self.device.type == "cuda"
        self.params = [p for p in objective.parameters() if p.requires_grad]
        self.opts = build_optimizers(objective, cfg.optim)
        self.scheds = build_schedulers(self.opts, cfg.steps, cfg.optim)
        self.step = 0
        self.batches_seen = 0  # data position: batches consumed so far (a resume continues after them)
        self.nonfinite_steps = 0  # steps skipped for a non-finite loss or gradient, over the whole run

    def state_dict(self) -> dict:
        return {"objective": self.objective.state_dict(), "opts": [o.state_dict() for o in self.opts],
                "scheds": [s.state_dict() for s in self.scheds], "step": self.step,
                "batches_seen": self.batches_seen, "nonfinite_steps": self.nonfinite_steps, "rng": rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.objective.load_state_dict(state["objective"])
        for o, s in zip(self.opts, state["opts"]):
            o.load_state_dict(s)
        for sch, s in zip(self.scheds, state["scheds"]):
            sch.load_state_dict(s)
        self.step, self.batches_seen = state["step"], state["batches_seen"]
        self.nonfinite_steps = state["nonfinite_steps"]
        set_rng_state(state["rng"])

    def autocast(self):
        """The one precision switch (TrainConfig.bf16), on whatever device the training runs."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def grad_norm(self) -> torch.Tensor:
        """Total L2 norm of all gradients, one fused (foreach) reduction; stays on the device."""
        grads = [p.grad for p in self.params if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)

    def update(self, loss: torch.Tensor) -> tuple[bool, float]:
        """After backward: check loss + gradient norm, then clip and step, or skip. -> (stepped, grad norm)."""
        norm = self.grad_norm().float()
        bad = ~torch.isfinite(loss.to(norm.device) + norm)  # NaN/inf in either makes the sum non-finite
        # the flag travels with the norm the log wants anyway: one sync (and one all-reduce under DDP), not two
        is_bad, norm_value = _all_ranks_max(torch.stack([bad.float(), norm]))
        if is_bad:
            for opt in self.opts:
                opt.zero_grad(set_to_none=True)
            return False, float("nan")
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.cfg.optim.grad_clip, norm)
        for opt in self.opts:
            opt.step()
        return True, norm_value

    def check_weights(self, when: str) -> None:
        """Raise (on every rank alike) when any parameter or buffer is non-finite."""
        bad = nonfinite_tensors(self.objective.state_dict())
        if _all_ranks_max(torch.tensor([float(bool(bad))], device=self.device))[0]:
            shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "") if bad else "on another rank"
            raise RuntimeError(f"non-finite weights {when} (step {self.step}): {shown}; "
                               "refusing to checkpoint or export them")

    def fit(self, make_batches: Callable[[int], Iterator[dict]], on_log: Callable[[dict, int], None] = lambda m, s: None,
            on_checkpoint: Callable[[dict, int, dict], None] = lambda st, s, m: None) -> dict:
        """Train until cfg.steps. `make_batches(n)` gives endless batches after the first n (a resume);
        `on_log(metrics, step)` every log_every steps; `on_checkpoint(state, step, metrics)` every ckpt_every
        steps and at the end, only ever with finite weights. Returns the last logged metrics.
        Raises RuntimeError after more than max_nonfinite_steps skipped steps."""
        cfg, accum = self.cfg, self.cfg.optim.grad_accum
        batches = make_batches(self.batches_seen)
        sums: dict[str, float] = defaultdict(float)
        wait = busy = 0.0
        samples = good = 0
        last: dict = {}
        self.module.train()
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            for opt in self.opts:
                opt.zero_grad(set_to_none=True)
            total = torch.zeros((), device=self.device)
            step_stats: dict[str, float] = defaultdict(float)
            for _ in range(accum):
                tw = time.perf_counter()
                try:
                    batch = to_device(next(batches), self.device)
                except StopIteration:
                    raise RuntimeError("the training data ran out: too few samples for this worker's batch size?") from None
                self.batches_seen += 1
                wait += time.perf_counter() - tw
                with self.autocast():
                    loss, stats = self.module(batch, self.step / cfg.steps)
                (loss / accum).backward()
                total = total + loss.detach().float() / accum
                samples += len(batch.get("key", ())) or cfg.batch_size
                for k, v in stats.items():
                    step_stats[k] += float(v) / accum
            stepped, norm = self.update(total)
            with warnings.catch_warnings():  # a skipped first step makes LambdaLR warn that no optimiser stepped
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                for sched in self.scheds:
                    sched.step()
            self.step += 1
            busy += time.perf_counter() - t0
            if stepped:
                good += 1
                for k, v in step_stats.items():
                    sums[k] += v
                sums["grad_norm"] += norm
            else:
                self.nonfinite_steps += 1
                self.check_weights("after a skipped step")  # a forward pass may have written NaN into them
                if self.nonfinite_steps > cfg.max_nonfinite_steps:
                    raise RuntimeError(
                        f"training stopped at step {self.step}/{cfg.steps}: {self.nonfinite_steps} steps had a "
                        f"non-finite loss or gradient (last loss {float(total):.4g}; allowed: max_nonfinite_steps="
                        f"{cfg.max_nonfinite_steps}); nothing was checkpointed or exported from a bad step")
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                last = {k: v / good for k, v in sums.items()} if good else {}
                last.update(samples_per_s=samples / busy, data_wait_share=wait / busy, lr=self.scheds[0].get_last_lr()[0],
                            nonfinite_steps=float(self.nonfinite_steps))
                on_log(last, self.step)
                sums.clear()
                wait = busy = 0.0
                samples = good = 0
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.check_weights("at a checkpoint")
                on_checkpoint(self.state_dict(), self.step, last)
        return last
