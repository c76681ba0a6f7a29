"""The encode stage over real ingest shards (ffmpeg-made videos) through local Ray, and its reader."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_video
from lawm.config import ConfigError, from_dict
from lawm.data.clips import clip_dataset
from lawm.data.features import collate_features, feature_dataset, feature_info
from pipelines.encode import EncodeConfig, make_encoder, run_encode
from pipelines.ingest import IngestConfig, run_ingest
from pipelines.shards import list_shards, shard_keys

INGEST = dict(clip_frames=8, fps=4.0, stride=8, size=32, shard_mb=0.004, min_shards=2, timeout_s=60.0)
TIMM = {"kind": "timm", "timm_name": "vit_tiny_patch16_224", "image_size": 32, "seed": 3}  # random init
RAW = {"kind": "patch", "image_size": 32, "patch_size": 8}  # raw pixels: exactly reproducible


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, ray_local):
    d = tmp_path_factory.mktemp("enc_videos")
    for name, source in (("a", "testsrc2"), ("b", "mandelbrot"), ("c", "testsrc"), ("d", "rgbtestsrc")):
        make_video(d / f"{name}.mp4", seconds=6, fps=8, size="64x48", source=source)
    t = np.arange(48) / 8.0
    np.savez(d / "a.labels.npz", t=t, action=np.stack([np.arange(48), -np.arange(48)], 1).astype(np.float32))
    manifest = d / "manifest.csv"
    pd.DataFrame({"path": ["a.mp4", "b.mp4", "c.mp4", "d.mp4"],
                  "split": ["train", "val", "train", "train"]}).to_csv(manifest, index=False)
    out = tmp_path_factory.mktemp("enc_ingest")
    run_ingest(from_dict(IngestConfig, {**INGEST, "input": str(manifest)}), out, progress=False)
    return out


def _clips(ingested, split):
    return {s["key"]: s for s in clip_dataset(ingested / "shards", split=split, shuffle=0)}


def _feats(out, split):
    return {s["key"]: s for s in feature_dataset(out, split=split, shuffle=0)}


def test_config_is_strict():
    with pytest.raises(ConfigError, match="dtype"):
        from_dict(EncodeConfig, {"dtype": "int8"})
    with pytest.raises(ConfigError, match="encoder.kind"):
        from_dict(EncodeConfig, {"encoder": {"kind": "resnet"}})


def test_features_round_trip(ingested, tmp_path):
    cfg = from_dict(EncodeConfig, {"encoder": TIMM, "batch_size": 3})
    summary = run_encode(cfg, ingested, tmp_path, progress=False)
    assert summary["dim"] == 192 and (summary["grid_h"], summary["grid_w"]) == (2, 2) and summary["tubelet"] == 1
    assert summary["metrics"]["failed"] == 0 and not summary["skipped"]
    assert feature_info(tmp_path)["counts"] == summary["counts"]

    encoder = make_encoder(cfg.encoder)  # a fresh build: the same seeded weights as every actor's
    clips_table = pd.read_parquet(ingested / "clips.parquet")
    for split in ("train", "val"):
        clips, feats = _clips(ingested, split), _feats(tmp_path, split)
        assert clips and set(feats) == set(clips) == set(clips_table.loc[clips_table["split"] == split, "key"])
        assert summary["counts"][split] == len(clips)
        # at least one feature shard per clip shard, keys sorted across shards in name order
        out_shards = list_shards(tmp_path / "features", split)
        assert len(out_shards) >= len(list_shards(ingested / "shards", split))
        keys = [k for p in out_shards for k in shard_keys(p)]
        assert keys == sorted(clips)
        for key, clip in clips.items():
            ref = encoder(clip["frames"][None])[0]
            got = feats[key]["feats"]
            assert got.dtype == torch.float32 and got.shape == ref.shape == (8, 4, 192)
            torch.testing.assert_close(got, ref, atol=5e-3, rtol=2e-3)  # fp16 storage
            meta = feats[key]["meta"]
            assert {k: v for k, v in meta.items() if k != "encoder"} == clip["meta"]
            assert meta["encoder"]["dim"] == 192 and meta["encoder"]["grid"] == [2, 2]
            assert meta["encoder"]["dtype"] == "float16" and meta["split"] == split
            assert set(feats[key]["labels"]) == set(clip["labels"])
            for name, value in clip["labels"].items():
                assert torch.equal(feats[key]["labels"][name], value)
    assert any(s["labels"] for s in _feats(tmp_path, "train").values())  # the labelled video passed through

    # the reader: disjoint per rank, batches through a DataLoader
    a = {s["key"] for s in feature_dataset(tmp_path, "train", shuffle=0, rank=0, world_size=2)}
    b = {s["key"] for s in feature_dataset(tmp_path, "train", shuffle=0, rank=1, world_size=2)}
    assert not a & b and a | b == set(_clips(ingested, "train"))
    loader = torch.utils.data.DataLoader(feature_dataset(tmp_path, "train", shuffle=8), batch_size=4,
                                         collate_fn=collate_features)
    batch = next(iter(loader))
    assert batch["feats"].shape == (4, 8, 4, 192) and len(batch["key"]) == 4


def test_rerun_skips_resumes_and_restarts(ingested, tmp_path):
    cfg = from_dict(EncodeConfig, {"encoder": RAW, "batch_size": 4, "actors": 1})
    first = run_encode(cfg, ingested, tmp_path, progress=False)
    shards = sorted((tmp_path / "features").glob("*.tar"))
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in shards}
    assert len(shards) == sum(len(v) for v in first["shards"].values()) >= 3

    again = run_encode(cfg, ingested, tmp_path, progress=False)  # same inputs and settings: nothing to do
    assert again["skipped"] and again["counts"] == first["counts"]
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in shards} == before

    # a killed run: one shard never renamed into place, no features.json -> only that shard is encoded again
    shards[1].unlink()
    (tmp_path / "features.json").unlink()
    resumed = run_encode(cfg, ingested, tmp_path, progress=False)
    assert resumed["metrics"]["shards_written"] == 1 and resumed["metrics"]["shards_resumed"] == len(shards) - 1
    assert {p.name: p.read_bytes() for p in shards} == {k: v[0] for k, v in before.items()}  # same bytes

    # other settings start afresh; bfloat16 round-trips through the reader
    bf = from_dict(EncodeConfig, {"encoder": RAW, "batch_size": 4, "actors": 1, "dtype": "bfloat16"})
    fresh = run_encode(bf, ingested, tmp_path, progress=False)
    assert not fresh["skipped"] and fresh["metrics"]["shards_written"] == len(shards)
    assert json.loads((tmp_path / "features.json").read_text())["dtype"] == "bfloat16"
    clips = _clips(ingested, "val")
    feats = _feats(tmp_path, "val")
    encoder = make_encoder(bf.encoder)
    for key, clip in clips.items():
        torch.testing.assert_close(feats[key]["feats"], encoder(clip["frames"][None])[0], atol=1e-2, rtol=8e-3)


def _with_bad_clip(ingested, out) -> str:
    """A copy of the ingest shards in which one train clip's mp4 is garbage: encode must record it as a failure."""
    import io
    import tarfile

    out.mkdir()
    shards = list_shards(ingested / "shards")
    victim = next(p for p in shards if p.name.startswith("train"))
    bad_key = shard_keys(victim)[0]
    for p in shards:
        if p != victim:
            (out / p.name).write_bytes(p.read_bytes())
            continue
        with tarfile.open(p) as src, tarfile.open(out / p.name, "w") as dst:
            for m in src:
                data = src.extractfile(m).read()
                if m.name == f"{bad_key}.mp4":
                    data = b"not a video at all" * 10
                    m.size = len(data)
                dst.addfile(m, io.BytesIO(data))
    return bad_key


