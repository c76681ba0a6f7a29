"""Training-input speed: cached features (the `encode` stage) vs decoding clips and re-encoding them every step.

Both paths run the same training step, a forward/backward + AdamW step of a tiny latent action world model, for
`steps` timed batches each (after one warm-up), alternating step by step so that both see the same load, in this
process (DataLoader without workers, so a step's figure is its whole cost on these cores). Per-part minima
(and the median step) are reported; `speedup` uses the minima, the least disturbed by other work on shared cores:
  (a) cached : read a batch of fp16 features from `features/*.tar` -> step
  (b) encode : read + decode a batch of mp4 clips (`clip_dataset`) -> frozen encoder forward -> step
for a timm ViT-S (DINOv2 layout, 224 px, 16x16 tokens of 384, random init), a ViT-B/16 (224 px, 14x14 tokens of
768, random init) and, for contrast, the light `patch`
encoder (16 px patches at 224 px, fixed projection to 384). `speedup` is the whole step's, `input_speedup` that of
getting a batch of features alone. It also reports the encode stage's own throughput.

    python bench/bench_encode.py [--quick] [--steps N] [--batch B]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lawm.config import from_dict  # noqa: E402
from lawm.data.clips import clip_dataset, collate  # noqa: E402
from lawm.data.features import collate_features, feature_dataset  # noqa: E402
from lawm.models.lam import LatentActionWorldModel, lam_preset  # noqa: E402
from pipelines.encode import EncodeConfig, make_encoder, run_encode  # noqa: E402
from pipelines.ingest import IngestConfig, run_ingest  # noqa: E402

CACHE = ROOT / "bench" / "results" / "cache"
CPUS = 2
ENCODERS = {
    "vit_s_dinov2": {"kind": "timm", "timm_name": "vit_small_patch14_dinov2", "image_size": 224},
    "vit_b16": {"kind": "timm", "timm_name": "vit_base_patch16_224", "image_size": 224},  # 14x14 tokens of 768
    "patch16": {"kind": "patch", "image_size": 224, "patch_size": 16, "proj_dim": 384},
}


def make_source(path: Path, seconds: int, seed: int, size: str = "320x240", fps: int = 8) -> Path:
    from bench_ingest import make_source as noisy_pattern

    return noisy_pattern(path, seconds, size, fps, seed)


def _forever(loader):
    """Epoch after epoch, reading (and decoding) again each time, unlike itertools.cycle, which replays copies."""
    while True:
        yield from loader


class _Trainer:
    """One training path: next batch -> features (`prepare`) -> forward/backward/AdamW of its own model."""

    def __init__(self, batches, prepare, lam):
        torch.manual_seed(0)
        self.model = LatentActionWorldModel(lam)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.batches, self.prepare = batches, prepare
        self.times: dict[str, list[float]] = {"data_ms": [], "prepare_ms": [], "step_ms": [], "total_ms": []}

    def step(self, record: bool) -> None:
        t0 = time.perf_counter()
        batch = next(self.batches)
        t1 = time.perf_counter()
        feats = self.prepare(batch)
        t2 = time.perf_counter()
        out = self.model(feats)
        out["loss"].backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if record:
            for k, v in (("data_ms", t1 - t0), ("prepare_ms", t2 - t1), ("step_ms", t3 - t2), ("total_ms", t3 - t0)):
                self.times[k].append(1000 * v)

    def summary(self) -> dict:
        """Per-part minimum (the cost with the least interference from other work on shared cores) and median."""
        return {**{k: round(min(v), 1) for k, v in self.times.items()},
                "median_total_ms": round(statistics.median(self.times["total_ms"]), 1)}


def _interleaved(a: _Trainer, b: _Trainer, steps: int) -> None:
    """Alternate the two paths step by step (one warm-up each), so that both see the same load on shared cores."""
    for i in range(steps + 1):
        a.step(record=i > 0)
        b.step(record=i > 0)


def bench_encoder(name: str, enc: dict, ingest_dir: Path, work: Path, steps: int, batch: int) -> dict:
    cfg = from_dict(EncodeConfig, {"encoder": enc, "batch_size": 4})
    summary = run_encode(cfg, ingest_dir, work / name, progress=False)
    m = summary["metrics"]
    lam = lam_preset("tiny", feat_dim=summary["dim"], grid_h=summary["grid_h"], grid_w=summary["grid_w"])

    cached_loader = torch.utils.data.DataLoader(feature_dataset(work / name, "train", shuffle=0), batch_size=batch,
                                                collate_fn=collate_features, drop_last=True)
    encoder = make_encoder(cfg.encoder)
    clip_loader = torch.utils.data.DataLoader(clip_dataset(ingest_dir / "shards", "train", shuffle=0),
                                              batch_size=batch, collate_fn=collate, drop_last=True)
    cached = _Trainer(_forever(cached_loader), lambda b: b["feats"], lam)
    reencode = _Trainer(_forever(clip_loader), lambda b: encoder(b["frames"]), lam)
    _interleaved(cached, reencode, steps)
    cached, reencode = cached.summary(), reencode.summary()
    return {
        "encoder": enc, "dim": summary["dim"], "grid": [summary["grid_h"], summary["grid_w"]],
        "features_shape_per_clip": [summary["frames"], summary["grid_h"] * summary["grid_w"], summary["dim"]],
        "encode_stage": {"clips": m["clips_encoded"], "wall_s": round(m["wall_s"], 2),
                         "clips_per_s": round(m["clips_per_s"], 3), "frames_per_s": round(m["frames_per_s"], 2),
                         "actors": m["actors"], "bytes_written": m["bytes_written"]},
        "cached_step_ms": cached, "reencode_step_ms": reencode,
        "speedup": round(reencode["total_ms"] / cached["total_ms"], 2),  # whole training step, from minima
        "speedup_median": round(reencode["median_total_ms"] / cached["median_total_ms"], 2),
        "input_speedup": round((reencode["data_ms"] + reencode["prepare_ms"])  # batch of features only
                               / max(cached["data_ms"] + cached["prepare_ms"], 1e-3), 1),
    }


def main(quick: bool = False, steps: int | None = None, batch: int = 2) -> dict:
    import ray

    from pipelines.ray_env import ensure_ray

    steps = steps or (3 if quick else 6)
    torch.set_num_threads(CPUS)
    videos = CACHE / "encode-3x16s"
    for i in range(3):
        make_source(videos / f"v{i}.mp4", seconds=16, seed=i + 1)
    work = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    try:
        ensure_ray(num_cpus=CPUS)
        icfg = from_dict(IngestConfig, {"input": str(videos), "clip_frames": 16, "fps": 4.0, "stride": 16,
                                        "size": 224, "val_fraction": 0.0})
        run_ingest(icfg, work / "ingest", progress=False)
        results = {}
        for name, enc in ENCODERS.items():
            results[name] = bench_encoder(name, enc, work / "ingest", work, steps, batch)
        out = {"setup": {"cpus": CPUS, "device": "cpu", "steps": steps, "batch": batch,
                         "clip": "16 frames at 224x224, 4 fps", "model": "LatentActionWorldModel tiny"},
               **results, "speedup_vit_s": results["vit_s_dinov2"]["speedup"],
               "speedup_vit_b": results["vit_b16"]["speedup"],
               "speedup_patch": results["patch16"]["speedup"]}
        return out
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(main(args.quick, args.steps, args.batch), indent=1))
