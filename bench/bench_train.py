"""Training figures: Ray Train step throughput ÷ a bare PyTorch loop of the same model and data, in this process,
on the same cores; the share of step time spent waiting for data; and the step-time overhead of the loop's
non-finite guard (the guarded loop ÷ the loop as it was before the guard, interleaved in this process); and a
per-domain stage's two small fits as they ran before (one after the other, Ray Train polling its workers every 2 s)
÷ as they run now (side by side, polling every 0.5 s), each way in a child process of its own (the poll interval is
read when Ray starts).

    python bench/bench_train.py                # all figures (the Ray one builds cached features first)
    python bench/bench_train.py --guard-only [--quick] [--threads 1]  # just the guard's overhead, in-memory data
    python bench/bench_train.py --stage-fits-only                     # just the per-domain stage's two fits
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
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

from jobs.ray_train import ScalingSection, TrainJob, _loader, fit, fit_all  # noqa: E402
from lawm.training.builders import build_lam  # noqa: E402

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


class PreGuardTrainer(Trainer):
    """The baseline: Trainer.fit exactly as it was before the non-finite guard (clip with its own norm, one float()
    sync, always step; no finiteness checks, no weight check before a checkpoint)."""

    def fit(self, make_batches, on_log=lambda m, s: None, on_checkpoint=lambda st, s, m: None) -> dict:
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
                batch = next(batches)
                self.batches_seen += 1
                wait += time.perf_counter() - tw
                with self.autocast():
                    loss, stats = self.module(batch, self.step / cfg.steps)
                (loss / accum).backward()
                samples += cfg.batch_size
                for k, v in stats.items():
                    sums[k] += float(v) / accum
            if cfg.optim.grad_clip > 0:
                sums["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(self.objective.parameters(),
                                                                          cfg.optim.grad_clip))
            for opt, sched in zip(self.opts, self.scheds):
                opt.step()
                sched.step()
            self.step += 1
            busy += time.perf_counter() - t0
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                n = cfg.log_every if self.step % cfg.log_every == 0 else self.step % cfg.log_every
                last = {k: v / n for k, v in sums.items()}
                last.update(samples_per_s=samples / busy, data_wait_share=wait / busy)
                on_log(last, self.step)
                sums.clear()
                wait = busy = 0.0
                samples = 0
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                on_checkpoint(self.state_dict(), self.step, last)
        return last


def guard_overhead(rounds: int = 12, steps: int = 20, batch: int = 16, threads: int = CPUS) -> dict:
    """Step time of the guarded loop ÷ the pre-guard loop: the tiny preset (noisy regulariser, the demo's 8x8 grid
    of 48-d patch features, 4-step windows as train_lam uses) on the same in-memory batches, fresh trainers with
    the same seed, alternating which goes first; each fit of `steps` steps logs once and checkpoints once (a
    real run checkpoints every 500 steps, so the guard's weight check weighs more here than it does there).
    On a machine shared with other jobs use threads=1: oversubscribed OpenMP threads made a 2-thread run >30x
    slower and far noisier (measured 2026-11-27, load average ~40 on 2 cores)."""
    torch.set_num_threads(threads)
    lam = lam_preset("tiny", feat_dim=48, grid_h=8, grid_w=8)
    cfg = TrainConfig(steps=steps, batch_size=batch, log_every=steps, ckpt_every=steps, optim=OptimConfig(lr=1e-3))
    g = torch.Generator().manual_seed(0)
    data = [{"feats": torch.randn(batch, 8, 64, 48, generator=g)} for _ in range(steps)]

    def timed(cls) -> tuple[float, float]:
        """(wall, CPU) seconds per step; CPU time (all threads of this process) is what a busy machine distorts least."""
        torch.manual_seed(0)
        trainer = cls(build_lam(lam, 4), cfg)
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.fit(lambda n: iter(data[n:]))
        return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps

    timed(Trainer), timed(PreGuardTrainer)  # warm-up: allocator, thread pools
    runs: dict[type, list[tuple[float, float]]] = {Trainer: [], PreGuardTrainer: []}
    for r in range(rounds):
        for cls in ((Trainer, PreGuardTrainer) if r % 2 == 0 else (PreGuardTrainer, Trainer)):
            runs[cls].append(timed(cls))
    wall = [g[0] / b[0] for g, b in zip(runs[Trainer], runs[PreGuardTrainer])]
    cpu = [g[1] / b[1] for g, b in zip(runs[Trainer], runs[PreGuardTrainer])]
    result = {"guard_step_ratio_wall": statistics.median(wall), "guard_step_ratio_cpu": statistics.median(cpu),
              "guard_goal": 1.02, "guard_ratio_wall_min_max": [min(wall), max(wall)],
              "guard_step_ms": 1e3 * statistics.median(w for w, _ in runs[Trainer]),
              "pre_guard_step_ms": 1e3 * statistics.median(w for w, _ in runs[PreGuardTrainer]), "guard_rounds": rounds,
              "guard_setting": f"tiny preset, CPU {threads} threads, batch {batch}, window 4, {steps} steps per fit"}
    print(json.dumps(result, indent=1))
    return result


def _lam_job(feats: dict, lam, train: TrainConfig, *, stage: str, cpus: int, out_dir: Path) -> TrainJob:
    """One 1-worker training job of the tiny LAM (window 4) on the cached features' train split."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return TrainJob(stage=stage, build=build_lam, build_kwargs={"lam_cfg": lam, "window": 4}, train=train,
                    scaling=ScalingSection(num_workers=1, cpus_per_worker=cpus),
                    train_urls=shard_urls(feats["features"], "train"), val_urls=[], data_kind="features",
                    out_dir=str(out_dir))


