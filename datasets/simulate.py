"""Stage entry: generate the simulated navigation and manipulation data sets (MP4 + sidecar + manifest)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lawm.config import require
from lawm_datasets import sim_manip, sim_nav


@dataclass(kw_only=True)
class SimulateConfig:
    nav: sim_nav.NavConfig = field(default_factory=sim_nav.NavConfig)
    manip: sim_manip.ManipConfig = field(default_factory=sim_manip.ManipConfig)
    use_ray: bool = True  # episodes as Ray tasks; False runs them inline (tests, debugging)
    num_cpus: int = 0  # for a Ray started here; 0 = all

    def validate(self) -> None:
        require(self.num_cpus >= 0, "num_cpus", "must be >= 0")
        self.nav.validate()
        self.manip.validate()


def run_simulate(cfg: SimulateConfig, out_dir: Path) -> dict[str, Any]:
    """Write out_dir/nav and out_dir/manip. Returns manifest paths (None when a section is disabled) and counts."""
    cfg.validate()
    out = Path(out_dir).absolute()
    result: dict[str, Any] = {"nav_manifest": None, "manip_manifest": None}
    for name, section, module in (("nav", cfg.nav, sim_nav), ("manip", cfg.manip, sim_manip)):
        if not section.enabled or section.episodes == 0:
            continue
        start = time.perf_counter()
        manifest = module.generate(section, out / name, use_ray=cfg.use_ray, num_cpus=cfg.num_cpus)
        table = pd.read_parquet(manifest)
        result.update({f"{name}_manifest": str(manifest), f"{name}_episodes": int(table["episode"].nunique()),
                       f"{name}_videos": len(table), f"{name}_val_videos": int((table["split"] == "val").sum()),
                       f"{name}_seconds": round(time.perf_counter() - start, 2)})
    return result
