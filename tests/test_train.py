"""Ray Train: two-worker DDP (gloo) on real feature shards, a killed worker, and resuming by run name."""
from __future__ import annotations

import json
import os
import random
import signal
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from lawm.config import from_dict
from lawm.data.clips import ShardDataset, shard_urls
from lawm.models.encoders import EncoderConfig
from lawm.models.lam import LAMConfig
from lawm.training.loop import TrainConfig
from lawm.training.optim import OptimConfig
from lawm_datasets.synthetic import SyntheticConfig, generate
from pipelines.encode import EncodeConfig, run_encode
from pipelines.ingest import IngestConfig, run_ingest

from jobs.ray_train import ScalingSection, TrainJob, _decode_fn, fit, validation_batches, validation_sample
from lawm.training.builders import build_lam


@pytest.fixture(scope="module")
def features(tmp_path_factory, ray_local) -> dict:
    root = tmp_path_factory.mktemp("train")
    manifest = generate(SyntheticConfig(n_videos=6, seconds=8, fps=4, size=[64, 64], val_fraction=0.2,
                                        n_counterfactuals=0), root / "videos")
    run_ingest(from_dict(IngestConfig, {"input": str(manifest), "clip_frames": 8, "stride": 2, "size": 32,
                                        "min_shards": 2, "shard_mb": 1}), root / "ingest", progress=False)
    enc = EncodeConfig(encoder=EncoderConfig(kind="patch", image_size=32, patch_size=8))  # one feature shard per clip shard
    return run_encode(enc, root / "ingest" / "shards", root / "encode", progress=False)


def _job(features: dict, out: Path, steps: int, workers: int, ckpt_every: int, **kw) -> TrainJob:
    lam = LAMConfig(feat_dim=features["dim"], grid_h=features["grid_h"], grid_w=features["grid_w"], latent_dim=16)
    lam.reg.kind = "none"
    train = TrainConfig(steps=steps, batch_size=4, log_every=2, ckpt_every=ckpt_every, loader_workers=0, shuffle=16,
                        optim=OptimConfig(lr=3e-3, warmup_frac=0.0))
    out.mkdir(parents=True, exist_ok=True)
    return TrainJob(stage="test", build=build_lam, build_kwargs={"lam_cfg": lam, "window": 0}, train=train,
                    scaling=ScalingSection(num_workers=workers), train_urls=shard_urls(features["features"], "train"),
                    val_urls=[], data_kind="features", out_dir=str(out), **kw)


def _events(out: Path) -> list[dict]:
    path = out / "progress.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_two_workers_learn_on_disjoint_samples(features, tmp_path):
    job = _job(features, tmp_path, steps=24, workers=2, ckpt_every=24, audit_keys=True)
    result = fit(job, "ddp")
    logs = [e for e in _events(tmp_path) if e["event"] == "log"]
    assert logs[-1]["pred_loss"] < 0.8 * logs[0]["pred_loss"]
    assert Path(result["models"]["lam"]).exists() and result["checkpoint"]
    seen = [set((tmp_path / f"keys-rank{r}.txt").read_text().split()) for r in (0, 1)]
    assert seen[0] and seen[1] and not seen[0] & seen[1], "the two workers must read different clips"


def test_killed_worker_resumes_from_last_checkpoint(features, tmp_path):
    ckpt_every = 6
    job = _job(features, tmp_path, steps=30, workers=1, ckpt_every=ckpt_every)
    box: dict = {}
    runner = threading.Thread(target=lambda: box.update(result=fit(job, "fault")))
    runner.start()
    deadline, killed = time.time() + 240, None
    while time.time() < deadline and killed is None:
        logs = [e for e in _events(tmp_path) if e["event"] == "log"]
        if logs and logs[-1]["step"] >= 14:
            killed = logs[-1]
            os.kill(killed["pid"], signal.SIGKILL)
        time.sleep(0.1)
    runner.join(timeout=400)
    assert killed is not None and "result" in box, "the run did not finish after its worker was killed"
    starts = [e for e in _events(tmp_path) if e["event"] == "start"]
    assert len(starts) == 2 and starts[1]["pid"] != killed["pid"]
    assert killed["step"] - ckpt_every <= starts[1]["step"] <= killed["step"] and starts[1]["step"] % ckpt_every == 0
    assert _events(tmp_path)[-1] == {**_events(tmp_path)[-1], "event": "end", "step": 30}


