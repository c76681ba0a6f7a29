"""Stage `ingest`: videos → fixed-length clips → WebDataset shards, distributed with Ray.

    python -m pipelines.ingest --input PATH --output DIR [key=value ...]

Output folder: shards/{train,val,test}-NNNNNN.tar, clips.parquet, failures.parquet, duplicates.parquet,
summary.json, and _work/ (per-source markers that make a killed run resumable without duplicates).

Contracts:
- Every listed input ends in exactly one place: its clips (clips.parquet), a row of failures.parquet (with the
  `kind` a rerun acts on: `transient` is retried, `permanent` is kept), or a row of duplicates.parquet naming the
  byte-identical input whose clips it shares.
- The output never overlaps an input (refused with a ConfigError before any work), and ingest deletes only files
  it wrote: when the settings or the input change (`_work/settings.json` holds the hash of both, the input as
  every listed path, segment, split, manifest columns and content fingerprint), ingest's own files are removed
  and everything is redone; anything else in the folder stays.
- Written in order: settings.json, then per source a staged tar and its marker, then shards (each renamed into
  place once durable), then clips/failures/duplicates parquet files, then summary.json last.
"""
from __future__ import annotations

import json
import math
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd

from lawm.config import ConfigError, from_dict, require, to_dict
from lawm.data.video import VideoError
from lawm import provenance, storage
from lawm.files import atomic_write_json, atomic_write_parquet, read_json_object, sweep_temporaries
from pipelines.clipper import failure_row, process_source, resume_row
from pipelines.progress import progress_bar
from pipelines.shards import list_shards, pack, packed_sources
from pipelines.sources import VIDEO_EXTENSIONS, Source, check_split, discover, fetch_source, fingerprint, source_id

# Settings that change how long ingest waits or where it runs, never what it writes: not part of the hash.
_RUN_ONLY = ("input", "cpus_per_task", "timeout_s", "timeout_per_mib_s", "stall_timeout_s", "probe_timeout_s")
FAILURE_COLUMNS = ["path", "sid", "stage", "error", "kind", "message"]
DUPLICATE_COLUMNS = ["path", "start", "end", "sid", "duplicate_of"]


@dataclass(kw_only=True)
class IngestConfig:
    input: str = ""  # a folder or a manifest; empty = the output of the stage before (see jobs/stages.py)
    clip_frames: int = 16  # the paper: 16 frames at 4 fps
    fps: float = 4.0
    stride: int = 16  # output frames between clip starts; < clip_frames overlaps clips
    size: int = 256  # short side scaled to it, then a centre crop of size x size
    codec: str = "libx264"  # clips are encoded in-process (lawm.data.video.encode_clip: measured trade-offs there)
    crf: int = 18
    preset: str = "ultrafast"  # x264 preset: ultrafast 15 ms / 165 KiB per 16 x 256 px clip, veryfast 50 ms / 137 KiB
    shard_mb: float = 256.0
    min_shards: int = 1  # per split, when enough sources exist: one per data-parallel worker
    val_fraction: float = 0.05
    max_clips_per_video: Optional[int] = None
    cpus_per_task: float = 1.0
    ffmpeg_threads: int = 1  # threads of one decode; parallelism comes from Ray tasks
    # A decode is killed after timeout_s + timeout_per_mib_s x the file's size in MiB (the bytes on disk, not the
    # duration the file declares), or as soon as no frame has come for stall_timeout_s.
    timeout_s: float = 120.0
    timeout_per_mib_s: float = 10.0
    stall_timeout_s: float = 60.0
    probe_timeout_s: float = 30.0  # the PyAV probe child is killed after this
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
        require(self.timeout_per_mib_s >= 0, "timeout_per_mib_s", "must not be negative")
        require(self.stall_timeout_s > 0, "stall_timeout_s", "must be positive")
        require(self.probe_timeout_s > 0, "probe_timeout_s", "must be positive")


def _ray_process(row: dict, cfg_dict: dict, work: str, run_id: str) -> dict:
    cfg = from_dict(IngestConfig, cfg_dict)
    src = Source(**json.loads(row["source"]))
    return {"result": json.dumps(process_source(src, cfg, Path(work), fp=row["fp"], run_id=run_id), default=str)}


def _inspect(items: list[dict]) -> list[dict]:
    """Per listed source: {"fp": content fingerprint}, or a failure row (bad split, not a regular file, unreadable)."""
    out = []
    for item in items:
        src = Source(**item)
        try:
            check_split(src.split)
            fetch_source(src.path)
            out.append({"fp": fingerprint(src.path)})
        except (VideoError, OSError) as err:
            out.append(failure_row(src, None, "list", err))
    return out


