"""One source video → clips, staged on disk. Runs inside a Ray Data task; never raises for bad input.

A source ends in exactly one of `done/<sid>.json` (its clips, staged in `staging/<sid>.tar`) or
`failed/<sid>.json` (stage reached, error, kind, message). Markers are written durably (temporary file, fsync,
rename, fsync of the folder); the staged tar is fsynced and renamed into place before its `done` marker is
written. A source with a `done` marker whose tar exists (or was packed) is not decoded again, nor one with a
`permanent` failure; a `transient` failure (disk full, out of memory, timeout, a killed process) is retried. A
marker that is empty or unreadable (a power cut) counts as absent: the source is redone. No temporary file
survives a failure: the staging tar is removed when cutting fails, and `sweep_temporaries` removes what a
killed process left.

`attempts/<sid>.json` counts starts on a source within one run (`run_id`): a source whose worker died
`CRASH_LIMIT` times in this run (killed, or crashed in-process) is recorded as `worker_died` instead of being
started again, so Ray's task retries end and the run goes on.

With an object-store root (lawm/storage.py) a task pulls its source first and pushes the staged tar, then the
`done` marker (or the `failed` one); `attempts/` stays on the node (a retry elsewhere starts its count again).
"""
from __future__ import annotations

import errno
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
from lawm import storage
from lawm.files import atomic_file, atomic_write_json, read_json_object
from pipelines.shards import add_member
from pipelines.sources import Source, check_split, fetch_source, fingerprint, labels_sidecar, source_id, split_of

CRASH_LIMIT = 2  # worker deaths on one source in one run before it is recorded instead of started again


def classify(err: BaseException) -> tuple[str, str, str]:
    """(error, kind, message) of an exception: VideoError knows its kind; out of memory, any OSError (disk full,
    quota, I/O error, permissions) and unexpected exceptions (a bug that a fix resolves) are transient."""
    if isinstance(err, VideoError):
        return err.reason, err.kind, err.message
    if isinstance(err, MemoryError):
        return "out_of_memory", "transient", str(err)[:500] or "MemoryError"
    if isinstance(err, OSError) and err.errno is not None:
        return errno.errorcode.get(err.errno, "OSError"), "transient", str(err)[:500]
    return err.__class__.__name__, "transient", str(err)[:500]


def resume_row(work: Path, sid: str, packed: frozenset[str] | set[str] = frozenset()) -> dict | None:
    """The finished result of `sid` from an earlier attempt, or None when it must be (re)done."""
    done = read_json_object(work / "done" / f"{sid}.json")
    if done and done.get("status") == "ok" and done.get("clips") and (
            sid in packed or (work / "staging" / f"{sid}.tar").exists()):
        return {**done, "resumed": True}
    failed = read_json_object(work / "failed" / f"{sid}.json")
    if failed and failed.get("status") == "failed" and failed.get("kind") == "permanent":
        return {**failed, "resumed": True}
    return None


def failure_row(src: Source, sid: str | None, stage: str, err: BaseException) -> dict:
    error, kind, message = classify(err)
    return {"sid": sid, "path": src.path, "status": "failed", "stage": stage, "error": error, "kind": kind,
            "message": message or error}


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


def process_source(src: Source, cfg, work: Path, *, fp: str | None = None, run_id: str = "") -> dict:
    """Cut one source into clips. Returns a summary row; the clips themselves stay on disk.

    `fp` is the source's fingerprint when the caller has it; `run_id` names the current run for the crash count.
    """
    try:
        check_split(src.split)
        fetch_source(src.path)
        fp = fp or fingerprint(src.path)
    except (VideoError, OSError) as err:
        return failure_row(src, None, "list", err)
    sid = source_id(src, fp)
    resumed = resume_row(work, sid)
    if resumed:
        return resumed
    failed = work / "failed" / f"{sid}.json"
    attempts = work / "attempts" / f"{sid}.json"
    previous = read_json_object(attempts) or {}
    starts = previous.get("starts", 0) if previous.get("run") == run_id else 0
    if starts >= CRASH_LIMIT:
        row = failure_row(src, sid, "worker", VideoError(
            "worker_died", f"the process working on this source died {starts} times in this run (killed, out of "
                           "memory, or crashed); not started again in this run", stage="worker"))
        _record(failed, row)
        attempts.unlink(missing_ok=True)
        return row
    try:
        atomic_write_json(attempts, {"run": run_id, "starts": starts + 1})
    except OSError as err:  # the disk is full: nothing can be staged either
        return failure_row(src, sid, "worker", err)
    try:
        row = _process(src, cfg, work, sid, fp)
    finally:
        attempts.unlink(missing_ok=True)  # reached only when this process lives on
    return row


