"""Ingest on real ffmpeg-made videos, hostile ones included, through local Ray."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ffmpeg, make_video
from lawm.config import ConfigError, from_dict
from lawm.data.clips import clip_dataset, collate
from lawm.data.video import VideoError, ffmpeg_exe, probe, stream_frames
from pipelines.clipper import classify, process_source
from pipelines.ingest import IngestConfig, run_ingest
from pipelines.shards import list_shards, shard_keys
from pipelines.sources import Source, fingerprint

ODD_NAME = "-dash start ;$(touch PWNED) 'q' \"dq\" ünï.cöde.mp4"
CFG = dict(clip_frames=8, fps=4.0, stride=8, size=32, shard_mb=0.02, val_fraction=0.3, timeout_s=60.0)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("videos")
    good = make_video(d / "good.mp4", seconds=6)
    make_video(d / "sub dir" / ODD_NAME, seconds=5)
    make_video(d / "a.b.c.mp4", seconds=4, source="mandelbrot")
    (d / "empty.mp4").write_bytes(b"")
    (d / "notvideo.mp4").write_text("this is a text file, not a video\n")
    data = good.read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440", "-t", "3", "-c:a", "aac", str(d / "audio_only.mp4"))
    make_video(d / "one_frame.mp4", seconds=1, extra=("-frames:v", "1"))
    make_video(d / "short.mp4", seconds=1)
    # variable frame rate: drop irregular frames and keep their timestamps
    make_video(d / "vfr.mkv", seconds=6, fps=20, extra=("-vf", "select='not(eq(mod(n,5),1)*lt(mod(n,7),3))'",
                                                          "-fps_mode", "vfr"))
    make_video(d / "tenbit.mkv", seconds=4, extra=("-pix_fmt", "yuv420p10le"))
    ffmpeg("-display_rotation", "90", "-i", str(good), "-c", "copy", str(d / "rotated.mp4"))
    return d


EXPECTED_FAILURES = {"empty.mp4": "empty", "notvideo.mp4": "not_a_video", "truncated.mp4": "truncated",
                     "audio_only.mp4": "no_video_stream", "one_frame.mp4": "too_short", "short.mp4": "too_short"}
EXPECTED_OK = {"good.mp4", ODD_NAME, "a.b.c.mp4", "vfr.mkv", "tenbit.mkv", "rotated.mp4"}


@pytest.fixture(scope="module")
def ingested(hostile, tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("ingest")
    cfg = from_dict(IngestConfig, {**CFG, "input": str(hostile)})
    summary = run_ingest(cfg, out, progress=False)
    return cfg, out, summary


def test_every_input_ends_in_clips_or_failures(ingested, hostile):
    _, out, summary = ingested
    clips = pd.read_parquet(out / "clips.parquet")
    failures = pd.read_parquet(out / "failures.parquet")
    failed = {Path(p).name: e for p, e in zip(failures["path"], failures["error"])}
    assert failed == EXPECTED_FAILURES
    assert set(failures["kind"]) == {"permanent"}  # the files' own faults: a rerun keeps them
    assert {Path(p).name for p in clips["source_path"]} == EXPECTED_OK
    assert summary["inputs"] == len(EXPECTED_OK) + len(EXPECTED_FAILURES)
    assert not (hostile / "sub dir" / "PWNED").exists() and not Path("PWNED").exists()
    assert all(failures["message"].str.len() > 0)


def test_clips_are_exact_and_keys_are_clean(ingested):
    cfg, out, _ = ingested
    clips = pd.read_parquet(out / "clips.parquet")
    assert clips["key"].is_unique and not clips["key"].str.contains(r"\.").any()
    shard_contents = [k for shard in list_shards(out / "shards") for k in shard_keys(shard)]
    assert sorted(shard_contents) == sorted(clips["key"]), "shards and clips.parquet disagree"
    assert len(list_shards(out / "shards")) >= 2, "shard_mb should have cut several shards"
    # the split is decided per source video, never per clip
    assert clips.groupby("sid")["split"].nunique().max() == 1
    rotated = clips[clips["source_path"].str.endswith("rotated.mp4")]
    assert set(rotated["source_rotation"]) == {90}
    ds = clip_dataset(out / "shards", split=None, shuffle=0)
    for sample in ds:
        assert sample["frames"].shape == (cfg.clip_frames, 3, cfg.size, cfg.size)
        assert sample["frames"].dtype == torch.float32 and 0 <= sample["frames"].min() <= sample["frames"].max() <= 1


def test_rotation_is_applied(ingested):
    """A 96x64 video flagged as rotated 90 degrees is displayed portrait: its first clip differs from the
    unrotated source's, and matches the source turned by 90 degrees (up to codec noise)."""
    _, out, _ = ingested
    samples = {s["meta"]["source_path"].rsplit("/", 1)[-1]: s for s in clip_dataset(out / "shards", split=None, shuffle=0)
               if s["meta"]["clip_index"] == 0}
    plain, rot = samples["good.mp4"]["frames"][0], samples["rotated.mp4"]["frames"][0]
    turned = [torch.rot90(plain, k, dims=(1, 2)) for k in (1, 3)]
    best = min((rot - t).abs().mean().item() for t in turned)
    assert (rot - plain).abs().mean().item() > 2 * best


