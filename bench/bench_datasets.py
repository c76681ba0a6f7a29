"""Throughput of the data generators on one core (inline, no Ray), at the demo settings.

Run: python bench/bench_datasets.py  → prints a JSON dict. Episodes include rendering and MP4 + sidecar writing.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from lawm_datasets import sim_manip, sim_nav, synthetic


def _per_minute(count: int, seconds: float) -> float:
    return round(60.0 * count / seconds, 1)


def bench_synthetic(tmp: Path, n: int = 6) -> dict:
    cfg = synthetic.SyntheticConfig(n_videos=n, seconds=8.0, fps=8, size=[128, 128], n_counterfactuals=0)
    start = time.perf_counter()
    synthetic.generate(cfg, tmp / "synthetic")
    secs = time.perf_counter() - start
    return {"synthetic_videos_per_min": _per_minute(n, secs), "synthetic_setting": "8 s, 8 fps, 128x128, 4 agents"}


def bench_sim(tmp: Path, name: str, module, cfg, n: int) -> dict:
    module._episode_task(cfg, 0, str(tmp), "train")  # warm-up: imports, pybullet start
    start = time.perf_counter()
    for i in range(1, n + 1):
        module._episode_task(cfg, i, str(tmp), "train")
    secs = time.perf_counter() - start
    return {f"{name}_episodes_per_min_per_core": _per_minute(n, secs),
            f"{name}_setting": f"{cfg.steps} steps, {cfg.width}x{cfg.height}"}


def main() -> dict:
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="lawm-bench-") as tmp:
        root = Path(tmp)
        out.update(bench_synthetic(root))
        out.update(bench_sim(root, "nav", sim_nav, sim_nav.NavConfig(steps=32, width=96, height=96), 6))
        out.update(bench_sim(root, "manip", sim_manip, sim_manip.ManipConfig(steps=32, width=96, height=96), 4))
        two = sim_manip.ManipConfig(steps=32, width=96, height=96, cameras=2)
        out["manip_2cam_episodes_per_min_per_core"] = bench_sim(root, "m2", sim_manip, two, 2)[
            "m2_episodes_per_min_per_core"]
    return out


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