class _Progress:
    """A bar on a terminal, a line every `every` seconds otherwise: videos, clips, frames/s."""

    def __init__(self, total: int, every: float = 10.0):
        self.t0 = time.perf_counter()
        self.clips = self.frames = 0
        self.bar = progress_bar(total, unit="video", desc="ingest", every=every)

    def update(self, row: dict) -> None:
        self.clips += len(row.get("clips", []))
        self.frames += row.get("frames_out", 0)
        rate = self.frames / max(time.perf_counter() - self.t0, 1e-6)
        self.bar.set_postfix(clips=self.clips, fps=f"{rate:.0f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _inspect_all(sources: list[Source], cfg: IngestConfig) -> list[dict]:
    """Fingerprint every listed source with Ray tasks (at most 64, so reading is spread over the cluster)."""
    import ray

    from pipelines.ray_env import ensure_ray

    ensure_ray()
    task = ray.remote(num_cpus=cfg.cpus_per_task)(_inspect)
    per = math.ceil(len(sources) / 64)
    chunks = [[s.to_dict() for s in sources[i:i + per]] for i in range(0, len(sources), per)]
    return [r for part in ray.get([task.remote(c) for c in chunks]) for r in part]


def _run_sources(todo: list[tuple[Source, str]], cfg: IngestConfig, work: Path, progress: bool) -> list[dict]:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours below says more
    # Ray Data reserves resources per operator and, with it, started the second video's task 1 s after the first
    # and handed finished rows over ~1 s late (measured: four 3-s tasks on 2 CPUs took 7.25 s, 6.07 s without).
    # A single map of small rows needs no reservation. Set for this dataset only (a dataset copies the context
    # when it is made): the context is process-wide, and encode's actor pipeline keeps its reservation.
    reserved = ctx.op_resource_reservation_enabled
    ctx.op_resource_reservation_enabled = False
    try:
        items = [{"source": json.dumps(s.to_dict(), default=str), "fp": fp} for s, fp in todo]
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        # Ray Data retries a task whose worker died, without limit; process_source ends that for a source that
        # kills its worker (CRASH_LIMIT deaths in this run, counted under run_id) by recording it instead.
        ds = ds.map(_ray_process, fn_kwargs={"cfg_dict": to_dict(cfg), "work": str(work), "run_id": uuid.uuid4().hex},
                    num_cpus=cfg.cpus_per_task)
    finally:
        ctx.op_resource_reservation_enabled = reserved
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


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _refuse_overlap(input_path: str, sources: list[Source], output: Path) -> None:
    """ConfigError when the output is, contains or lies inside an input: ingest must never write into (or clear)
    the videos it reads."""
    out, inp = output.resolve(), Path(input_path).resolve()
    if _inside(out, inp) or _inside(inp, out):
        raise ConfigError(f"ingest: the output {output} overlaps the input {input_path}; pick an output folder "
                          "outside the input")
    for src in sources:
        for p in (Path(src.path).absolute(), Path(src.path).resolve()):
            if _inside(p, out):
                raise ConfigError(f"ingest: the input {src.path} lies inside the output folder {output}; pick an "
                                  "output folder that holds no input")


# What ingest writes, folder → file patterns (shards: list_shards); nothing else in the output is ever deleted.
_OWNED = {".": ("clips.parquet", "failures.parquet", "duplicates.parquet", "summary.json", ".*.tmp"),
          "shards": (".*.tmp",), "_work": ("settings.json", ".*.tmp"), "_work/done": ("*.json", ".*.tmp"),
          "_work/failed": ("*.json", ".*.tmp"), "_work/attempts": ("*.json", ".*.tmp"),
          "_work/staging": ("*.tar", ".*.tmp")}


def _clear_outputs(output: Path) -> None:
    """Delete the files ingest wrote under `output` (made with other settings or from another input)."""
    for sub, patterns in sorted(_OWNED.items(), key=lambda kv: -kv[0].count("/")):  # deepest folders first
        folder = output / sub
        if not folder.is_dir():
            continue
        owned = [p for pattern in patterns for p in folder.glob(pattern)]
        for path in owned + (list_shards(folder) if sub == "shards" else []):
            if path.is_file() or path.is_symlink():
                storage.remove(path)
        if sub != "." and not any(folder.iterdir()):
            folder.rmdir()


def _input_identity(sources: list[Source], inspected: list[dict]) -> list:
    """What the input is, for the reuse decision: each listing with its content (or why it has none)."""
    return [[s.path, s.start, s.end, s.split, s.meta, r.get("fp") or r.get("error")]
            for s, r in zip(sources, inspected)]


def run_ingest(cfg: IngestConfig, output: str | Path, progress: bool = True) -> dict:
    """Run ingest over `cfg.input` into `output`. Returns the summary (also written to summary.json).

    Raises ConfigError for an unusable input or an output that overlaps it, and RuntimeError when not a single
    input gave a clip.
    """
    output = Path(output)
    sources = discover(cfg.input, tuple(cfg.extensions))
    if not sources:
        raise ConfigError(f"ingest.input: no video files found in {cfg.input}")
    _refuse_overlap(cfg.input, sources, output)
    t0 = time.perf_counter()
    inspected = _inspect_all(sources, cfg)

    work = output / "_work"
    settings = work / "settings.json"
    identity = provenance.digest({k: v for k, v in to_dict(cfg).items() if k not in _RUN_ONLY},
                                 _input_identity(sources, inspected))
    if not provenance.matches(settings, identity):
        _clear_outputs(output)  # clips cut with other settings or from another input must not mix with these
    provenance.record(settings, identity, config=to_dict(cfg), inputs=len(sources))
    sweep_temporaries(work)  # what workers of a killed run were writing

    # One source per distinct content (and segment): the first listing of it; later ones are duplicates.
    rows = [r for r in inspected if "fp" not in r]
    canonical: dict[str, Source] = {}
    duplicates = []
    for src, r in zip(sources, inspected):
        if "fp" not in r:
            continue
        sid = source_id(src, r["fp"])
        if sid in canonical:
            duplicates.append({"path": src.path, "start": src.start, "end": src.end, "sid": sid,
                               "duplicate_of": canonical[sid].path})
        else:
            canonical[sid] = src
    shard_dir = output / "shards"
    packed = packed_sources(shard_dir) if shard_dir.is_dir() else {}
    todo = []
    for src, r in zip(sources, inspected):
        if "fp" in r and canonical.get(source_id(src, r["fp"])) is src:
            done = resume_row(work, source_id(src, r["fp"]), set(packed))
            if done:
                rows.append(done)
            else:
                todo.append((src, r["fp"]))
    rows += _run_sources(todo, cfg, work, progress) if todo else []
    sweep_temporaries(work)  # what a worker that died in this run was writing
    wall = time.perf_counter() - t0

    ok = {r["sid"]: r for r in rows if r["status"] == "ok"}
    pending = [(r["clips"][0]["split"], sid, work / "staging" / f"{sid}.tar")
               for sid, r in ok.items() if sid not in packed]
    for _, _, staged in pending:
        storage.pull(staged)  # staged by a task, maybe on another node
    packed.update(pack(pending, shard_dir, target_bytes=int(cfg.shard_mb * 2**20), min_shards=cfg.min_shards))
    for sid in ok:
        storage.remove(work / "staging" / f"{sid}.tar")  # its clips live in a shard (maybe already did)

    clip_rows = [{**c, "shard": packed.get(sid)} for sid, r in ok.items() for c in r["clips"]]
    clips = pd.DataFrame(clip_rows).sort_values("key") if clip_rows else pd.DataFrame(columns=["key", "shard", "split"])
    failures = pd.DataFrame([{k: r.get(k) for k in FAILURE_COLUMNS} for r in rows if r["status"] != "ok"],
                            columns=FAILURE_COLUMNS)
    dup_table = pd.DataFrame(duplicates, columns=DUPLICATE_COLUMNS)
    atomic_write_parquet(output / "clips.parquet", clips)
    atomic_write_parquet(output / "failures.parquet", failures)
    atomic_write_parquet(output / "duplicates.parquet", dup_table)
    seconds_in = sum(r["seconds_in"] for r in ok.values())
    frames_out = sum(r["frames_out"] for r in ok.values())
    summary = {
        "inputs": len(sources), "sources_ok": len(ok), "sources_failed": len(failures),
        "resumed": sum(bool(r.get("resumed")) for r in rows), "clips": len(clips),
        "duplicate_inputs": len(dup_table),  # byte-identical to an earlier listing: see duplicates.parquet
        "clips_per_split": clips["split"].value_counts().to_dict() if len(clips) else {},
        "shards": [p.name for p in list_shards(shard_dir)] if shard_dir.is_dir() else [],
        "hours_in": seconds_in / 3600, "hours_out": len(clips) * cfg.clip_frames / cfg.fps / 3600,
        "wall_seconds": wall, "frames_out_per_s": frames_out / wall if wall else 0.0,
        "failures_by_error": failures["error"].value_counts().to_dict() if len(failures) else {},
        "failures_by_kind": failures["kind"].value_counts().to_dict() if len(failures) else {},
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

    return run_cli(argv, prog="python -m pipelines.ingest", doc=__doc__, config_cls=IngestConfig, section="ingest",
                   input_help="a folder of videos or a CSV/parquet/JSONL manifest", run=run,
                   show=("inputs", "sources_ok", "sources_failed", "clips", "hours_in"),
                   wrote=lambda summary, out: out)


if __name__ == "__main__":
    # Re-import under the package name: Ray pickles functions of `__main__` by value, without their module.
    from pipelines.ingest import main as package_main

    sys.exit(package_main())
