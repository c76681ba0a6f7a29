"""Ingest on real ffmpeg-made videos, hostile ones included, through local Ray."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ffmpeg, make_video
from lawm.config import from_dict
from lawm.data.clips import clip_dataset, collate
from pipelines.clipper import process_source
from pipelines.ingest import IngestConfig, run_ingest
from pipelines.shards import list_shards, shard_keys
from pipelines.sources import Source

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
    cfg = from_dict(IngestConfig, {**CFG, "timeout_s": 1.0, "timeout_per_source_s": 0.0})
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
    run_ingest(cfg, tmp_path / "out", progress=False)
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
