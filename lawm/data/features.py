"""Read the `encode` stage's feature shards back as training samples.

    ds = feature_dataset("runs/demo/encode", split="train")
    loader = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=2, collate_fn=collate_features)

Each sample: {"feats": float32 (T', N, D), "key": str, "meta": dict (the clip's metadata plus meta["encoder"]:
dim, grid, tubelet, dtype, ...), "labels": {name: tensor}}. Sharding across ranks and DataLoader workers and the
shuffle are those of `lawm.data.clips.ShardDataset`.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from lawm.data.clips import ShardDataset, collate, sample_extras, shard_urls

FEATURE_EXT = "feat.npy"


def features_dir(path: str | Path) -> Path:
    """The encode output folder or its `features/` folder."""
    path = Path(path)
    return path / "features" if (path / "features").is_dir() else path


def load_features(data: bytes, dtype: str | None = None) -> torch.Tensor:
    """`.feat.npy` bytes -> float32 tensor; `dtype` "bfloat16" marks uint16 bits of bfloat16 values."""
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if dtype == "bfloat16" or arr.dtype == np.uint16:
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(arr).float()


def decode_features(sample: dict) -> dict:
    extras = sample_extras(sample)
    dtype = extras["meta"].get("encoder", {}).get("dtype")
    return {"feats": load_features(sample[FEATURE_EXT], dtype), **extras}


def feature_info(path: str | Path) -> dict:
    """The run's features.json (dim, grid_h, grid_w, tubelet, frames, dtype, counts, encoder config, ...)."""
    path = Path(path)
    summary = path / "features.json" if (path / "features.json").exists() else path.parent / "features.json"
    return json.loads(summary.read_text())


def feature_dataset(dir: str | Path | list[str], split: str | None = "train", shuffle: int = 256, seed: int = 0,
                    rank: int | None = None, world_size: int | None = None) -> ShardDataset:
    """An IterableDataset over cached features; shuffled by shard order and a sample buffer (`shuffle`=0: neither)."""
    urls = dir if isinstance(dir, (list, tuple)) else features_dir(dir)
    return ShardDataset(shard_urls(urls, split), decode_features, shuffle, seed, rank, world_size, shuffle > 0)


# Frames or features: one collate stacks whichever tensors the samples carry.
collate_features = collate
