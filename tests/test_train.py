"""Ray Train: two-worker DDP (gloo) on real feature shards, a killed worker, and resuming by run name."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from lawm.config import from_dict
from lawm.data.clips import shard_urls
from lawm.models.encoders import EncoderConfig
from lawm.models.lam import LAMConfig
from lawm.training.loop import TrainConfig
from lawm.training.optim import OptimConfig
from lawm_datasets.synthetic import SyntheticConfig, generate
from pipelines.encode import EncodeConfig, run_encode
from pipelines.ingest import IngestConfig, run_ingest

from jobs.train import ScalingSection, TrainJob, fit
from jobs.train_stages import build_lam


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
    return TrainJob("test", build_lam, {"lam_cfg": lam, "window": 0}, train, ScalingSection(num_workers=workers),
                    shard_urls(features["features"], "train"), [], "features", str(out), **kw)


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


def test_same_run_name_continues(features, tmp_path):
    fit(_job(features, tmp_path, steps=8, workers=1, ckpt_every=4), "again")
    fit(_job(features, tmp_path, steps=12, workers=1, ckpt_every=4), "again")
    starts = [e["step"] for e in _events(tmp_path) if e["event"] == "start"]
    assert starts == [0, 8]
