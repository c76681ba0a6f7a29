"""Training figures: Ray Train step throughput ÷ a bare PyTorch loop of the same model and data, in this process,
on the same cores; and the share of step time spent waiting for data.

    python bench/bench_train.py
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lawm.config import from_dict  # noqa: E402
from lawm.data.clips import shard_urls  # noqa: E402
from lawm.models.encoders import EncoderConfig  # noqa: E402
from lawm.models.lam import lam_preset  # noqa: E402
from lawm.training.loop import Trainer, TrainConfig  # noqa: E402
from lawm.training.optim import OptimConfig  # noqa: E402

from jobs.train import ScalingSection, TrainJob, _loader, fit  # noqa: E402
from jobs.train_stages import build_lam  # noqa: E402

CACHE = ROOT / "bench" / "results" / "cache" / "train-features"
CPUS = 2


def feature_shards() -> dict:
    """Synthetic videos → clips → patch features, made once and cached."""
    from lawm_datasets.synthetic import SyntheticConfig, generate
    from pipelines.encode import EncodeConfig, run_encode
    from pipelines.ingest import IngestConfig, run_ingest

    summary = CACHE / "encode" / "features.json"
    if not summary.exists():
        manifest = generate(SyntheticConfig(n_videos=16, seconds=8, fps=4, size=[64, 64], n_counterfactuals=0),
                            CACHE / "videos")
        run_ingest(from_dict(IngestConfig, {"input": str(manifest), "clip_frames": 16, "stride": 4, "size": 32,
                                            "shard_mb": 1}), CACHE / "ingest", progress=False)
        run_encode(EncodeConfig(encoder=EncoderConfig(kind="patch", image_size=32, patch_size=4), shard_mb=1),
                   CACHE / "ingest" / "shards", CACHE / "encode", progress=False)
    return json.loads(summary.read_text())


def _steady(values: list[float]) -> float:
    return statistics.median(values[1:] if len(values) > 2 else values)


def main(steps: int = 120) -> dict:
    from pipelines.ray_env import ensure_ray

    feats = feature_shards()
    lam = lam_preset("tiny", feat_dim=feats["dim"], grid_h=feats["grid_h"], grid_w=feats["grid_w"])
    train = TrainConfig(steps=steps, batch_size=16, log_every=20, ckpt_every=steps, loader_workers=1, shuffle=64,
                        optim=OptimConfig(lr=1e-3))
    with tempfile.TemporaryDirectory() as tmp:
        job = TrainJob("bench", build_lam, {"lam_cfg": lam, "window": 4}, train,
                       ScalingSection(num_workers=1, cpus_per_worker=CPUS), shard_urls(feats["features"], "train"),
                       [], "features", tmp)
        # bare PyTorch: the same objective, loader and loop, no Ray
        torch.set_num_threads(CPUS)
        ds, loader = _loader(job, job.train_urls, train.shuffle, repeat=True)
        bare_logs: list[dict] = []
        trainer = Trainer(build_lam(lam, 4), train)
        trainer.fit(lambda n: (ds.set_position(n, train.batch_size), iter(loader))[1],
                    on_log=lambda m, s: bare_logs.append(m))
        ensure_ray(CPUS)
        fit(job, "bench")
        ray_logs = [json.loads(x) for x in (Path(tmp) / "progress.jsonl").read_text().splitlines()]
        ray_logs = [e for e in ray_logs if e["event"] == "log"]
    bare = _steady([m["samples_per_s"] for m in bare_logs])
    ray_sps = _steady([m["samples_per_s"] for m in ray_logs])
    result = {"bare_samples_per_s": bare, "ray_train_samples_per_s": ray_sps, "ratio": ray_sps / bare, "goal": 0.9,
              "data_wait_share_ray": _steady([m["data_wait_share"] for m in ray_logs]),
              "data_wait_share_bare": _steady([m["data_wait_share"] for m in bare_logs]), "stall_goal": 0.05}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
