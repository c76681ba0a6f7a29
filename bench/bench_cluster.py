"""The cluster path's overhead and the cost of a rerun that has nothing to do.

Three runs of the same pipeline, one after the other on the same cores:
  (a) local   : `python jobs/full_pipeline.py ...` with local Ray (run.num_cpus=2)
  (b) rerun   : the same command again: every stage skipped (the README's promise: < 30 s)
  (c) cluster : `ray job submit --working-dir <checkout> -- python jobs/full_pipeline.py ...` on a real two-node
                cluster on this machine (infra/local_cluster.py: 2 nodes x 1 CPU = the same 2 CPUs), the time
                including the upload of the working directory and the job's runtime environment
`cluster_over_local` = (c) / (a). By default the pipeline is the test suite's small one (generate → train_lam with
two training workers, ~1-2 min); `--demo` runs `make demo`'s whole pipeline both ways (~40 min on 2 CPUs).

    python bench/bench_cluster.py [--demo]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from infra.local_cluster import LocalCluster, working_dir  # noqa: E402

SMALL_STAGES = "generate,ingest,simulate,ingest_sim,encode,train_lam"


def _command(root: Path, demo: bool) -> list[str]:
    cmd = [sys.executable, "jobs/full_pipeline.py", "--config", "jobs/configs/demo.yaml", f"run.root={root}"]
    if demo:
        return cmd
    from tests.test_pipeline import TINY  # the test suite's small pipeline: one definition of "small"

    return [*cmd, "--stages", SMALL_STAGES, *TINY, "train_lam.scaling.num_workers=2"]


def _local(cmd: list[str]) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"local pipeline failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def main(demo: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        local_root = Path(tmp) / "local"
        local_s, _ = _local(_command(local_root, demo))
        rerun_s, log = _local(_command(local_root, demo))
        summary = next(line for line in log.splitlines() if line.startswith("stages: "))
        stages = summary[len("stages: "):].split(", ")
        if not all(s.endswith("(skipped)") for s in stages):
            raise RuntimeError(f"the rerun was not all skipped: {summary}")
        with LocalCluster(nodes=[{"num_cpus": 1}, {"num_cpus": 1}]) as cluster:
            wd = working_dir(cluster.base / "wd", ROOT)
            t0 = time.perf_counter()
            ok, job_log = cluster.submit(_command(cluster.base / "root", demo), working_dir=wd, timeout=3600)
            cluster_s = time.perf_counter() - t0
            if not ok:
                raise RuntimeError(f"cluster job failed:\n{job_log[-3000:]}")
    return {"pipeline": "make demo's" if demo else f"small ({SMALL_STAGES})", "cpus": 2,
            "local_s": round(local_s, 1), "cluster_s": round(cluster_s, 1),
            "cluster_over_local": round(cluster_s / local_s, 3), "stages_rerun": len(stages),
            "all_skipped_rerun_s": round(rerun_s, 1), "all_skipped_goal_s": 30}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", action="store_true", help="the whole demo pipeline, both ways (~40 min)")
    print(json.dumps(main(parser.parse_args().demo), indent=1))
