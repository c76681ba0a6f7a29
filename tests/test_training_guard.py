"""The training loop's guards: non-finite steps are skipped and never reach the weights, checkpoints or exports;
a run with too many fails clearly; every rank takes the same decision; one bf16 switch, regularisers in fp32."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from lawm.models import IDMConfig, LAMConfig, LatentActionWorldModel, RegConfig, WorldModelConfig
from lawm.training.loop import Trainer, TrainConfig
from lawm.training.objectives import LAMObjective
from lawm.training.optim import OptimConfig

from _guard_objectives import Poisoned, batches, rank_worker

G, D = 2, 6


def finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def run(obj: nn.Module, steps: int = 8, **kw):
    cfg = TrainConfig(steps=steps, log_every=2, ckpt_every=2, optim=OptimConfig(lr=1e-2, warmup_frac=0.0), **kw)
    trainer = Trainer(obj, cfg)
    logs, ckpts = [], []
    trainer.fit(lambda n: batches(), on_log=lambda m, s: logs.append((s, m)),
                on_checkpoint=lambda st, s, m: ckpts.append((s, st)))
    return trainer, logs, ckpts


@pytest.mark.parametrize("mode", ["loss", "grad"])
def test_nonfinite_steps_are_skipped_counted_and_never_reach_the_weights(mode):
    torch.manual_seed(0)
    trainer, logs, ckpts = run(Poisoned(bad_steps={2, 5}, mode=mode))
    assert trainer.step == 8 and trainer.nonfinite_steps == 2
    assert finite(trainer.objective.state_dict())
    # the optimiser stepped on exactly the 6 finite steps
    adam = trainer.opts[0]
    assert {int(adam.state[p]["step"]) for p in trainer.params} == {6}
    assert [s for s, _ in ckpts] == [2, 4, 6, 8]
    for _, state in ckpts:
        assert finite(state["objective"]) and state["nonfinite_steps"] <= 2
    assert ckpts[-1][1]["nonfinite_steps"] == 2
    # logged: the running count, and averages over the finite steps only (no NaN leaks into the curves)
    assert [m["nonfinite_steps"] for _, m in logs] == [0, 1, 2, 2]  # calls 2 and 5 are steps 3 and 6
    assert all(math.isfinite(v) for _, m in logs for v in m.values())
    assert logs[-1][1]["mse"] < logs[0][1]["mse"]  # it still learns


def test_a_skipped_step_count_survives_a_resume():
    torch.manual_seed(0)
    first, _, ckpts = run(Poisoned(bad_steps={1}), steps=4)
    state = ckpts[-1][1]
    second = Trainer(Poisoned(), TrainConfig(steps=6, optim=OptimConfig(lr=1e-2)))
    second.load_state_dict(state)
    assert second.nonfinite_steps == 1 and second.step == 4


def test_always_nonfinite_fails_clearly_and_checkpoints_nothing():
    torch.manual_seed(0)
    obj = Poisoned(bad_steps={"always"})
    before = {k: v.clone() for k, v in obj.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"4 steps had a non-finite loss or gradient.*max_nonfinite_steps=3"):
        run(obj, steps=50, max_nonfinite_steps=3)
    assert obj.calls == 4  # stopped at the first step over the limit, not at the end of the run
    assert all(torch.equal(before[k], v) for k, v in obj.state_dict().items())  # weights untouched


@pytest.mark.parametrize("mode,when", [("buffer", "at a checkpoint"), ("loss+buffer", "after a skipped step")])
def test_weights_poisoned_by_a_forward_are_never_checkpointed(mode, when):
    """A forward pass that writes NaN into the state (finite loss: found at the next checkpoint; NaN loss: at once)."""
    torch.manual_seed(0)
    seen = []
    obj = Poisoned(bad_steps={3}, mode=mode)
    with pytest.raises(RuntimeError, match=rf"non-finite weights {when} \(step 4\): ema; refusing to checkpoint"):
        Trainer(obj, TrainConfig(steps=8, ckpt_every=1, log_every=1)).fit(
            lambda n: batches(), on_checkpoint=lambda st, s, m: seen.append(s))
    assert seen == [1, 2, 3]


def test_export_refuses_nonfinite_weights(tmp_path):
    from jobs.ray_train import ScalingSection, TrainJob, _finish

    class Exports(nn.Module):
        def __init__(self):
            super().__init__()
            cfg = LAMConfig(feat_dim=D, grid_h=G, grid_w=G, latent_dim=4, idm=IDMConfig(width=12, depth=1, heads=2),
                            wm=WorldModelConfig(width=12, depth=1, heads=2, cond_width=8))
            self.a, self.b = LatentActionWorldModel(cfg), LatentActionWorldModel(cfg)

        def exports(self):
            return {"a": self.a, "b": self.b}

    obj = Exports()
    with torch.no_grad():
        obj.b.wm.out.weight[0, 0] = float("nan")
    job = TrainJob(stage="train_lam", build=Exports, build_kwargs={}, train=TrainConfig(), scaling=ScalingSection(),
                   train_urls=[], val_urls=[], data_kind="features", out_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match=r"train_lam: refusing to export b: non-finite weights in wm\.out\.weight"):
        _finish(job, obj, log=None)
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").iterdir())  # not even `a`
    assert not (tmp_path / "result.json").exists()


def test_all_ranks_skip_the_same_steps(tmp_path):
    """Only rank 1 sees a NaN at step 2: both ranks must skip it (else one steps and they drift, or deadlock)."""
    # spawn (fork hangs in torch's thread pools); the workers live in a module that imports only torch and the loop
    torch.multiprocessing.spawn(rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["nonfinite"] == r1["nonfinite"] == 1
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k


def _lam_objective(kind: str) -> LAMObjective:
    torch.manual_seed(0)
    return LAMObjective(LatentActionWorldModel(LAMConfig(
        feat_dim=D, grid_h=G, grid_w=G, latent_dim=4, reg=RegConfig(kind=kind, codebook_size=4),
        idm=IDMConfig(width=12, depth=1, heads=2), wm=WorldModelConfig(width=12, depth=1, heads=2, cond_width=8))))


def _precision_seen(kind: str, bf16) -> dict:
    """Train 2 steps on CPU; record what the regulariser and the world model's first layer saw."""
    obj = _lam_objective(kind)
    seen = {"reg_in": set(), "reg_autocast": set(), "wm_out": set()}

    def reg_hook(module, args):  # returns None: the inputs are left as they are
        seen["reg_in"].add(args[0].dtype)
        seen["reg_autocast"].add(torch.is_autocast_enabled("cpu"))

    obj.lam.reg.register_forward_pre_hook(reg_hook)
    obj.lam.wm.inp.register_forward_hook(lambda m, args, out: seen["wm_out"].add(out.dtype))
    g = torch.Generator().manual_seed(0)
    data = iter(lambda: {"feats": torch.randn(4, 3, G * G, D, generator=g)}, None)
    Trainer(obj, TrainConfig(steps=2, bf16=bf16, optim=OptimConfig(warmup_frac=0.0))).fit(lambda n: data)
    return seen


@pytest.mark.parametrize("kind", ["discrete", "sparse"])
def test_one_bf16_switch_and_regularisers_in_fp32(kind):
    on = _precision_seen(kind, bf16=True)  # forced on, on the CPU
    assert on["wm_out"] == {torch.bfloat16}  # the switch reaches the model...
    assert on["reg_in"] == {torch.float32} and on["reg_autocast"] == {False}  # ...but never the regulariser
    off = _precision_seen(kind, bf16=False)
    assert off["wm_out"] == {torch.float32} and off["reg_in"] == {torch.float32} and off["reg_autocast"] == {False}
    assert _precision_seen(kind, bf16=None)["wm_out"] == {torch.float32}  # default: on CUDA only


def test_models_have_no_precision_switch_of_their_own():
    from lawm.config import ConfigError, from_dict
    from lawm.models import ActionWMConfig

    for cls in (LAMConfig, ActionWMConfig):
        with pytest.raises(ConfigError, match="bf16: unknown key"):
            from_dict(cls, {"bf16": False})
    assert json.loads(json.dumps(TrainConfig().bf16)) is None
