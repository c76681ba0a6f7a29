"""Time one training step of the L preset in bf16 on one GPU and report MFU (a prepared, < 10 min script).

    python bench/gpu_step.py [--batch 8] [--steps 10] [--compile] [--peak-tflops 989]

Shapes follow the paper: V-JEPA 2-L features (D=1024) of 256 px, 16-frame clips -> 8 representations of 16x16
tokens (tubelet 2). FLOPs are counted analytically: 6 * (matmul params) * tokens for every weight a token passes
through, plus attention 12 * W * (attended key-query pairs) per layer (fwd 4, bwd 8); block-causal attention
counts only the allowed pairs. Then, on the same card: block-causal FlexAttention against the masked SDPA path
(agreement of outputs and gradients in bf16, and the speed-up), and the clips/s of the V-JEPA 2-L encoder shape on
16-frame 256 px clips. Refuses on a machine without CUDA. `--cpu-smoke` runs the same code on a tiny preset on the
CPU (checks the script itself; its numbers mean nothing).
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


def attention_check(device: torch.device, width: int, heads: int, grid: int, frames: int, batch: int) -> dict:
    """The block-causal attention paths side by side on this device: FlexAttention (BlockMask; compiled on CUDA)
    against SDPA with the boolean mask, same weights, bf16. Output and gradient differences (each beside what bf16
    rounding alone moves the SDPA path from fp32) and the time of forward+backward of one 2-layer stack."""
    from lawm.models.layers import Transformer

    torch.manual_seed(0)
    paths = {k: Transformer(width, 2, heads, cond_width=128, attention=k).to(device) for k in ("sdpa", "flex")}
    with torch.no_grad():  # AdaLN-zero makes every block the identity at init: give the zeroed layers weights
        for p in paths["sdpa"].parameters():
            p.add_(0.02 * torch.randn_like(p))
    paths["flex"].load_state_dict(paths["sdpa"].state_dict())
    x = torch.randn(batch, frames, grid * grid, width, device=device)
    c = torch.randn(batch, frames, 1, 128, device=device)
    backward = device.type == "cuda"  # FlexAttention has no CPU backward: the smoke run checks forward only
    out, grads, times = {}, {}, {}

    def run(net):
        xi = x.clone().requires_grad_(backward)
        with torch.autocast(device.type, torch.bfloat16), torch.set_grad_enabled(backward):
            y = net(xi, (grid, grid), c)
        if backward:
            y.float().square().mean().backward()
        return y.detach().float(), xi.grad.detach().float() if backward else None

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for kind, net in paths.items():
        for _ in range(2):  # warm-up (compiles FlexAttention on CUDA)
            run(net)
        sync()
        t0 = time.perf_counter()
        for _ in range(3):
            out[kind], grads[kind] = run(net)
        sync()
        times[kind] = (time.perf_counter() - t0) / 3
    with torch.no_grad():
        ref = paths["sdpa"](x, (grid, grid), c).float()
    grad_diff = ((grads["flex"] - grads["sdpa"]).norm() / grads["sdpa"].norm()).item() if backward else None
    return {"attention_out_max_diff": (out["flex"] - out["sdpa"]).abs().max().item(),
            "attention_bf16_rounding": (out["sdpa"] - ref).abs().max().item(),
            "attention_grad_rel_diff": grad_diff,
            "attention_sdpa_s": times["sdpa"], "attention_flex_s": times["flex"],
            "attention_flex_speedup": times["sdpa"] / times["flex"]}


def encode_throughput(device: torch.device, smoke: bool, batch: int) -> dict:
    """Clips/s of the V-JEPA 2-L encoder shape (random weights, saved and loaded through lawm's real loading code) on
    16-frame 256 px clips in bf16; `smoke`: a tiny config at 32 px, to check the code."""
    import tempfile

    from transformers import VJEPA2Config, VJEPA2Model

    from lawm.models.encoders import EncoderConfig, build_encoder

    hf = VJEPA2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, crop_size=32,
                      pred_hidden_size=32, pred_num_attention_heads=4, pred_num_hidden_layers=1) if smoke \
        else VJEPA2Config()
    size, frames = hf.crop_size, 16
    with tempfile.TemporaryDirectory() as tmp:
        VJEPA2Model(hf).save_pretrained(tmp)
        enc = build_encoder(EncoderConfig(kind="vjepa2", image_size=size, weights=tmp)).to(device)
    clips = torch.rand(batch, frames, 3, size, size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16):
        enc(clips)
        sync()
        t0 = time.perf_counter()
        reps = 2 if smoke else 5
        for _ in range(reps):
            enc(clips)
        sync()
    dt = (time.perf_counter() - t0) / reps
    return {"encode_shape": f"V-JEPA 2 {'tiny' if smoke else 'L'} {frames}x{size}px", "encode_batch": batch,
            "encode_clips_per_s": batch / dt}


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
    w, h = (cfg.wm.resolved().width, cfg.wm.resolved().heads)
    res.update(attention_check(device, w, h, args.grid, args.frames, args.batch))
    res.update(encode_throughput(device, args.cpu_smoke, 2 if args.cpu_smoke else 16))
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