class RngProbe(torch.nn.Module):
    """An objective that records, each step, one draw from each global random stream (torch, numpy, python) of
    its rank: what a resumed rank must continue exactly as if it had never stopped."""

    def __init__(self, out_dir: str, steps: int):
        super().__init__()
        self.w, self.out_dir, self.steps = torch.nn.Parameter(torch.zeros(1)), out_dir, steps

    def forward(self, batch: dict, progress: float = 1.0):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        draws = {"step": round(progress * self.steps), "torch": torch.rand(()).item(), "numpy": np.random.rand(),
                 "python": random.random()}
        with open(Path(self.out_dir) / f"draws-rank{rank}.jsonl", "a") as fh:
            fh.write(json.dumps(draws) + "\n")
        return (self.w - draws["torch"]).pow(2).sum(), {}

    def exports(self) -> dict:
        return {}


def build_probe(out_dir: str, steps: int) -> RngProbe:
    return RngProbe(out_dir, steps)


def _probe_job(features: dict, out: Path, steps: int) -> TrainJob:
    train = TrainConfig(steps=steps, batch_size=2, log_every=2, ckpt_every=4, loader_workers=0, shuffle=4,
                        optim=OptimConfig(lr=1e-2, warmup_frac=0.0))
    out.mkdir(parents=True, exist_ok=True)
    return TrainJob(stage="probe", build=build_probe, build_kwargs={"out_dir": str(out), "steps": steps}, train=train,
                    scaling=ScalingSection(num_workers=2), train_urls=shard_urls(features["features"], "train"),
                    val_urls=[], data_kind="features", out_dir=str(out), seed=5)


def _draws(out: Path, rank: int) -> dict[int, dict]:
    rows = [json.loads(x) for x in (out / f"draws-rank{rank}.jsonl").read_text().splitlines()]
    return {r.pop("step"): r for r in rows}  # a resumed run overwrites nothing: steps after the checkpoint


