"""`make bench`: every benchmark, each a ratio against a baseline measured in the same process where the figure
asks for one. Results go to bench/results/<name>.json.

    python bench/run_all.py [--only ingest,train] [--quick]
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

BENCHES = ["bench_ingest", "bench_models", "bench_datasets", "bench_train", "bench_encode", "bench_planning",
           "bench_cluster"]
QUICK_ARGS = {"bench_ingest": {"quick": True}, "bench_encode": {"quick": True}, "bench_planning": {"quick": True}}
# a full run measures the cluster path on make demo's whole pipeline (~40 min on 2 CPUs); --quick on the small one
FULL_ARGS = {"bench_cluster": {"demo": True}}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="", help="comma-separated subset, e.g. ingest,train")
    parser.add_argument("--quick", action="store_true", help="smaller inputs where a bench supports it")
    args = parser.parse_args()
    wanted = [f"bench_{n}" for n in args.only.split(",") if n] or BENCHES
    out_dir = ROOT / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in wanted:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            result = importlib.import_module(name).main(**(QUICK_ARGS if args.quick else FULL_ARGS).get(name, {}))
        except Exception as err:  # one broken bench must not hide the others
            print(f"{name} failed: {err.__class__.__name__}: {err}", flush=True)
            failed.append(name)
            continue
        (out_dir / f"{name}.json").write_text(json.dumps({"seconds": time.perf_counter() - t0, "result": result},
                                                         indent=1, default=str))
    print(f"results in {out_dir}" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