def test_rerun_over_finished_output_decodes_nothing(ingested, hostile):
    cfg, out, _ = ingested
    before = {p.name: p.stat().st_mtime_ns for p in list_shards(out / "shards")}
    summary = run_ingest(cfg, out, progress=False)
    assert summary["resumed"] == summary["inputs"]
    assert {p.name: p.stat().st_mtime_ns for p in list_shards(out / "shards")} == before


def test_loader_splits_across_workers_without_overlap(ingested):
    _, out, _ = ingested
    every = sorted(s["key"] for s in clip_dataset(out / "shards", split=None, shuffle=0))
    loader = torch.utils.data.DataLoader(clip_dataset(out / "shards", split=None, shuffle=8), batch_size=2,
                                         num_workers=2, collate_fn=collate)
    seen = [k for batch in loader for k in batch["key"]]
    assert sorted(seen) == every  # each clip exactly once across both workers
    ranks = [[s["key"] for s in clip_dataset(out / "shards", split=None, shuffle=0, rank=r, world_size=3)]
             for r in range(3)]
    assert sorted(k for r in ranks for k in r) == every and all(ranks)


def test_sigkill_then_resume_gives_the_same_keys(tmp_path, ray_local):
    videos = tmp_path / "many"
    for i in range(16):
        make_video(videos / f"v{i}.mp4", seconds=10, size="64x48", source="testsrc2" if i % 2 else "mandelbrot")
    overrides = [f"{k}={v}" for k, v in CFG.items()]
    cmd = [sys.executable, "-m", "pipelines.ingest", "--input", str(videos), "--quiet", *overrides]
    killed = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, killed with it
    proc = subprocess.Popen([*cmd, "--output", str(killed)], start_new_session=True, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((killed / "_work" / "done").glob("*.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    assert subprocess.run([*cmd, "--output", str(killed)], capture_output=True, timeout=300, env=env).returncode == 0
    clean = tmp_path / "clean"
    cfg = from_dict(IngestConfig, {**CFG, "input": str(videos)})
    run_ingest(cfg, clean, progress=False)
    keys_killed = [k for s in list_shards(killed / "shards") for k in shard_keys(s)]
    keys_clean = [k for s in list_shards(clean / "shards") for k in shard_keys(s)]
    assert len(keys_killed) == len(set(keys_killed)), "duplicates after resume"
    assert sorted(keys_killed) == sorted(keys_clean)


def test_hung_ffmpeg_is_killed_and_recorded(tmp_path, monkeypatch):
    video = make_video(tmp_path / "ok.mp4", seconds=4)
    fake = tmp_path / "fake-ffmpeg"
    fake.write_text("#!/bin/sh\nsleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setenv("LAWM_FFMPEG", str(fake))
    cfg = from_dict(IngestConfig, {**CFG, "timeout_s": 1.0, "timeout_per_mib_s": 0.0})
    t0 = time.time()
    row = process_source(Source(str(video)), cfg, tmp_path / "work")
    assert time.time() - t0 < 20
    assert (row["status"], row["stage"], row["error"]) == ("failed", "decode", "timeout")


def test_manifest_segments_metadata_and_labels(tmp_path, ray_local):
    video = make_video(tmp_path / "clips" / "v.mp4", seconds=8, fps=8)
    t = np.arange(64) / 8.0
    np.savez(tmp_path / "clips" / "v.labels.npz", t=t, frame=np.arange(64, dtype=np.float32),
             action=np.stack([np.arange(64), -np.arange(64)], 1).astype(np.float32))
    make_video(tmp_path / "clips" / "w.mp4", seconds=8)
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"path": ["clips/v.mp4", str(tmp_path / "clips" / "w.mp4")], "start": [2.0, None],
                  "end": [6.0, None], "camera": ["cam-a", "cam-b"], "split": ["val", "train"]}).to_csv(manifest, index=False)
    cfg = from_dict(IngestConfig, {**CFG, "input": str(manifest), "stride": 4})
    import ray.data

    context = ray.data.DataContext.get_current()
    assert context.op_resource_reservation_enabled
    run_ingest(cfg, tmp_path / "out", progress=False)
    # ingest turns Ray Data's reservation off for its own dataset only, never for the process (encode keeps it)
    assert ray.data.DataContext.get_current() is context and context.op_resource_reservation_enabled
    clips = pd.read_parquet(tmp_path / "out" / "clips.parquet")
    v = clips[clips["source_path"] == str(video)].sort_values("clip_index")
    assert set(v["meta_camera"]) == {"cam-a"} and set(v["split"]) == {"val"}
    assert v["start"].min() == pytest.approx(2.0) and v["end"].max() <= 6.0 + 1e-6
    samples = [s for s in clip_dataset(tmp_path / "out" / "shards", split="val", shuffle=0)]
    assert samples and all(s["meta"]["has_labels"] for s in samples)
    for s in samples:
        expected = (s["meta"]["start"] + np.arange(cfg.clip_frames) / cfg.fps) * 8  # source frame at each clip time
        np.testing.assert_allclose(s["labels"]["frame"].numpy(), expected, atol=0.51)
        np.testing.assert_allclose(s["labels"]["action"][:, 1].numpy(), -s["labels"]["frame"].numpy())


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.ingest", *args], capture_output=True, text=True, timeout=300)


def test_cli_errors_name_the_problem(tmp_path, hostile):
    bad_key = _cli("--input", str(hostile), "--output", str(tmp_path / "o"), "fsp=3")
    assert bad_key.returncode == 2 and "ingest.fsp: unknown key" in bad_key.stderr
    bad_type = _cli("--input", str(hostile), "--output", str(tmp_path / "o"), "size=big")
    assert bad_type.returncode == 2 and "ingest.size: expected an integer" in bad_type.stderr
    missing = _cli("--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "x.mp4").write_text("nope")
    nothing = _cli("--input", str(only_bad), "--output", str(tmp_path / "o2"), "--quiet")
    assert nothing.returncode == 1 and "none of 1 inputs" in nothing.stderr
    failures = pd.read_parquet(tmp_path / "o2" / "failures.parquet")
    assert list(failures["error"]) == ["not_a_video"]
    assert json.loads((tmp_path / "o2" / "summary.json").read_text())["sources_failed"] == 1


# ---------------------------------------------------------------- data loss and bad input (issue 8)

def _ingest(inp: Path, out: Path, **overrides) -> dict:
    return run_ingest(from_dict(IngestConfig, {**CFG, "input": str(inp), **overrides}), out, progress=False)


def _shard_keys(out: Path) -> list[str]:
    return sorted(k for s in list_shards(out / "shards") for k in shard_keys(s))


def test_output_overlapping_an_input_is_refused_before_any_work(tmp_path):
    videos = tmp_path / "videos"
    make_video(videos / "a.mp4", seconds=3)
    manifest = tmp_path / "list.csv"
    pd.DataFrame({"path": [str(tmp_path / "out" / "b.mp4")]}).to_csv(manifest, index=False)
    make_video(tmp_path / "out" / "b.mp4", seconds=3)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for inp, out in [(videos, videos), (videos, tmp_path), (videos, videos / "out"), (manifest, tmp_path / "out"),
                     (manifest, tmp_path)]:
        with pytest.raises(ConfigError, match="overlaps the input|lies inside the output"):
            _ingest(inp, out)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written or deleted
    cli = _cli("--input", str(videos), "--output", str(tmp_path), "--quiet")
    assert cli.returncode == 2 and len(cli.stderr.strip().splitlines()) == 1 and "overlaps the input" in cli.stderr


def test_changed_settings_delete_only_what_ingest_wrote(tmp_path, ray_local):
    make_video(tmp_path / "videos" / "a.mp4", seconds=4)
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    mine = {out / "notes.txt": "keep me", out / "shards" / "mine.mp4": "mine", out / "shards" / "val-x.tar": "x",
            out / "_work" / "keep.txt": "mine too"}
    for path, text in mine.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    _ingest(tmp_path / "videos", out)
    _ingest(tmp_path / "videos", out, size=48)  # other settings: the clips of size 32 must go
    assert all(path.read_text() == text for path, text in mine.items())
    clips = pd.read_parquet(out / "clips.parquet")
    assert set(clips["width"]) == {48} and _shard_keys(out) == sorted(clips["key"])


def _limited_process(limit: int, video: str, work: str) -> dict:
    """process_source in a process whose files may not grow past `limit` bytes (EFBIG: the disk-full family)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return process_source(Source(video), from_dict(IngestConfig, CFG), Path(work))


def test_transient_failure_is_marked_cleaned_up_and_retried(tmp_path):
    video = make_video(tmp_path / "v.mp4", seconds=6)
    staged = process_source(Source(str(video)), from_dict(IngestConfig, CFG), tmp_path / "probe")
    tar_size = (tmp_path / "probe" / "staging" / f"{staged['sid']}.tar").stat().st_size
    work = tmp_path / "work"
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        row = pool.submit(_limited_process, tar_size - 1, str(video), str(work)).result(timeout=300)
    assert (row["status"], row["kind"]) == ("failed", "transient"), row
    assert not [p for p in work.rglob("*") if p.name.endswith(".tmp")], "a temporary file survived the failure"
    assert not (work / "staging" / f"{row['sid']}.tar").exists()
    again = process_source(Source(str(video)), from_dict(IngestConfig, CFG), work)  # the disk has room again
    assert again["status"] == "ok" and not again.get("resumed") and len(again["clips"]) == len(staged["clips"])
    assert not (work / "failed" / f"{row['sid']}.json").exists()
    with pytest.raises(OSError) as disk_full, open("/dev/full", "wb", buffering=0) as full:
        full.write(b"x")  # a real ENOSPC from the kernel
    assert classify(disk_full.value) == ("ENOSPC", "transient", str(disk_full.value))
    assert classify(MemoryError())[:2] == ("out_of_memory", "transient")
    assert classify(VideoError("not_a_video", "text"))[1] == "permanent"


def test_empty_or_corrupt_markers_mean_redo(tmp_path, ray_local):
    videos = tmp_path / "videos"
    make_video(videos / "a.mp4", seconds=4)
    make_video(videos / "b.mp4", seconds=4, source="mandelbrot")
    (videos / "bad.mp4").write_text("not a video")
    out = tmp_path / "out"
    _ingest(videos, out)
    keys = _shard_keys(out)
    done = sorted((out / "_work" / "done").glob("*.json"))
    done[0].write_bytes(b"")  # a power cut after the rename, before the data reached the disk
    next((out / "_work" / "failed").glob("*.json")).write_bytes(b'{"sid": "trunc')
    summary = _ingest(videos, out)
    assert summary["resumed"] == 1  # only the intact marker is trusted
    assert _shard_keys(out) == keys == sorted(pd.read_parquet(out / "clips.parquet")["key"])
    assert list(pd.read_parquet(out / "failures.parquet")["error"]) == ["not_a_video"]
    assert not list((out / "_work" / "staging").glob("*"))
    shard = list_shards(out / "shards")[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a shard cut short: its sources are redone
    _ingest(videos, out)
    assert _shard_keys(out) == keys == sorted(pd.read_parquet(out / "clips.parquet")["key"])


def _ts_video(path: Path) -> Path:
    """A 4 s MPEG-TS at a constant 8 Mbit/s: about 4 MB, mostly null packets that every demuxer ignores."""
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=96x64:rate=10", "-t", "4", "-c:v", "libx264", "-pix_fmt", "yuv420p",
           "-f", "mpegts", "-muxrate", "8000000", str(path))
    return path


def test_files_differing_in_one_middle_byte_both_give_clips_and_copies_are_listed(tmp_path, ray_local):
    videos = tmp_path / "videos"
    videos.mkdir()
    a = _ts_video(videos / "a.ts")
    data = bytearray(a.read_bytes())
    assert len(data) > 3 * 2**20
    middle = next(i for i in range(len(data) // 2 // 188 * 188, len(data), 188)
                  if data[i] == 0x47 and data[i + 1] & 0x1F == 0x1F and data[i + 2] == 0xFF)  # a null packet
    data[middle + 100] ^= 0xFF
    (videos / "b.ts").write_bytes(data)
    (videos / "copy of a.ts").write_bytes(a.read_bytes())
    assert fingerprint(a) != fingerprint(videos / "b.ts") and fingerprint(a) == fingerprint(videos / "copy of a.ts")
    out = tmp_path / "out"
    summary = _ingest(videos, out)
    clips = pd.read_parquet(out / "clips.parquet")
    dups = pd.read_parquet(out / "duplicates.parquet")
    assert set(clips["source_path"]) == {str(a), str(videos / "b.ts")}
    assert clips.groupby("source_path")["key"].count().nunique() == 1 and clips["key"].is_unique
    assert list(dups["path"]) == [str(videos / "copy of a.ts")] and list(dups["duplicate_of"]) == [str(a)]
    assert summary["duplicate_inputs"] == 1 and summary["inputs"] == 3


def test_manifest_split_is_validated(tmp_path, ray_local):
    for seconds, name in enumerate("abcd", start=4):
        make_video(tmp_path / "v" / f"{name}.mp4", seconds=seconds)
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": [f"v/{n}.mp4" for n in "abcd"], "split": ["../../x", "Train", "val", "train"]}).to_csv(
        manifest, index=False)
    out = tmp_path / "deep" / "out"
    _ingest(manifest, out)
    assert not list(tmp_path.glob("*.tar")) and not list((tmp_path / "deep").glob("*.tar"))  # no escape
    assert {p.name.split("-")[0] for p in list_shards(out / "shards")} == {"train", "val"}
    failures = pd.read_parquet(out / "failures.parquet")
    assert sorted(zip(failures["path"].map(lambda p: Path(p).name), failures["error"], failures["kind"])) == [
        ("a.mp4", "bad_split", "permanent"), ("b.mp4", "bad_split", "permanent")]
    assert all("../../x" in m or "'Train'" in m for m in failures["message"])
    assert set(pd.read_parquet(out / "clips.parquet")["split"]) == {"train", "val"}


def test_rerun_with_another_input_keeps_no_old_shards(tmp_path, ray_local):
    make_video(tmp_path / "A" / "a1.mp4", seconds=4)
    make_video(tmp_path / "A" / "a2.mp4", seconds=4, source="mandelbrot")
    make_video(tmp_path / "B" / "b.mp4", seconds=5, size="80x64")
    out = tmp_path / "out"
    _ingest(tmp_path / "A", out)
    _ingest(tmp_path / "B", out)
    clips = pd.read_parquet(out / "clips.parquet")
    assert set(clips["source_path"]) == {str(tmp_path / "B" / "b.mp4")}
    assert _shard_keys(out) == sorted(clips["key"])


class _FifoUnblocker:
    """Opens `fifo` for writing after `after` seconds, so a reader stuck in open() gets EOF instead of hanging."""

    def __init__(self, fifo: Path, after: float):
        self.stop = threading.Event()
        threading.Thread(target=self._run, args=(fifo, after), daemon=True).start()

    def _run(self, fifo: Path, after: float) -> None:
        if self.stop.wait(after):
            return
        while not self.stop.is_set():
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass  # no reader yet
            time.sleep(0.1)


def test_fifo_broken_symlink_and_symlinked_folder_each_give_clips_or_a_failure(tmp_path, ray_local):
    videos, elsewhere = tmp_path / "videos", tmp_path / "elsewhere"
    make_video(videos / "real.mp4", seconds=4)
    make_video(elsewhere / "linked.mp4", seconds=4, source="mandelbrot")
    (videos / "linked folder").symlink_to(elsewhere, target_is_directory=True)
    (videos / "loop").symlink_to(videos, target_is_directory=True)  # a cycle: walked once
    (videos / "broken.mp4").symlink_to(tmp_path / "gone.mp4")
    os.mkfifo(videos / "pipe.mp4")
    out = tmp_path / "out"
    _ingest(videos, out)
    clips = pd.read_parquet(out / "clips.parquet")
    failures = pd.read_parquet(out / "failures.parquet")
    assert {Path(p).name for p in clips["source_path"]} == {"real.mp4", "linked.mp4"}
    assert dict(zip(failures["path"].map(lambda p: Path(p).name), failures["error"])) == {
        "broken.mp4": "broken_symlink", "pipe.mp4": "not_a_file"}


def test_fifo_in_a_manifest_never_hangs(tmp_path, ray_local):
    videos = tmp_path / "videos"
    make_video(videos / "real.mp4", seconds=4)
    os.mkfifo(videos / "pipe.mp4")
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": [str(videos / "real.mp4"), str(videos / "pipe.mp4")]}).to_csv(manifest, index=False)
    unblock = _FifoUnblocker(videos / "pipe.mp4", after=60)  # today's code would otherwise wait for a writer forever
    t0 = time.time()
    try:
        _ingest(manifest, tmp_path / "out2")
    finally:
        unblock.stop.set()
    assert time.time() - t0 < 60
    failures = pd.read_parquet(tmp_path / "out2" / "failures.parquet")
    assert list(failures["error"]) == ["not_a_file"] and list(failures["kind"]) == ["permanent"]


SITE_HOOK = '''
import os, signal, sys
POISON = os.environ.get("LAWM_TEST_POISON", "")
if POISON and any(POISON in a for a in sys.orig_argv) and any(a.endswith("av_probe.py") for a in sys.orig_argv):
    os.abort()  # the probe child "crashes in the demuxer" on this file
if POISON and os.environ.get("LAWM_TEST_KILL_WORKER"):
    def _hook(event, args):
        if event == "subprocess.Popen" and "ray" in sys.modules and any(POISON in str(a) for a in args[1]):
            os.kill(os.getpid(), signal.SIGKILL)  # the worker dies as it starts on this file
    sys.addaudithook(_hook)
'''


def _site_hook(tmp_path: Path, poison: str, kill_worker: bool) -> dict:
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITE_HOOK)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")])),
               LAWM_TEST_POISON=poison, **({"LAWM_TEST_KILL_WORKER": "1"} if kill_worker else {}))
    return env


def test_probe_crash_is_contained_and_recorded(tmp_path, monkeypatch):
    video = make_video(tmp_path / "poison.mp4", seconds=4)
    for key, value in _site_hook(tmp_path, "poison.mp4", kill_worker=False).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(VideoError) as err:
        probe(video)
    assert (err.value.reason, err.value.kind) == ("crashed", "permanent") and "SIGABRT" in err.value.message
    cfg = from_dict(IngestConfig, CFG)
    row = process_source(Source(str(video)), cfg, tmp_path / "work")
    assert (row["status"], row["stage"], row["error"], row["kind"]) == ("failed", "probe", "crashed", "permanent")
    again = process_source(Source(str(video)), cfg, tmp_path / "work")
    assert again["resumed"] and again["error"] == "crashed"  # a rerun does not open the file again


def test_worker_killed_on_one_file_is_recorded_and_the_run_goes_on(tmp_path):
    videos = tmp_path / "videos"
    make_video(videos / "a.mp4", seconds=4)
    make_video(videos / "poison.mp4", seconds=4, source="mandelbrot")
    env = _site_hook(tmp_path, "poison.mp4", kill_worker=True)
    cmd = [sys.executable, "-m", "pipelines.ingest", "--input", str(videos), "--output", str(tmp_path / "out"),
           "--quiet", *[f"{k}={v}" for k, v in CFG.items()]]
    for _ in range(2):  # the rerun retries the transient failure, and lives through it again
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        failures = pd.read_parquet(tmp_path / "out" / "failures.parquet")
        assert [(Path(p).name, e, k) for p, e, k in zip(failures["path"], failures["error"], failures["kind"])] == [
            ("poison.mp4", "worker_died", "transient")]
        assert {Path(p).name for p in pd.read_parquet(tmp_path / "out" / "clips.parquet")["source_path"]} == {"a.mp4"}


def _feed(fifo: Path, data: bytes, hold: float) -> None:
    with open(fifo, "wb") as fh:
        fh.write(data)
        fh.flush()
        time.sleep(hold)  # keep the pipe open without writing: the reader waits for more


def test_stalled_decoder_is_killed_by_the_progress_watchdog(tmp_path):
    ts = make_video(tmp_path / "v.ts", seconds=20).read_bytes()  # half of it is more than ffmpeg's 5 s probe
    fifo = tmp_path / "stall.ts"
    os.mkfifo(fifo)
    feeder = threading.Thread(target=_feed, args=(fifo, ts[: len(ts) // 2], 30.0), daemon=True)
    feeder.start()
    t0, frames = time.time(), []
    with pytest.raises(VideoError) as err:
        for frame in stream_frames(fifo, fps=4.0, size=32, timeout=600.0, stall_timeout=3.0):
            frames.append(frame)
    assert err.value.reason == "stalled" and err.value.kind == "transient"
    assert frames and time.time() - t0 < 20  # frames came, then none for 3 s: killed long before the 600 s cap


def test_endless_stream_is_capped_whatever_it_declares(tmp_path):
    fifo = tmp_path / "endless.ts"
    os.mkfifo(fifo)
    # a live stream: frames keep coming in real time for as long as anyone reads
    writer = subprocess.Popen([ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-re", "-f", "lavfi", "-i",
                               "testsrc2=size=96x64:rate=10", "-c:v", "libx264", "-f", "mpegts", str(fifo)])
    try:
        t0, frames = time.time(), 0
        with pytest.raises(VideoError) as err:
            for _ in stream_frames(fifo, fps=4.0, size=32, timeout=12.0, stall_timeout=10.0):  # ffmpeg reads 5 s before
                frames += 1                                                              # its first frame
        assert err.value.reason == "timeout" and err.value.kind == "transient"
        assert frames >= 4 and time.time() - t0 < 30
    finally:
        writer.kill()
        writer.wait()


def test_clip_encoding_round_trips_exactly_t_frames_and_fails_cleanly():
    """Clips are encoded in-process (PyAV): exactly T frames come back, at the fps asked for, close to what went in;
    a codec this machine lacks is an `encode_error` (transient: the machine's trouble), not a crash."""
    import av

    from lawm.data.video import VideoError, decode_clip, encode_clip

    yy, xx = np.mgrid[0:64, 0:64]
    frames = np.stack([np.stack([(xx + 3 * t) % 256, (yy * 2 + t) % 256, (xx + yy) % 256], -1)
                       for t in range(16)]).astype(np.uint8)
    for preset in ("ultrafast", "veryfast"):
        data = encode_clip(frames, fps=4.0, preset=preset)
        back = decode_clip(data)
        assert back.shape == frames.shape
        mse = ((back.astype(float) - frames) ** 2).mean()
        assert 10 * np.log10(255 ** 2 / mse) > 30, preset  # smooth content at crf 18
        with av.open(__import__("io").BytesIO(data)) as c:
            assert c.streams.video[0].average_rate == 4
    assert len(encode_clip(frames[:3], fps=2.5)) > 0 and decode_clip(encode_clip(frames[:3], fps=2.5)).shape[0] == 3
    with pytest.raises(VideoError) as err:
        encode_clip(frames, fps=4.0, codec="no_such_codec")
    assert err.value.reason == "encode_error"
