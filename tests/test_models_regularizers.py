"""Regularisers against hand-computed cases."""
import math

import pytest
import torch

from lawm.models import IDMConfig, LAMConfig, LatentActionWorldModel, RegConfig, build_regularizer
from lawm.models.regularizers import gaussian_kl, sparse_terms, warmup


def test_warmup_schedule():
    assert [warmup(p, 0.25, 0.25) for p in (0.0, 0.2, 0.25, 0.375, 0.5, 1.0)] == [0, 0, 0, 0.5, 1, 1]


def test_sparse_terms_by_hand():
    cfg = RegConfig(kind="sparse", l1=0.1)
    t = sparse_terms(torch.tensor([[1.0, 0.0], [-1.0, 2.0]]), cfg)
    # variances 2 and 2 -> std > 1: no variance penalty; cov [[2,-2],[-2,2]] -> off-diagonal squares 8 / (D(D-1)=2)
    assert t["var"].item() == 0 and t["cov"].item() == pytest.approx(4.0)
    assert t["mean"].item() == pytest.approx((0 + 1) / 2)  # |column means| 0 and 1
    assert t["norm"].item() == pytest.approx((math.sqrt(2) - 1 + 0) / 2)  # floor sqrt(D) on norms 1, sqrt(5)
    assert t["l1"].item() == pytest.approx((1 + 3) / 2)
    want = 0.1 * 0 + 0.001 * 4 + 0.1 * 0.5 + 1.0 * (math.sqrt(2) - 1) / 2 + 0.1 * 2
    assert t["total"].item() == pytest.approx(want, rel=1e-6)
    # low variance: column stds sqrt(0.02 + 1e-4) and sqrt(0 + 1e-4)
    t = sparse_terms(torch.tensor([[0.1, 0.0], [0.3, 0.0]]), cfg)
    assert t["var"].item() == pytest.approx((1 - math.sqrt(0.0201) + 1 - 0.01) / 2, rel=1e-5)


def test_sparse_regulariser_warms_up_and_reports():
    reg = build_regularizer(RegConfig(kind="sparse"), 4)
    z = torch.randn(3, 5, 4)
    out, loss, stats = reg(z, progress=0.1)
    assert torch.equal(out, z) and loss.item() == 0.0
    assert reg(z, progress=1.0)[1].item() > 0
    assert {"z_norm", "z_near_zero", "sparse_l1", "reg_weight"} <= stats.keys()


def test_gaussian_kl_by_hand():
    assert gaussian_kl(torch.zeros(5), torch.zeros(5)).abs().max().item() == 0.0  # N(0,1) vs N(0,1)
    kl = gaussian_kl(torch.tensor(1.0), torch.tensor(math.log(2.0)))
    assert kl.item() == pytest.approx(0.5 * (1 + 2 - 1 - math.log(2)))


def test_noisy_regulariser():
    torch.manual_seed(0)
    reg = build_regularizer(RegConfig(kind="noisy", beta=0.5), 3)
    assert reg.raw_dim == 6
    raw = torch.cat([torch.zeros(20000, 3), torch.zeros(20000, 3)], -1)  # standard normal posterior
    z, loss, stats = reg.train()(raw, progress=1.0)
    assert stats["kl"] == 0.0 and loss.item() == 0.0
    assert z.std().item() == pytest.approx(1.0, abs=0.02)  # reparameterised samples
    raw = torch.tensor([[1.0, 2.0, 3.0, math.log(2.0), 0.0, 0.0]])
    z, loss, stats = reg.eval()(raw, progress=1.0)
    assert torch.equal(z, raw[:, :3])  # eval: the mean
    want = 0.5 * (1 + 2 - 1 - math.log(2)) + 0.5 * 4 + 0.5 * 9
    assert stats["kl"] == pytest.approx(want, rel=1e-6) and loss.item() == pytest.approx(0.5 * want, rel=1e-6)
    assert reg(raw, progress=0.375)[1].item() == pytest.approx(0.25 * want, rel=1e-6)  # half-way up the ramp