def _stage_fits(at_once: int, steps: int = 20, reports: int = 4) -> float:
    """Wall seconds of two 1-worker fits of the tiny LAM (a checkpoint report every steps/reports steps), `at_once`
    at a time, on a local Ray of 2 CPUs started here: what train_controller / train_wm_action do per domain."""
    from pipelines.ray_env import ensure_ray

    feats = feature_shards()
    lam = lam_preset("tiny", feat_dim=feats["dim"], grid_h=feats["grid_h"], grid_w=feats["grid_w"])
    train = TrainConfig(steps=steps, batch_size=8, log_every=steps // reports, ckpt_every=steps // reports,
                        loader_workers=0, optim=OptimConfig(lr=1e-3))
    ensure_ray(CPUS)
    with tempfile.TemporaryDirectory() as tmp:
        jobs = {d: (_lam_job(feats, lam, train, stage=f"bench_{d}", cpus=1, out_dir=Path(tmp) / d), f"bench_{d}")
                for d in ("nav", "manip")}
        start = time.perf_counter()
        fit_all(jobs, at_once=at_once)
        return time.perf_counter() - start


def stage_fits() -> dict:
    """The per-domain stage's two fits, before ÷ now, each way in a fresh child process (Ray and its poll interval
    start with it); the order alternates over two rounds so neither way always runs on a warmer machine."""
    ways = {"before": ("2.0", 1), "now": ("0.5", 2)}
    seconds: dict[str, list[float]] = {w: [] for w in ways}
    feature_shards()  # built once, outside the timed children
    for order in (("before", "now"), ("now", "before")):
        for way in order:
            interval, at_once = ways[way]
            env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": interval}
            env.pop("RAY_ADDRESS", None)
            code = f"import bench_train; print('SECONDS', bench_train._stage_fits({at_once}))"
            done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env,
                                  capture_output=True, text=True, timeout=900, check=True)
            seconds[way].append(float(done.stdout.rsplit("SECONDS", 1)[1].split()[0]))
            print(f"stage fits {way}: {seconds[way][-1]:.1f} s", flush=True)
    before, now = min(seconds["before"]), min(seconds["now"])
    result = {"stage_fits_before_s": before, "stage_fits_now_s": now, "stage_fits_speedup": before / now,
              "stage_fits_rounds": seconds}
    print(json.dumps(result, indent=1))
    return result


def main(steps: int = 120) -> dict:
    from pipelines.ray_env import ensure_ray

    feats = feature_shards()
    lam = lam_preset("tiny", feat_dim=feats["dim"], grid_h=feats["grid_h"], grid_w=feats["grid_w"])
    train = TrainConfig(steps=steps, batch_size=16, log_every=20, ckpt_every=steps, loader_workers=1, shuffle=64,
                        optim=OptimConfig(lr=1e-3))
    with tempfile.TemporaryDirectory() as tmp:
        job = _lam_job(feats, lam, train, stage="bench", cpus=CPUS, out_dir=Path(tmp))
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
    return {**result, **guard_overhead(), **stage_fits()}


if __name__ == "__main__":
    if "--stage-fits-only" in sys.argv[1:]:
        stage_fits()
    elif "--guard-only" in sys.argv[1:]:  # [--quick] [--threads N]
        args = sys.argv[1:]
        guard_overhead(**({"rounds": 6, "steps": 10} if "--quick" in args else {}),
                       threads=int(args[args.index("--threads") + 1]) if "--threads" in args else CPUS)
    else:
        main()
