"""Planning library: the metrics on trajectories with known answers and against an independent re-derivation,
CEM on a known quadratic, the batched rollouts against one candidate at a time, and closed-loop planning with the
true dynamics as the world model in the pybullet navigation simulator."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from lawm.config import ConfigError
from lawm.planning.cem import CEMConfig, cem
from lawm.planning.closed_loop import run_closed_loop
from lawm.planning.metrics import ate, delta_xyz, rpe
from lawm.planning.planner import Planner, check_tubelet


# ---------------------------------------------------------------------------------------------- metrics


def straight(n: int, step: float, yaw: float = 0.0) -> np.ndarray:
    i = np.arange(n)
    return np.stack([i * step * math.cos(yaw), i * step * math.sin(yaw), np.full(n, yaw)], axis=1)


def test_ate_rpe_known_answers():
    gt = straight(9, 0.2)
    assert ate(gt, gt, spacing=0.2) == 0.0 and rpe(gt, gt, spacing=0.2) == 0.0
    # pure offset: every position 0.3 m off -> ATE 0.3 / spacing, the relative motion is untouched
    off = gt + np.array([0.3, -0.4, 0.0]) * np.array([1, 0, 0])
    assert ate(off, gt, spacing=0.25) == pytest.approx(0.3 / 0.25)
    assert rpe(off, gt, spacing=0.25) == pytest.approx(0.0, abs=1e-12)
    # straight line at twice the speed: error i * 0.2 at pose i; every step is 0.2 m too long
    fast = straight(9, 0.4)
    expected_ate = math.sqrt(np.mean((np.arange(9) * 0.2) ** 2)) / 0.2
    assert ate(fast, gt, spacing=0.2) == pytest.approx(expected_ate)
    assert rpe(fast, gt, spacing=0.2) == pytest.approx(1.0)
    # pure rotation of the whole trajectory about the origin: |R p - p| = 2 sin(a/2) |p|, relative motion unchanged
    a = 0.7
    rot = np.stack([gt[:, 0] * math.cos(a), gt[:, 0] * math.sin(a), gt[:, 2] + a], axis=1)
    expected = math.sqrt(np.mean((2 * math.sin(a / 2) * gt[:, 0]) ** 2))
    assert ate(rot, gt) == pytest.approx(expected)
    assert rpe(rot, gt) == pytest.approx(0.0, abs=1e-12)
    # the same path driven with a wrong heading: positions equal, but each step seen from the pose differs
    turned = gt.copy()
    turned[:, 2] = math.pi / 2
    assert ate(turned, gt) == 0.0
    assert rpe(turned, gt, spacing=0.2) == pytest.approx(math.sqrt(2.0))


def _se2(x, y, th):
    return np.array([[math.cos(th), -math.sin(th), x], [math.sin(th), math.cos(th), y], [0.0, 0.0, 1.0]])


def _reference(est, gt, spacing):
    """Independent re-derivation with homogeneous matrices (evo's definitions): APE translation RMSE without
    alignment; RPE E_i = (Q_i^-1 Q_i+1)^-1 (P_i^-1 P_i+1), translation norm RMSE; both over scaled positions."""
    P = [_se2(x / spacing, y / spacing, t) for x, y, t in est]
    Q = [_se2(x / spacing, y / spacing, t) for x, y, t in gt]
    ape = [np.linalg.norm((np.linalg.inv(q) @ p)[:2, 2]) for p, q in zip(P, Q)]  # = |p - q| (rotation-free norm)
    errs = []
    for i in range(len(P) - 1):
        e = np.linalg.inv(np.linalg.inv(Q[i]) @ Q[i + 1]) @ (np.linalg.inv(P[i]) @ P[i + 1])
        errs.append(np.linalg.norm(e[:2, 2]))
    return math.sqrt(np.mean(np.square(ape))), math.sqrt(np.mean(np.square(errs)))


def test_ate_rpe_match_independent_implementation():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 12))
        gt = np.cumsum(rng.normal(0, 0.3, (n, 3)), axis=0)
        est = gt + rng.normal(0, 0.2, (n, 3))
        want_ate, want_rpe = _reference(est, gt, 0.25)
        assert ate(est, gt, spacing=0.25) == pytest.approx(want_ate, rel=1e-9)
        assert rpe(est, gt, spacing=0.25) == pytest.approx(want_rpe, rel=1e-9)


def test_delta_xyz_and_bad_input():
    true = np.array([[0.01, 0.02, -0.03, 1.0], [0.01, 0.0, 0.0, 0.0], [0.0, -0.02, 0.01, 1.0]])
    assert delta_xyz(true, true) == 0.0
    # the gripper never counts; the order of the steps does not matter (sums)
    plan = true[::-1].copy()
    plan[:, 3] = 0.5
    assert delta_xyz(plan, true) == pytest.approx(0.0, abs=1e-15)
    assert delta_xyz(np.zeros_like(true), true) == pytest.approx(0.02 + 0.0 + 0.02)
    with pytest.raises(ValueError, match="actions"):
        delta_xyz(np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="poses"):
        ate(np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="spacing"):
        rpe(np.zeros((3, 3)), np.zeros((3, 3)), spacing=0.0)


# ---------------------------------------------------------------------------------------------- CEM


def test_cem_finds_quadratic_minimum_and_is_seeded():
    target = torch.tensor([[0.3, -0.5], [0.8, 0.1], [-0.2, 0.6]])
    scale = torch.tensor([1.0, 4.0])
    calls = []

    def cost(a):
        calls.append(a.shape[0])
        return (((a - target) ** 2) * scale).sum((1, 2))

    cfg = CEMConfig(samples=300, elites=10, iterations=15, horizon=3)
    lo, hi = torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 1.0])
    res = cem(cost, lo, hi, cfg, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(res.actions, target, atol=0.02)
    assert calls == [300] * 15  # one batched call per iteration
    assert all(b <= a for a, b in zip(res.costs, res.costs[1:]))
    again = cem(cost, lo, hi, cfg, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.actions, res.actions)
    # a minimum outside the box ends on the boundary, never outside
    far = cem(lambda a: ((a - 3.0) ** 2).sum((1, 2)), lo, hi, cfg, generator=torch.Generator().manual_seed(1))
    assert float(far.actions.max()) <= 1.0 and float(far.actions.min()) > 0.95
    # the loop over candidates (batch=1) gives the same answer from the same seed
    looped = cem(cost, lo, hi, CEMConfig(samples=30, elites=5, iterations=3, horizon=3, batch=1),
                 generator=torch.Generator().manual_seed(2))
    batched = cem(cost, lo, hi, CEMConfig(samples=30, elites=5, iterations=3, horizon=3),
                  generator=torch.Generator().manual_seed(2))
    assert torch.allclose(looped.actions, batched.actions)


def test_cem_hold_and_nonfinite_costs():
    cfg = CEMConfig(samples=64, elites=8, iterations=4, horizon=5, hold=True)
    res = cem(lambda a: (a - 0.4).pow(2).sum((1, 2)), torch.tensor([-1.0]), torch.tensor([1.0]), cfg,
              generator=torch.Generator().manual_seed(0))
    assert res.actions.shape == (5, 1) and bool((res.actions == res.actions[0]).all())
    assert abs(float(res.actions[0, 0]) - 0.4) < 0.05
    # a rollout that diverges (NaN) is never chosen
    nan_high = lambda a: torch.where(a[:, 0, 0] > 0, torch.nan, (a[:, 0, 0] + 0.5).abs())  # noqa: E731
    res = cem(nan_high, torch.tensor([-1.0]), torch.tensor([1.0]), cfg, generator=torch.Generator().manual_seed(0))
    assert float(res.actions[0, 0]) <= 0 and math.isfinite(res.cost)
    with pytest.raises(ConfigError, match="elites"):
        CEMConfig(samples=5, elites=6).validate()
    with pytest.raises(ValueError, match="bounds"):
        cem(lambda a: a.sum((1, 2)), torch.tensor([1.0]), torch.tensor([0.0]), cfg)
    with pytest.raises(ValueError, match="tubelet"):
        check_tubelet(2)


# ---------------------------------------------------------------------------------------------- rollouts


def test_batched_rollouts_equal_one_candidate_at_a_time(one_thread):
    """The batched controller and action-WM rollouts give each candidate exactly what it gets alone, and the
    controller path feeds actions in the training scale."""
    from lawm.models.action_wm import ActionWMConfig, ActionWorldModel
    from lawm.models.controllers import Controller, ControllerConfig
    from lawm.models.lam import LAMConfig, LatentActionWorldModel
    from lawm.models.world_model import WorldModelConfig
    from lawm.planning.planner import ActionWMRollout, ControllerRollout

    torch.manual_seed(0)
    grid, dim = 4, 12
    lam = LatentActionWorldModel(LAMConfig(feat_dim=dim, grid_h=grid, grid_w=grid, latent_dim=16))
    ctrl = Controller(ControllerConfig(action_dim=2, latent_dim=16, feat_dim=dim, grid_h=grid, grid_w=grid, width=32,
                                       depth=1, heads=4))
    awm = ActionWorldModel(ActionWMConfig(feat_dim=dim, grid_h=grid, grid_w=grid, action_dim=2,
                                          wm=WorldModelConfig(size="tiny")))
    with torch.no_grad():  # AdaLN-zero and zero heads would make every action equivalent at init
        for p in [*lam.parameters(), *ctrl.parameters(), *awm.parameters()]:
            p.add_(0.1 * torch.randn_like(p))
    ctx = torch.randn(3, grid * grid, dim)
    ctx_a = torch.randn(2, 2)
    cand = torch.randn(5, 4, 2)
    for roll in (ControllerRollout(lam, ctrl, action_scale=2.0), ActionWMRollout(awm, action_scale=2.0)):
        batched = roll(ctx, ctx_a, cand)
        assert batched.shape == (5, 4, grid * grid, dim)
        single = torch.cat([roll(ctx, ctx_a, cand[i : i + 1]) for i in range(5)])
        assert torch.allclose(batched, single, atol=1e-5)
    # the stepped rollouts (caches over the context, one new frame per step) against re-running every frame
    with torch.no_grad():
        seq, acts, ref = ctx[None].expand(5, -1, -1, -1), (ctx_a * 2)[None].expand(5, -1, -1), []
        z = lam.infer_latents(ctx[None]).expand(5, -1, -1)
        for h in range(cand.shape[1]):
            acts = torch.cat([acts, cand[:, h : h + 1] * 2], dim=1)
            z = torch.cat([z, ctrl.eval()(acts, seq)[:, -1:]], dim=1)
            nxt = lam.eval().predict(seq, z)[:, -1:]
            ref.append(nxt)
            seq = torch.cat([seq, nxt], dim=1)
    roll = ControllerRollout(lam, ctrl, action_scale=2.0)
    torch.testing.assert_close(roll(ctx, ctx_a, cand), torch.cat(ref, dim=1), rtol=1e-5, atol=1e-5)
    run = roll.start(ctx, ctx_a)
    first = run(cand)
    torch.testing.assert_close(run(cand), first, rtol=0, atol=0)  # every call starts from the context's caches
    buffer = ctx.clone()  # a context changed in place is a new context (nothing is keyed on the tensor object)
    before = roll(buffer, ctx_a, cand)
    buffer += 0.5
    assert not torch.allclose(roll(buffer, ctx_a, cand), before, atol=1e-4)
    # context actions must pair up with the context's transitions (a short tensor is not broadcast over them)
    planner = Planner(rollout=roll, cem=CEMConfig(samples=4, elites=2, iterations=1, horizon=4),
                      low=-torch.ones(2), high=torch.ones(2))
    with pytest.raises(ValueError, match="3 context frames need 2 context actions, got 1"):
        planner.plan(ctx, ctx_a[:1], ctx[-1])
    with pytest.raises(ValueError, match="2 frames need 2 conditions"):
        awm.wm.prefill(ctx[None, :2], ctx_a[None, :1])
    per_token = LatentActionWorldModel(LAMConfig(feat_dim=dim, grid_h=grid, grid_w=grid, latent_dim=16,
                                                 idm=dataclasses.replace(lam.cfg.idm, mode="per_token")))
    with pytest.raises(ValueError, match="latents per token"):
        ControllerRollout(per_token, ctrl, action_scale=1.0)
    # the scale is applied: scaling the candidates by 2 at scale 1 gives the same rollout as scale 2
    a = ControllerRollout(lam, ctrl, action_scale=1.0)(ctx, ctx_a * 2, cand * 2)
    b = ControllerRollout(lam, ctrl, action_scale=2.0)(ctx, ctx_a, cand)
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(ControllerRollout(lam, ctrl, action_scale=1.0)(ctx, ctx_a, cand), b, atol=1e-4)


# ---------------------------------------------------------------------------------------------- closed loop


def _unicycle_torch(pose: torch.Tensor, actions: torch.Tensor, dt: float) -> torch.Tensor:
    """Batched exact unicycle (the simulator's kinematics, re-written for candidates): (3,), (S, H, 2) -> (S, H, 3)."""
    x, y, th = (pose[i].expand(actions.shape[0]).double() for i in range(3))
    out = []
    for h in range(actions.shape[1]):
        v, w = actions[:, h, 0].double(), actions[:, h, 1].double()
        small = w.abs() < 1e-9
        ws = torch.where(small, torch.ones_like(w), w)
        nx = torch.where(small, x + v * dt * torch.cos(th), x + v / ws * (torch.sin(th + w * dt) - torch.sin(th)))
        ny = torch.where(small, y + v * dt * torch.sin(th), y + v / ws * (torch.cos(th) - torch.cos(th + w * dt)))
        x, y, th = nx, ny, th + w * dt
        out.append(torch.stack([x, y, th], dim=1))
    return torch.stack(out, dim=1)


@pytest.fixture
def one_thread():
    """Intra-op threads fight each other on a loaded 2-core machine (a tiny world model step: 54 ms with one
    thread, 1.2 s with two, measured at load 40); these tests time nothing, so run them on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("seed", [0, 1])
def test_closed_loop_with_true_dynamics_reaches_the_goal(seed, one_thread):
    """The planner and the MPC loop, with the simulator's own kinematics as the world model and the robot's pose
    as the representation, drive the pybullet Husky to the goal; doing nothing does not."""
    from lawm_datasets.sim_nav import NavConfig, NavEnv
    from lawm_datasets.simcommon import CONTROL_HZ

    cfg = NavConfig(width=32, height=32)

    class TrueDynamics:  # representation: the pose; prediction: the positions
        def start(self, context_s, context_actions):
            return lambda actions: _unicycle_torch(context_s[-1, 0], actions, 1.0 / CONTROL_HZ)[:, :, None, :2].float()

    planner = Planner(rollout=TrueDynamics(),
                      cem=CEMConfig(samples=120, elites=10, iterations=3, horizon=8, hold=True),
                      low=torch.tensor([-cfg.max_v, -cfg.max_w]), high=torch.tensor([cfg.max_v, cfg.max_w]))
    gen = torch.Generator().manual_seed(seed)

    def plan(states, actions, goal):
        ctx_a = torch.tensor(np.array(actions), dtype=torch.float32).reshape(len(actions), 2)
        return planner.plan(torch.stack(states), ctx_a, goal, generator=gen).actions[0].numpy()

    observe = lambda obs, info: torch.tensor(info["pose"], dtype=torch.float32)[None]  # noqa: E731
    goal = lambda info: torch.tensor(info["goal_pose"][:2], dtype=torch.float32)[None]  # noqa: E731
    env = NavEnv(cfg, max_steps=24, goal_radius=0.25)
    try:
        # the episodes whose goal lies at least 0.8 m away (exploring sometimes turns on the spot)
        far = (k for k in range(10, 60) if env.reset(seed=k)[1]["distance"] > 0.8)
        start = [next(far) for _ in range(seed + 1)][-1]
        result = run_closed_loop(env, seed=start, observe=observe, goal=goal, plan=plan, context=4)
        idle = run_closed_loop(env, seed=start, observe=observe, goal=goal, context=1,
                               plan=lambda s, a, g: np.zeros(2))
    finally:
        env.close()
    assert idle["initial_distance"] > 0.8 and not idle["success"]
    assert result["success"], result["distances"]
    assert result["final_distance"] < 0.25 and result["steps"] < 24
    assert result["actions"].shape == (result["steps"], 2)
