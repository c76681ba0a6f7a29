"""One source video → clips, staged on disk. Runs inside a Ray Data task; never raises for bad input.

A source ends in exactly one of `done/<sid>.json` (its clips, staged in `staging/<sid>.tar`) or
`failed/<sid>.json` (stage reached, error class, message). Both are written atomically, and a source
with either file is not decoded again: that is what makes a killed run resumable.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lawm.data.video import VideoError, encode_clip, probe, stream_frames
from pipelines.sources import Source, fingerprint, labels_sidecar, source_id, split_of


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, default=str).encode())


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic bytes for the same clips
    tar.addfile(info, io.BytesIO(data))


class _Labels:
    """Per-frame sidecar arrays, sampled at the clip's frame times (nearest source frame)."""

    def __init__(self, path: Path):
        with np.load(path, allow_pickle=False) as npz:
            self.t = np.asarray(npz["t"], np.float64)
            self.arrays = {k: np.asarray(npz[k]) for k in npz.files if k != "t"}

    def at(self, times: np.ndarray) -> bytes:
        idx = np.clip(np.searchsorted(self.t, times - 1e-6), 0, len(self.t) - 1)
        prev = np.clip(idx - 1, 0, len(self.t) - 1)
        idx = np.where(np.abs(self.t[prev] - times) < np.abs(self.t[idx] - times), prev, idx)
        buf = io.BytesIO()
        np.savez(buf, t=times, **{k: v[idx] for k, v in self.arrays.items()})
        return buf.getvalue()


def process_source(src: Source, cfg, work: Path) -> dict:
    """Cut one source into clips. Returns a summary row; the clips themselves stay on disk."""
    fp = fingerprint(src.path)
    sid = source_id(src, fp)
    done, failed = work / "done" / f"{sid}.json", work / "failed" / f"{sid}.json"
    for marker in (done, failed):
        if marker.exists():
            return {**json.loads(marker.read_text()), "resumed": True}
    t0 = time.perf_counter()
    stage = "probe"
    try:
        info = probe(src.path)
        seg_start = max(src.start or 0.0, 0.0)
        seg_end = min(src.end if src.end is not None else info.duration, info.duration or float("inf"))
        if (seg_end - seg_start) * cfg.fps < cfg.clip_frames - 0.5:
            raise VideoError("too_short", f"{seg_end - seg_start:.2f}s at {cfg.fps} fps gives fewer than "
                                          f"{cfg.clip_frames} frames")
        stage = "decode"
        sidecar = labels_sidecar(src.path)
        labels = _Labels(sidecar) if sidecar else None
        split = src.split or split_of(sid, cfg.val_fraction)
        timeout = cfg.timeout_s + cfg.timeout_per_source_s * (seg_end - seg_start)
        clips, frames_out = _cut(src, cfg, work, sid, fp, split, info, seg_start, seg_end, labels, timeout)
        if not clips:
            raise VideoError("too_short", f"decoded {frames_out} frames, fewer than one clip", stage="decode")
        row = {"sid": sid, "path": src.path, "status": "ok", "clips": clips, "frames_out": frames_out,
               "seconds_in": seg_end - seg_start, "seconds": time.perf_counter() - t0}
        atomic_write_json(done, row)
        return row
    except VideoError as err:
        row = {"sid": sid, "path": src.path, "status": "failed", "stage": err.stage if stage == "probe" else stage,
               "error": err.reason, "message": err.message}
    except Exception as err:  # a bug or an exotic file: record it, never lose the run
        row = {"sid": sid, "path": src.path, "status": "failed", "stage": stage,
               "error": err.__class__.__name__, "message": str(err)[:500]}
    atomic_write_json(failed, row)
    return row


def _cut(src: Source, cfg, work: Path, sid: str, fp: str, split: str, info, seg_start: float, seg_end: float,
         labels: _Labels | None, timeout: float) -> tuple[list[dict], int]:
    staging = work / "staging" / f"{sid}.tar"
    staging.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging.with_name(f".{staging.name}.{os.getpid()}.tmp")
    window: deque[np.ndarray] = deque(maxlen=cfg.clip_frames)
    clips: list[dict] = []
    pending: deque[tuple[dict, Future, bytes | None]] = deque()
    j = -1

    def write_done(tar: tarfile.TarFile, keep: int) -> None:
        """Write finished clips in order, leaving at most `keep` encodes in flight."""
        while pending and (len(pending) > keep or pending[0][1].done()):
            meta, future, label_bytes = pending.popleft()
            _add_member(tar, f"{meta['key']}.mp4", future.result())
            _add_member(tar, f"{meta['key']}.json", json.dumps(meta, default=str).encode())
            if label_bytes is not None:
                _add_member(tar, f"{meta['key']}.labels.npz", label_bytes)
            clips.append(meta)

    # Clips are encoded on a helper thread (the encoder is a subprocess): the decoder keeps streaming meanwhile
    # instead of stalling on a full pipe while each clip's ffmpeg starts and runs.
    with tarfile.open(tmp, "w") as tar, ThreadPoolExecutor(max_workers=1) as encoder:
        frames = stream_frames(src.path, cfg.fps, cfg.size, src.start, src.end, timeout=timeout,
                               threads=cfg.ffmpeg_threads)
        made = 0
        for j, frame in enumerate(frames):
            window.append(frame)
            first = j - cfg.clip_frames + 1
            if first < 0 or first % cfg.stride:
                continue
            index = first // cfg.stride
            key = f"{sid}_{index:06d}"
            times = seg_start + (first + np.arange(cfg.clip_frames)) / cfg.fps
            meta = {"key": key, "source_path": src.path, "source_fingerprint": fp, "sid": sid,
                    "clip_index": index, "start": float(times[0]), "end": float(times[-1] + 1 / cfg.fps),
                    "fps": cfg.fps, "frames": cfg.clip_frames, "width": cfg.size, "height": cfg.size,
                    "split": split, "source_codec": info.codec, "source_rotation": info.rotation,
                    "has_labels": labels is not None, **{f"meta_{k}": v for k, v in src.meta.items()}}
            future = encoder.submit(encode_clip, np.stack(window), cfg.fps, cfg.codec, cfg.crf, cfg.preset)
            pending.append((meta, future, labels.at(times) if labels is not None else None))
            write_done(tar, keep=2)
            made += 1
            if cfg.max_clips_per_video and made >= cfg.max_clips_per_video:
                frames.close()  # stops ffmpeg early
                break
        write_done(tar, keep=0)
    os.replace(tmp, staging)
    return clips, j + 1