def test_resumed_run_reports_the_counts_of_a_fresh_one(ingested, tmp_path):
    shards = tmp_path / "shards"
    bad_key = _with_bad_clip(ingested, shards)
    cfg = from_dict(EncodeConfig, {"encoder": RAW, "batch_size": 4, "actors": 1})
    fresh = run_encode(cfg, shards, tmp_path / "out", progress=False)
    assert [f["key"] for f in fresh["failures"]] == [bad_key] and fresh["metrics"]["failed"] == 1
    n_train = sum(len(shard_keys(p)) for p in list_shards(shards, "train"))
    assert fresh["counts"]["train"] == n_train - 1

    # a killed run: features.json never written, one shard never renamed into place (a val shard: the train shard
    # planned to hold the failed clip is among those kept)
    other = list_shards(tmp_path / "out" / "features", "val")[0]
    other.unlink()
    (tmp_path / "out" / "features.json").unlink()
    resumed = run_encode(cfg, shards, tmp_path / "out", progress=False)
    assert resumed["metrics"]["shards_written"] == 1 and resumed["metrics"]["failed"] == 0  # this run's work
    assert resumed["counts"] == fresh["counts"]
    assert [(f["key"], f["split"], f["error"]) for f in resumed["failures"]] == \
        [(f["key"], f["split"], f["error"]) for f in fresh["failures"]]
    assert feature_info(tmp_path / "out")["counts"] == fresh["counts"]

    # shards finished by an older run that kept no failure file: the missing clip is still reported
    for sidecar in (tmp_path / "out" / "features").glob(".*.failures.json"):
        sidecar.unlink()
    other.unlink()
    (tmp_path / "out" / "features.json").unlink()
    again = run_encode(cfg, shards, tmp_path / "out", progress=False)
    assert again["counts"] == fresh["counts"] and [f["key"] for f in again["failures"]] == [bad_key]
