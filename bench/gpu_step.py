"""Time one training step of the L preset in bf16 on one GPU and report MFU (a prepared, < 10 min script).

    python bench/gpu_step.py [--batch 8] [--steps 10] [--compile] [--peak-tflops 989]

Shapes follow the paper: V-JEPA 2-L features (D=1024) of 256 px, 16-frame clips -> 8 representations of 16x16
tokens (tubelet 2). FLOPs are counted analytically: 6 * (matmul params) * tokens for every weight a token passes
through, plus attention 12 * W * (attended key-query pairs) per layer (fwd 4, bwd 8); block-causal attention
counts only the allowed pairs. Refuses on a machine without CUDA. `--cpu-smoke` runs the same code on a tiny
preset on the CPU (checks the script itself; its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from lawm.models import LatentActionWorldModel, RegConfig, lam_preset


def step_flops(model: LatentActionWorldModel, b: int, t: int, n: int) -> float:
    """Training FLOPs of one step: IDM over (t-1) pairs of 2n tokens, world model over (t-1) frames of n tokens."""
    def matmul_params(module):
        return sum(p.numel() for name, p in module.named_parameters() if p.dim() == 2)

    idm, wm = model.idm, model.wm
    pairs, frames = b * (t - 1), t - 1
    # IDM: every linear sees 2n tokens per pair (the head sees one pooled vector: negligible)
    f = 6 * matmul_params(idm.body) * pairs * 2 * n + 6 * idm.inp.weight.numel() * pairs * 2 * n
    f += 12 * idm.cfg.resolved().width * idm.cfg.resolved().depth * pairs * (2 * n) ** 2
    # world model: in/out/blocks per token; AdaLN modulation once per frame (frame-wise conditioning)
    ada = sum(blk.ada[1].weight.numel() for blk in wm.body.blocks) + wm.final_ada[1].weight.numel()
    per_token = matmul_params(wm.body) - ada + wm.inp.weight.numel() + wm.out.weight.numel()
    f += 6 * per_token * b * frames * n + 6 * ada * b * frames
    pairs_attended = n * n * frames * (frames + 1) / 2  # block-causal: frame i sees frames 0..i
    f += 12 * wm.cfg.resolved().width * wm.cfg.resolved().depth * b * pairs_attended
    return float(f)


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--frames", type=int, default=8, help="representations per clip (16 frames / tubelet 2)")
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    ap.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.cpu_smoke:
        device, size, feat = torch.device("cpu"), "tiny", 48
        args.batch, args.grid, args.frames, args.steps, args.warmup = 2, 4, 3, 2, 1
    elif not torch.cuda.is_available():
        print("gpu_step: no CUDA device here; this benchmark needs one GPU (H100 for the MFU figure).", file=sys.stderr)
        sys.exit(2)
    else:
        device, size, feat = torch.device("cuda"), "L", 1024
        torch.backends.cuda.matmul.allow_tf32 = True

    torch.manual_seed(0)
    cfg = lam_preset(size, feat_dim=feat, grid_h=args.grid, grid_w=args.grid, reg=RegConfig(kind="noisy"))
    model = LatentActionWorldModel(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=6.25e-4, weight_decay=0.04, fused=device.type == "cuda")
    if args.compile:  # in place, per sub-model: the stats' .item() calls in LAM.forward would break one big graph
        model.idm.compile()
        model.wm.compile()
    s = torch.randn(args.batch, args.frames, args.grid * args.grid, feat, device=device)

    def step():
        with torch.autocast(device.type, torch.bfloat16):  # as the training loop does with TrainConfig.bf16
            loss = model(s, progress=0.5)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    flops = step_flops(model, args.batch, args.frames, args.grid * args.grid)
    res = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
        "preset": size, "params": sum(p.numel() for p in model.parameters()),
        "batch": args.batch, "frames": args.frames, "tokens_per_frame": args.grid ** 2, "compile": args.compile,
        "step_s": dt, "clips_per_s": args.batch / dt, "tflops_per_step": flops / 1e12,
        "achieved_tflops": flops / dt / 1e12, "mfu": flops / dt / (args.peak_tflops * 1e12),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
