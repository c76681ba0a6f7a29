"""Read ingest's WebDataset shards back as training samples.

    ds = clip_dataset("runs/demo/ingest/shards", split="train")
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)

Each sample: {"frames": float (T, C, H, W) in [0, 1], "key": str, "meta": dict, "labels": {name: tensor}}.
Shards are split across nodes (torch.distributed rank, e.g. inside a Ray Train worker) and across
DataLoader workers, so no two readers see the same sample. When there are fewer shards than readers,
every reader scans all shards and keeps every k-th sample instead: still disjoint, only slower.
"""
from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from lawm.data.video import decode_clip


def shard_urls(shards: str | Path | list[str], split: str | None = "train") -> list[str]:
    """A shard folder (filtered by split prefix), a single tar, or an explicit list."""
    if isinstance(shards, (list, tuple)):
        return [str(s) for s in shards]
    path = Path(shards)
    if path.is_file():
        return [str(path)]
    urls = sorted(str(p) for p in path.glob(f"{split + '-' if split else ''}*.tar") if not p.name.startswith("."))
    if not urls:
        raise FileNotFoundError(f"no {split or ''} shards in {path}")
    return urls


def reader_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(index, count) of this reader among all nodes x DataLoader workers."""
    if rank is None or world_size is None:
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if dist else 0
        world_size = torch.distributed.get_world_size() if dist else 1
    worker = torch.utils.data.get_worker_info()
    wid, nworkers = (worker.id, worker.num_workers) if worker else (0, 1)
    return rank * nworkers + wid, world_size * nworkers


def sample_extras(sample: dict) -> dict:
    """The parts every shard sample shares: key, metadata and the per-frame labels, if any."""
    out = {"key": sample["__key__"], "meta": json.loads(sample["json"]) if "json" in sample else {}, "labels": {}}
    if "labels.npz" in sample:
        with np.load(io.BytesIO(sample["labels.npz"]), allow_pickle=False) as npz:
            out["labels"] = {k: torch.from_numpy(np.asarray(npz[k])) for k in npz.files}
    return out


def decode_sample(sample: dict) -> dict:
    frames = decode_clip(sample["mp4"])  # (T, H, W, C) uint8
    return {"frames": torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255.0), **sample_extras(sample)}


class ShardDataset(torch.utils.data.IterableDataset):
    """Reads WebDataset shards, giving this reader only its own shards (or, with too few shards, its own
    samples), shuffled by shard order and a sample buffer, each raw sample passed through `decode`.

    With `repeat`, epochs follow each other inside one iteration (each shuffled with its own seed), so
    DataLoader workers are started once; `set_position` makes the next iteration resume after the batches a
    training run has already consumed, skipping raw samples without decoding them.
    """

    def __init__(self, urls: list[str], decode: Callable[[dict], dict] = decode_sample, shuffle: int = 256,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None, epoch_shuffle: bool = True,
                 repeat: bool = False):
        self.urls, self.decode, self.shuffle, self.seed = urls, decode, shuffle, seed
        self.rank, self.world_size, self.epoch_shuffle, self.repeat = rank, world_size, epoch_shuffle, repeat
        self.epoch = 0
        self.skip_batches, self.batch_size = 0, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_position(self, batches: int, batch_size: int) -> None:
        self.skip_batches, self.batch_size = batches, batch_size

    def _epoch_samples(self, epoch: int, index: int, count: int) -> Iterator[dict]:
        # Each reader owns a fixed share of the shards for the whole run (disjoint across readers in every
        # epoch, and a node keeps re-reading the same files); only the order inside the share changes.
        rng = np.random.default_rng((self.seed, index, epoch))
        by_shard = len(self.urls) >= count
        urls = sorted(self.urls)[index::count] if by_shard else sorted(self.urls)
        if self.epoch_shuffle:
            rng.shuffle(urls)
        stream = iter(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))
        if not by_shard:
            stream = (s for i, s in enumerate(stream) if i % count == index)
        return _buffer_shuffle(stream, self.shuffle, rng) if self.shuffle > 1 else stream

    def __iter__(self) -> Iterator[dict]:
        index, count = reader_info(self.rank, self.world_size)
        worker = torch.utils.data.get_worker_info()
        wid, nworkers = (worker.id, worker.num_workers) if worker else (0, 1)
        # DataLoader takes batch i from worker i % nworkers: this worker gave ceil((n - wid) / nworkers) of them
        skip = max(0, -(-(self.skip_batches - wid) // nworkers)) * self.batch_size
        epoch = self.epoch
        while True:
            seen = 0
            for sample in self._epoch_samples(epoch, index, count):
                seen += 1
                if skip:
                    skip -= 1
                    continue
                yield self.decode(sample)
            if not self.repeat or seen == 0:  # an empty reader must not spin forever
                return
            epoch += 1


def _buffer_shuffle(stream: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    buf: list[dict] = []
    for item in stream:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(len(buf)))
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


def clip_dataset(shards: str | Path | list[str], split: str | None = "train", shuffle: int = 256, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None) -> ShardDataset:
    """An IterableDataset over clips; shuffled by shard order and a sample buffer (`shuffle`=0 turns both off)."""
    return ShardDataset(shard_urls(shards, split), decode_sample, shuffle, seed, rank, world_size, shuffle > 0)


def collate(samples: list[dict]) -> dict:
    """Stack the tensors (frames or feats) and the labels every sample has; keys and metadata stay lists."""
    out: dict = {"key": [s["key"] for s in samples], "meta": [s["meta"] for s in samples]}
    for name, value in samples[0].items():
        if torch.is_tensor(value):
            out[name] = torch.stack([s[name] for s in samples])
    names = set.intersection(*(set(s["labels"]) for s in samples)) if samples else set()
    out["labels"] = {k: torch.stack([torch.as_tensor(s["labels"][k]) for s in samples]) for k in sorted(names)}
    return out