def _process(src: Source, cfg, work: Path, sid: str, fp: str) -> dict:
    done, failed = work / "done" / f"{sid}.json", work / "failed" / f"{sid}.json"
    t0 = time.perf_counter()
    stage = "probe"
    try:
        size_mib = os.stat(src.path).st_size / 2**20
        info = probe(src.path, timeout=cfg.probe_timeout_s)
        seg_start = max(src.start or 0.0, 0.0)
        seg_end = min(src.end if src.end is not None else info.duration, info.duration or float("inf"))
        if (seg_end - seg_start) * cfg.fps < cfg.clip_frames - 0.5:
            raise VideoError("too_short", f"{seg_end - seg_start:.2f}s at {cfg.fps} fps gives fewer than "
                                          f"{cfg.clip_frames} frames")
        stage = "decode"
        sidecar = labels_sidecar(src.path)
        labels = _Labels(sidecar) if sidecar else None
        split = src.split or split_of(sid, cfg.val_fraction)
        # bounded by the bytes on disk, never by the duration the file declares (a header can lie)
        timeout = cfg.timeout_s + cfg.timeout_per_mib_s * size_mib
        clips, frames_out = _cut(src, cfg, work, sid=sid, fp=fp, split=split, info=info, seg_start=seg_start,
                                 labels=labels, timeout=timeout)
        if not clips:
            raise VideoError("too_short", f"decoded {frames_out} frames, fewer than one clip", stage="decode")
        row = {"sid": sid, "path": src.path, "status": "ok", "clips": clips, "frames_out": frames_out,
               "seconds_in": seg_end - seg_start, "seconds": time.perf_counter() - t0}
        storage.push(work / "staging" / f"{sid}.tar")  # an object-store root: before the marker that names it
        atomic_write_json(done, row)
        storage.push(done)
        storage.remove(failed)  # a transient failure of an earlier run, now redone
        return row
    except VideoError as err:  # a bad file, or a child process that died or hung: recorded
        row = failure_row(src, sid, err.stage if stage == "probe" else stage, err)
    except Exception as err:  # noqa: BLE001 - a full disk, no memory, a bug: recorded, never losing the run
        row = failure_row(src, sid, stage, err)
    _record(failed, row)
    return row


def _record(marker: Path, row: dict) -> None:
    try:
        atomic_write_json(marker, row)
        storage.push(marker)
    except OSError:
        pass  # the disk is full (or the store unreachable): the row still reaches failures.parquet, and no marker
        #       means a rerun retries


def _cut(src: Source, cfg, work: Path, *, sid: str, fp: str, split: str, info, seg_start: float,
         labels: _Labels | None, timeout: float) -> tuple[list[dict], int]:
    staging = work / "staging" / f"{sid}.tar"
    clips: list[dict] = []
    with atomic_file(staging) as raw, tarfile.open(fileobj=raw, mode="w") as tar:  # a failure leaves no partial tar
        frames_seen = _stream_clips(src, cfg, tar, sid=sid, fp=fp, split=split, info=info,
                                    seg_start=seg_start, labels=labels, timeout=timeout, clips=clips)
    return clips, frames_seen


def _stream_clips(src: Source, cfg, tar: tarfile.TarFile, *, sid: str, fp: str, split: str, info,
                  seg_start: float, labels: _Labels | None, timeout: float, clips: list[dict]) -> int:
    """Decode, cut and encode; finished clips go into `tar` and `clips` in order. Returns the frames decoded."""
    window: deque[np.ndarray] = deque(maxlen=cfg.clip_frames)
    pending: deque[tuple[dict, Future, bytes | None]] = deque()
    j = -1

    def write_done(keep: int) -> None:
        """Write finished clips in order, leaving at most `keep` encodes in flight."""
        while pending and (len(pending) > keep or pending[0][1].done()):
            meta, future, label_bytes = pending.popleft()
            add_member(tar, f"{meta['key']}.mp4", future.result())
            add_member(tar, f"{meta['key']}.json", json.dumps(meta, default=str).encode())
            if label_bytes is not None:
                add_member(tar, f"{meta['key']}.labels.npz", label_bytes)
            clips.append(meta)

    # Clips are encoded on a helper thread (the encoder is a subprocess): the decoder keeps streaming meanwhile
    # instead of stalling on a full pipe while each clip's ffmpeg starts and runs.
    with ThreadPoolExecutor(max_workers=1) as encoder:
        frames = stream_frames(src.path, fps=cfg.fps, size=cfg.size, start=src.start, end=src.end, timeout=timeout,
                               stall_timeout=cfg.stall_timeout_s, threads=cfg.ffmpeg_threads)
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
            future = encoder.submit(encode_clip, np.stack(window), fps=cfg.fps, codec=cfg.codec, crf=cfg.crf,
                                    preset=cfg.preset)
            pending.append((meta, future, labels.at(times) if labels is not None else None))
            write_done(keep=2)
            made += 1
            if cfg.max_clips_per_video and made >= cfg.max_clips_per_video:
                frames.close()  # stops ffmpeg early
                break
        write_done(keep=0)
    return j + 1
