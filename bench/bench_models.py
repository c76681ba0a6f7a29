"""Model benchmarks on this machine's CPU: training-step throughput of the tiny and S presets, parameter counts.

    python bench/bench_models.py          # prints a table; main() returns the numbers as a dict
"""
from __future__ import annotations

import time

import torch

from lawm.models import LatentActionWorldModel, RegConfig, lam_preset
from lawm.models.layers import count_params

# (preset, feat_dim, grid, frames, batch): tiny = 32 px frames in 4x4 patches; S = V-JEPA-like 384-d features on
# an 8x8 grid (a 16x16 grid is out of reach of 2 CPUs); L = V-JEPA 2-L features of 256 px clips (16 frames/2).
THROUGHPUT = [("tiny", 48, 8, 8, 16), ("S", 384, 8, 8, 2)]
COUNT = {"tiny": (48, 8), "S": (384, 16), "B": (768, 16), "L": (1024, 16)}


def build(size: str, feat_dim: int, grid: int, device="cpu") -> LatentActionWorldModel:
    cfg = lam_preset(size, feat_dim=feat_dim, grid_h=grid, grid_w=grid, reg=RegConfig(kind="noisy"))
    with torch.device(device):
        return LatentActionWorldModel(cfg)


def throughput(size, feat_dim, grid, frames, batch, warmup=2, iters=5) -> float:
    torch.manual_seed(0)
    model = build(size, feat_dim, grid)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    s = torch.randn(batch, frames, grid * grid, feat_dim)
    for i in range(warmup + iters):
        if i == warmup:
            t0 = time.perf_counter()
        loss = model(s, progress=0.5)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch * iters / (time.perf_counter() - t0)


def param_counts() -> dict[str, dict[str, int]]:
    out = {}
    for size, (feat_dim, grid) in COUNT.items():
        m = build(size, feat_dim, grid, device="meta")  # no memory, no init cost: L is ~0.3 B params
        out[size] = {"world_model": count_params(m.wm), "idm": count_params(m.idm), "total": count_params(m)}
    return out


def main() -> dict:
    counts = param_counts()
    speed = {p[0]: throughput(*p) for p in THROUGHPUT}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"{'preset':<6} {'world model':>12} {'IDM':>11} {'total':>12} {'clips/s (fwd+bwd+step)':>24}  shape")
    for size, c in counts.items():
        row = next((p for p in THROUGHPUT if p[0] == size), None)
        sp = f"{speed[size]:.2f}" if size in speed else "-"
        shape = f"B={row[4]} T={row[3]} N={row[2]}x{row[2]} D={row[1]}" if row else f"(count only, D={COUNT[size][0]})"
        print(f"{size:<6} {c['world_model']:>12,} {c['idm']:>11,} {c['total']:>12,} {sp:>24}  {shape}")
    return {"params": counts, "samples_per_s": speed,
            "shapes": {p[0]: dict(feat_dim=p[1], grid=p[2], frames=p[3], batch=p[4]) for p in THROUGHPUT}}


if __name__ == "__main__":
    main()
