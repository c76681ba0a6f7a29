"""What every evaluation shares: held-out features in memory, clip pairing, and the latent baselines.

A model here is anything with the three methods of `LatentActionWorldModel`: `infer_latents(s)` (B, T-1, ...),
`predict(s, z)` (teacher-forced, one pass) and `rollout(context_s, z_seq)`. Latents may be pooled (B, T, dz) or
per token (B, T, N, dz); the baselines below keep whichever shape they are given.

Baselines every number stands beside:
- copy: the last observed representation repeated (no model at all);
- zero z: the world model driven by all-zero latents;
- random z: latents drawn from a Gaussian with the per-dimension mean and std of the inferred latents;
- shifted z: each clip driven by the latents of its partner clip (`partner_index`: the next clip, in key order, that
  comes from another source video). A shift, never a random permutation, so no clip is ever given its own latent.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class FeatureSet:
    """Clips of one split, stacked: feats (B, T', N, D), their keys, metadata and per-frame labels."""
    feats: torch.Tensor
    keys: list[str]
    meta: list[dict]
    labels: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def sources(self) -> list[str]:
        """The source video of each clip: the key up to its last `_` (keys are `<source id>_<clip index>`)."""
        return [k.rsplit("_", 1)[0] for k in self.keys]

    def subset(self, idx) -> "FeatureSet":
        idx = [int(i) for i in idx]
        return FeatureSet(self.feats[idx], [self.keys[i] for i in idx], [self.meta[i] for i in idx],
                          {k: v[idx] for k, v in self.labels.items()})


def load_features(path: str, split: str, max_clips: int = 0, seed: int = 0, labels: tuple[str, ...] = ()) -> FeatureSet:
    """Every clip of `split` in a feature folder (the encode stage's output) that carries all of `labels`, in key
    order; with `max_clips` > 0 a seeded sample of that many, spread over all source videos (a random subset, not
    the first keys)."""
    from lawm.data.features import feature_dataset

    samples = sorted((s for s in feature_dataset(path, split=split, shuffle=0) if set(labels) <= set(s["labels"])),
                     key=lambda s: s["key"])
    if not samples:
        raise ValueError(f"no {split} clips{' with labels ' + ', '.join(labels) if labels else ''} in {path}")
    shapes = {tuple(s["feats"].shape) for s in samples}
    if len(shapes) > 1:
        raise ValueError(f"{path} ({split}): clips of different shapes {sorted(shapes)}; evaluate one shape at a time")
    if max_clips and len(samples) > max_clips:
        keep = np.sort(np.random.default_rng(seed).choice(len(samples), max_clips, replace=False))
        samples = [samples[i] for i in keep]
    label_names = set.intersection(*(set(s["labels"]) for s in samples))
    labels = {k: torch.stack([s["labels"][k] for s in samples]) for k in sorted(label_names)}
    return FeatureSet(torch.stack([s["feats"] for s in samples]), [s["key"] for s in samples],
                      [s["meta"] for s in samples], labels)


def partner_index(groups: list[str]) -> np.ndarray:
    """For clip i, the next clip (cyclically, in the given order) whose group differs: pairs across videos."""
    n = len(groups)
    if len(set(groups)) < 2:
        raise ValueError(f"pairing clips across videos needs clips of at least two videos, got {len(set(groups))}")
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        j = (i + 1) % n
        while groups[j] == groups[i]:
            j = (j + 1) % n
        out[i] = j
    return out


def random_latents(z: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian latents with the per-dimension mean and std of `z` (all leading dims pooled)."""
    flat = z.reshape(-1, z.shape[-1]).float()
    noise = torch.randn(z.shape, generator=generator, dtype=torch.float32)
    return (flat.mean(0) + noise * flat.std(0)).to(z.dtype)


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per clip (all but the first dim averaged): the world model's own loss."""
    return (a.float() - b.float()).abs().flatten(1).mean(1)


def ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")