def test_noisy_logvar_bias_init():
    m = LatentActionWorldModel(LAMConfig(latent_dim=8, reg=RegConfig(kind="noisy"), idm=IDMConfig(width=24, heads=4)))
    assert torch.all(m.idm.head.bias[8:] == -4.0)


def test_vq_by_hand_and_straight_through():
    reg = build_regularizer(RegConfig(kind="discrete", codebook_size=2), 2)
    with torch.no_grad():
        reg.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    reg.initialised.fill_(True)
    z = torch.tensor([[0.1, 0.2], [0.9, 0.7]], requires_grad=True)
    q, loss, stats = reg.eval()(z)
    assert torch.equal(q, torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    want = 1.25 * (0.01 + 0.04 + 0.01 + 0.09) / 4  # codebook + 0.25 * commitment, same squared error
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert stats["code_usage"] == 1.0 and stats["perplexity"] == pytest.approx(2.0)
    q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # straight-through


def test_vq_dead_codes_come_back_after_reset():
    torch.manual_seed(0)
    reg = build_regularizer(RegConfig(kind="discrete", codebook_size=8, reset_every=64), 2).train()
    with torch.no_grad():  # 6 codes far from any data: dead
        reg.codebook.copy_(torch.cat([torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), torch.full((6, 2), 100.0)]))
    reg.initialised.fill_(True)
    data = torch.randn(64, 2) * 3
    _, _, stats = reg(data)
    assert stats["code_usage"] == 2 / 8 and stats["codes_reset"] == 6.0
    assert (reg.codebook.abs() < 50).all()  # the dead codes moved onto data
    _, _, stats = reg.eval()(data)
    assert stats["code_usage"] > 2 / 8 and stats["perplexity"] > 2.0
    assert reg.usage.sum() == 0  # usage counts restart after a reset


def test_none_and_lam_reg_stats():
    reg = build_regularizer(RegConfig(kind="none"), 4)
    z = torch.randn(2, 3, 4)
    out, loss, stats = reg(z)
    assert torch.equal(out, z) and loss.item() == 0
    assert stats["z_norm"] == pytest.approx(z.norm(dim=-1).mean().item())



class _HeadVQ(torch.nn.Module):
    """A linear IDM head and a VQ: the part of the latent action model the codebook lives in."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(4, 2)
        self.vq = build_regularizer(RegConfig(kind="discrete", codebook_size=16, reset_every=96), 2)

    def forward(self, x):
        z, loss, stats = self.vq(self.head(x))
        return loss + z.pow(2).mean(), stats


def _vq_ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One of two real processes (gloo, DDP), each training on its own data, as a Ray Train worker does."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # different random draws on each rank (the trainer seeds seed + rank)
        model = _HeadVQ().train()
        ddp = torch.nn.parallel.DistributedDataParallel(model)  # broadcasts rank 0's initial weights
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(rank)
        resets = []
        for _ in range(12):  # 64 latents a step over both ranks: a reset every second step
            loss, stats = ddp(torch.randn(32, 4, generator=gen) + 3.0 * rank)  # the ranks' data differ
            loss.backward()
            opt.step()
            opt.zero_grad()
            resets.append(stats["codes_reset"])
        torch.save({"codebook": model.vq.codebook.detach().clone(), "usage": model.vq.usage.clone(),
                    "seen": model.vq.seen.clone(), "resets": resets}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_vq_codebook_identical_on_all_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_vq_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert sum(r0["resets"]) > 0, "the run must include a dead-code reset"
    assert r0["resets"] == r1["resets"]  # the same codes found dead at the same steps
    assert torch.equal(r0["codebook"], r1["codebook"])  # bitwise
    assert torch.equal(r0["usage"], r1["usage"]) and torch.equal(r0["seen"], r1["seen"])
