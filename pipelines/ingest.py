"""Stage `ingest`: videos → fixed-length clips → WebDataset shards, distributed with Ray Data.

    python -m pipelines.ingest --input PATH --output DIR [key=value ...]

Output folder: shards/{train,val}-NNNNNN.tar, clips.parquet, failures.parquet, summary.json, and _work/
(per-source markers that make a killed run resumable without duplicates).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd

from lawm.config import ConfigError, config_hash, from_dict, require, to_dict
from pipelines.clipper import atomic_write_json, process_source
from pipelines.shards import list_shards, pack, packed_sources
from pipelines.sources import VIDEO_EXTENSIONS, Source, discover


@dataclass
class IngestConfig:
    input: str = ""  # a folder or a manifest; empty = the output of the stage before (see jobs/stages.py)
    clip_frames: int = 16  # the paper: 16 frames at 4 fps
    fps: float = 4.0
    stride: int = 16  # output frames between clip starts; < clip_frames overlaps clips
    size: int = 256  # short side scaled to it, then a centre crop of size x size
    codec: str = "libx264"
    crf: int = 18
    preset: str = "veryfast"
    shard_mb: float = 256.0
    min_shards: int = 1  # per split, when enough sources exist: one per data-parallel worker
    val_fraction: float = 0.05
    max_clips_per_video: Optional[int] = None
    cpus_per_task: float = 1.0
    ffmpeg_threads: int = 1  # threads of one decode; parallelism comes from Ray tasks
    timeout_s: float = 120.0  # an ffmpeg that runs longer than this + timeout_per_source_s x duration is killed
    timeout_per_source_s: float = 2.0
    extensions: list[str] = field(default_factory=lambda: list(VIDEO_EXTENSIONS))

    def validate(self) -> None:
        require(self.clip_frames >= 2, "clip_frames", "must be at least 2")
        require(self.fps > 0, "fps", "must be positive")
        require(self.stride >= 1, "stride", "must be at least 1")
        require(self.size >= 16 and self.size % 2 == 0, "size", "must be an even number >= 16 (yuv420p)")
        require(self.shard_mb > 0, "shard_mb", "must be positive")
        require(self.min_shards >= 1, "min_shards", "must be at least 1")
        require(0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)")
        require(self.cpus_per_task > 0, "cpus_per_task", "must be positive")
        require(self.timeout_s > 0, "timeout_s", "must be positive")


def _ray_process(row: dict, cfg_dict: dict, work: str) -> dict:
    cfg = from_dict(IngestConfig, cfg_dict)
    src = Source(**json.loads(row["source"]))
    return {"result": json.dumps(process_source(src, cfg, Path(work)), default=str)}


class _Progress:
    """A bar on a terminal, a line every `every` seconds otherwise: videos, clips, frames/s."""

    def __init__(self, total: int, every: float = 10.0):
        from tqdm import tqdm

        self.t0 = time.perf_counter()
        self.clips = self.frames = 0
        self.bar = tqdm(total=total, unit="video", desc="ingest", mininterval=every if not sys.stderr.isatty() else 0.5,
                        file=sys.stderr, dynamic_ncols=True)

    def update(self, row: dict) -> None:
        self.clips += len(row.get("clips", []))
        self.frames += row.get("frames_out", 0)
        rate = self.frames / max(time.perf_counter() - self.t0, 1e-6)
        self.bar.set_postfix(clips=self.clips, fps=f"{rate:.0f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _run_sources(sources: list[Source], cfg: IngestConfig, work: Path, progress: bool) -> list[dict]:
    import ray

    from pipelines.ray_env import ensure_ray

    ensure_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours below says more
    items = [{"source": json.dumps(s.to_dict(), default=str)} for s in sources]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map(_ray_process, fn_kwargs={"cfg_dict": to_dict(cfg), "work": str(work)}, num_cpus=cfg.cpus_per_task)
    bar = _Progress(len(items)) if progress else None
    rows = []
    for out in ds.iter_rows():
        row = json.loads(out["result"])
        rows.append(row)
        if bar:
            bar.update(row)
    if bar:
        bar.close()
    return rows


def _failures_table(rows: list[dict]) -> pd.DataFrame:
    failed = [{k: r.get(k) for k in ("path", "sid", "stage", "error", "message")} for r in rows if r["status"] != "ok"]
    return pd.DataFrame(failed, columns=["path", "sid", "stage", "error", "message"])


def run_ingest(cfg: IngestConfig, output: str | Path, progress: bool = True) -> dict:
    """Run ingest over `cfg.input` into `output`. Returns the summary (also written to summary.json).

    Raises ConfigError for an unusable input and RuntimeError when not a single input gave a clip.
    """
    output = Path(output)
    sources = discover(cfg.input, tuple(cfg.extensions))
    if not sources:
        raise ConfigError(f"ingest.input: no video files found in {cfg.input}")
    work = output / "_work"
    settings = work / "settings.json"
    digest = config_hash({k: v for k, v in to_dict(cfg).items() if k not in ("input", "cpus_per_task")})
    if settings.exists() and json.loads(settings.read_text()).get("hash") != digest:
        shutil.rmtree(output)  # clips cut with other settings must not mix with these
    atomic_write_json(settings, {"hash": digest, "config": to_dict(cfg)})
    t0 = time.perf_counter()
    rows = _run_sources(sources, cfg, work, progress)
    wall = time.perf_counter() - t0

    ok = {r["sid"]: r for r in rows if r["status"] == "ok"}
    shard_dir = output / "shards"
    packed = packed_sources(shard_dir)
    pending = [(r["clips"][0]["split"], sid, work / "staging" / f"{sid}.tar") for sid, r in ok.items() if sid not in packed]
    packed.update(pack(pending, shard_dir, int(cfg.shard_mb * 2**20), cfg.min_shards))
    for _, sid, staged in pending:
        staged.unlink(missing_ok=True)  # its clips now live in a shard

    clip_rows = [{**c, "shard": packed.get(sid)} for sid, r in ok.items() for c in r["clips"]]
    clips = pd.DataFrame(clip_rows).sort_values("key") if clip_rows else pd.DataFrame(columns=["key", "shard", "split"])
    failures = _failures_table(rows)
    clips.to_parquet(output / "clips.parquet", index=False)
    failures.to_parquet(output / "failures.parquet", index=False)
    seconds_in = sum(r["seconds_in"] for r in ok.values())
    frames_out = sum(r["frames_out"] for r in ok.values())
    summary = {
        "inputs": len(sources), "sources_ok": len(ok), "sources_failed": len(failures),
        "resumed": sum(bool(r.get("resumed")) for r in rows), "clips": len(clips),
        "duplicate_inputs": len(rows) - len({r["sid"] for r in rows}),  # same content (and segment) listed twice
        "clips_per_split": clips["split"].value_counts().to_dict() if len(clips) else {},
        "shards": [p.name for p in list_shards(shard_dir)],
        "hours_in": seconds_in / 3600, "hours_out": len(clips) * cfg.clip_frames / cfg.fps / 3600,
        "wall_seconds": wall, "frames_out_per_s": frames_out / wall if wall else 0.0,
        "failures_by_error": failures["error"].value_counts().to_dict() if len(failures) else {},
    }
    atomic_write_json(output / "summary.json", summary)
    if not ok:
        raise RuntimeError(f"ingest: none of {len(sources)} inputs gave a clip; see {output / 'failures.parquet'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import run_cli

    def run(cfg: IngestConfig, inp: str, out: str, progress: bool) -> dict:
        cfg = from_dict(IngestConfig, {**to_dict(cfg), "input": inp}, prefix="ingest")
        return run_ingest(cfg, out, progress=progress)

    return run_cli(argv, "python -m pipelines.ingest", __doc__, IngestConfig, "ingest",
                   "a folder of videos or a CSV/parquet/JSONL manifest", run,
                   ("inputs", "sources_ok", "sources_failed", "clips", "hours_in"), lambda summary, out: out)


if __name__ == "__main__":
    # Re-import under the package name: Ray pickles functions of `__main__` by value, without their module.
    from pipelines.ingest import main as package_main

    sys.exit(package_main())
