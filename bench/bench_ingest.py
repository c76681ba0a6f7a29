"""Ingest figures.

1. Throughput ratio: ingest frames/s ÷ a bare ffmpeg decode + fps + scale + crop of the same videos to raw output,
   both on the same cores (Ray's CPUs = the baseline's concurrent ffmpeg processes), in this process. Beside it,
   what two of ingest's safety measures cost alone on the same videos: the whole-content SHA-256 fingerprint
   (`fingerprint_s`, one core, page cache warm) and the PyAV probe in a child process (`probe_s`), each also as a
   share of ingest's CPU time (its wall time x the cores).
2. Peak RSS of one ingest worker (the Python process + its ffmpeg children) on a 10-minute and a 2-minute
   1080p video: flat in the video's length.

    python bench/bench_ingest.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lawm.config import from_dict  # noqa: E402
from lawm.data.video import decode_args, ffmpeg_exe, probe  # noqa: E402
from pipelines.ingest import IngestConfig, run_ingest  # noqa: E402
from pipelines.sources import fingerprint  # noqa: E402

CACHE = ROOT / "bench" / "results" / "cache"
CPUS = 2


def make_source(path: Path, seconds: int, size: str, fps: int, seed: int = 0) -> Path:
    """A noisy moving test pattern (hard to compress, like real footage), cached between runs. Each `seed` gives
    different content: ingest treats files with the same content as one source and would skip the copies."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(".tmp-" + path.name)
        subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                        f"testsrc2=size={size}:rate={fps}", "-vf", f"noise=alls=12:allf=t:all_seed={seed + 1}", "-t", str(seconds),
                        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(tmp)], check=True)
        tmp.rename(path)
    return path


def bare_ffmpeg(videos: list[Path], cfg: IngestConfig) -> float:
    """Wall seconds for plain ffmpeg to decode, resample and resize every video to raw frames, CPUS at a time."""
    def one(v: Path) -> None:
        subprocess.run(decode_args(v, cfg.fps, cfg.size, threads=cfg.ffmpeg_threads), stdout=subprocess.DEVNULL,
                       stdin=subprocess.DEVNULL, check=True)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CPUS) as pool:
        list(pool.map(one, videos))
    return time.perf_counter() - t0


def throughput(quick: bool) -> dict:
    from pipelines.ray_env import ensure_ray

    n, seconds = (2, 20) if quick else (4, 60)
    folder = CACHE / f"tput-distinct-{n}x{seconds}"
    videos = [make_source(folder / f"v{i}.mp4", seconds, "1280x720", 30, seed=i) for i in range(n)]
    cfg = from_dict(IngestConfig, {"input": str(folder), "size": 256, "shard_mb": 64})
    source_frames = sum(probe(v).frames for v in videos)
    ensure_ray(CPUS)
    bare_ffmpeg(videos, cfg)  # warm the page cache for both
    bases, ingests = [], []
    for _ in range(2):  # interleaved, best of two: a burst of load elsewhere must not decide the ratio
        bases.append(bare_ffmpeg(videos, cfg))
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            run_ingest(cfg, out, progress=False)
            ingests.append(time.perf_counter() - t0)
    base, ingest = min(bases), min(ingests)
    t0 = time.perf_counter()
    assert len({fingerprint(v) for v in videos}) == n, "benchmark videos must differ in content"
    hashing = time.perf_counter() - t0
    t0 = time.perf_counter()
    for v in videos:
        probe(v)
    probing = time.perf_counter() - t0
    return {"videos": n, "source_frames": source_frames, "source_mib": sum(v.stat().st_size for v in videos) / 2**20,
            "bare_ffmpeg_s": base, "ingest_s": ingest,
            "bare_ffmpeg_frames_per_s": source_frames / base, "ingest_frames_per_s": source_frames / ingest,
            "ratio": base / ingest, "goal": 0.8, "moonshot": 0.9,
            "fingerprint_s": hashing, "fingerprint_share": hashing / (ingest * CPUS),
            "probe_s": probing, "probe_share": probing / (ingest * CPUS)}


def _worker(video: str, out: str) -> None:
    from pipelines.clipper import process_source
    from pipelines.sources import Source

    cfg = from_dict(IngestConfig, {"size": 256})
    process_source(Source(video), cfg, Path(out))


def peak_rss(video: Path) -> float:
    """Peak RSS (MiB) of a process running one source through ingest, children (ffmpeg) included."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out:
        proc = ctx.Process(target=_worker, args=(str(video), out))
        proc.start()
        peak, ps = 0, psutil.Process(proc.pid)
        while proc.is_alive():
            try:
                rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                peak = max(peak, rss)
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.05)
        proc.join()
    return peak / 2**20


def memory(quick: bool) -> dict:
    long_s, short_s = (120, 30) if quick else (600, 120)
    out = {}
    for seconds in (short_s, long_s):
        video = make_source(CACHE / f"rss-1080p-{seconds}s.mp4", seconds, "1920x1080", 10)
        out[f"peak_rss_mib_{seconds}s_1080p"] = peak_rss(video)
    out["long_over_short"] = out[f"peak_rss_mib_{long_s}s_1080p"] / out[f"peak_rss_mib_{short_s}s_1080p"]
    out["goal_mib"] = 1024
    return out


def main(quick: bool = False) -> dict:
    result = {"throughput": throughput(quick), "memory": memory(quick)}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller videos, for a smoke run")
    main(parser.parse_args().quick)