def test_resumed_ranks_continue_their_own_random_streams(features, tmp_path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test file
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    fit(_probe_job(features, straight, steps=8), "probe")
    fit(_probe_job(features, resumed, steps=4), "probe")  # stops with a checkpoint at step 4 ...
    first = {r: _draws(resumed, r) for r in (0, 1)}
    for r in (0, 1):
        (resumed / f"draws-rank{r}.jsonl").unlink()
    fit(_probe_job(features, resumed, steps=8), "probe")  # ... and the same run name continues from it
    starts = [e["step"] for e in _events(resumed) if e["event"] == "start"]
    assert starts == [0, 4]
    for r in (0, 1):
        want, got = _draws(straight, r), _draws(resumed, r)
        assert sorted(got) == [4, 5, 6, 7]
        assert {s: want[s] for s in got} == got, f"rank {r} after resuming is not on its uninterrupted stream"
        assert {s: want[s] for s in first[r]} == first[r]
    for s in range(8):
        a, b = _draws(straight, 0)[s], _draws(straight, 1)[s]
        assert all(a[k] != b[k] for k in a), "the ranks must draw different random numbers"


def test_validation_sample_spreads_over_videos_and_is_fixed(features):
    urls = shard_urls(features["features"], "train")
    keys = {u: [k for k in _keys(u)] for u in urls}
    total = sum(len(v) for v in keys.values())
    videos = Counter(k.rsplit("_", 1)[0] for ks in keys.values() for k in ks)
    assert len(urls) >= 2 and len(videos) >= 3
    clips = total // 3
    sample = validation_sample(urls, clips, seed=0)
    assert sample == validation_sample(list(reversed(urls)), clips, seed=0)  # fixed
    assert sample != validation_sample(urls, clips, seed=1)  # seeded
    assert len(sample) == len(set(sample)) == clips
    assert len({u for u, _ in sample}) >= 2, "the sample must not come from the first shard only"
    picked = Counter(k.rsplit("_", 1)[0] for _, k in sample)
    for video, count in videos.items():  # in proportion to each video's clips
        assert abs(picked[video] - count * clips / total) <= 1, (video, picked[video], count)
    assert all(k in keys[u] for u, k in sample)
    # fewer clips than asked: all of them; batches of nearly equal size, decoded
    everything = validation_sample(urls, total + 5, seed=0)
    assert sorted(k for _, k in everything) == sorted(k for ks in keys.values() for k in ks)
    batches = list(validation_batches(urls, decode=_decode_fn("features"), clips=clips, batch_size=4, seed=0))
    sizes = [len(b["key"]) for b in batches]
    assert sum(sizes) == clips and max(sizes) <= 4 and max(sizes) - min(sizes) <= 1
    assert [k for b in batches for k in b["key"]] == [k for _, k in sample]
    assert batches[0]["feats"].shape[1:] == (features["frames"], features["grid_h"] * features["grid_w"], features["dim"])


def _keys(url: str) -> list[str]:
    import tarfile

    with tarfile.open(url) as tar:
        return sorted({m.name.split(".", 1)[0] for m in tar if m.isfile()})


def test_training_without_labels_reads_the_same_clips(features, tmp_path):
    """LAM training skips each clip's labels.npz (most of a feature batch's decode time): the same clips, the same
    features, in the same order; and the decoder still pickles for DataLoader worker processes."""
    import pickle

    from jobs.ray_train import _loader

    batches = {}
    for labels in (True, False):
        job = _job(features, tmp_path / str(labels), steps=1, workers=1, ckpt_every=1, labels=labels)
        _, loader = _loader(job, job.train_urls, shuffle=16)
        batches[labels] = list(loader)
    assert len(batches[True]) == len(batches[False]) >= 2
    for a, b in zip(batches[True], batches[False]):
        assert a["key"] == b["key"] and torch.equal(a["feats"], b["feats"])
        assert set(a["labels"]) >= {"agent_vel", "camera"} and b["labels"] == {}
    decode = pickle.loads(pickle.dumps(_decode_fn("features", labels=False)))
    raw = next(iter(ShardDataset(job.train_urls[:1], dict, shuffle=0)))  # the tar members of one sample, undecoded
    assert "labels.npz" in raw and decode(raw)["labels"] == {}


def test_fit_all_runs_side_by_side_and_raises_the_first_error_after_every_fit_ended(monkeypatch, ray_local):
    """The per-domain stages' fits (jobs/ray_train.fit_all): `at_once` at a time, every fit ends before the first
    error (in key order) is raised, and `fits_at_once` counts the worker groups the free CPUs hold. `fit` itself is
    replaced here: what is under test is the scheduling; the real fits run side by side in test_pipeline."""
    import jobs.ray_train as rt

    running, peak, ended = [0], [0], []
    lock = threading.Lock()

    def fake_fit(job, name):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.3 if name != "slow" else 1.0)
        with lock:
            running[0] -= 1
            ended.append(name)
        if name.startswith("bad"):
            raise RuntimeError(f"{name} failed")
        return {"name": name}

    monkeypatch.setattr(rt, "fit", fake_fit)
    jobs = {k: (None, k) for k in ("a", "b", "c")}
    assert rt.fit_all(jobs, at_once=2) == {k: {"name": k} for k in jobs} and peak[0] == 2
    peak[0] = 0
    assert rt.fit_all(jobs, at_once=1) == {k: {"name": k} for k in jobs} and peak[0] == 1
    ended.clear()
    with pytest.raises(RuntimeError, match="bad1 failed"):
        rt.fit_all({"x": (None, "bad1"), "y": (None, "slow"), "z": (None, "bad2")}, at_once=3)
    assert sorted(ended) == ["bad1", "bad2", "slow"]  # the slow fit was not abandoned
    cpus = ray_local.available_resources()["CPU"]
    assert rt.fits_at_once(2, ScalingSection(num_workers=1, cpus_per_worker=1)) == min(2, int(cpus))
    assert rt.fits_at_once(2, ScalingSection(num_workers=1, cpus_per_worker=cpus + 1)) == 1  # never 0
    assert rt.fits_at_once(5, ScalingSection(num_workers=2, cpus_per_worker=cpus / 2)) == 1


def test_ctrl_c_during_side_by_side_fits_stops_the_driver_at_once(tmp_path):
    """fit_all's docstring promises it: Ctrl-C reaches the waiting driver, which exits without waiting for the fits
    (they would run on for 2 minutes here)."""
    import subprocess

    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        import jobs.ray_train as rt
        rt.fit = lambda job, name: time.sleep(120)
        print("fitting", flush=True)
        rt.fit_all({{"nav": (None, "nav"), "manip": (None, "manip")}}, at_once=2)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "fitting"
        time.sleep(1.0)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - sent < 10 and proc.returncode != 0 and "KeyboardInterrupt" in err, err[-2000:]
    finally:
        proc.kill()
