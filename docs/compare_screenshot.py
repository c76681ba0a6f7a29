"""Screenshot MLflow's compare view of some runs, as a new user would open it: a real `mlflow ui` on 127.0.0.1 over
the given store, headless Chromium on the compare URL, the server stopped afterwards. Made docs/compare.png.

    python docs/compare_screenshot.py --store sqlite:////abs/runs/sweep/mlflow.db --stage train_lam \\
        --tag lawm.sweep=beta --out docs/compare.png
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from infra.local_cluster import free_ports  # noqa: E402
from jobs.report import chromium_exe  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--stage", default="train_lam", help="compare the child runs of this stage")
    ap.add_argument("--tag", default="", help="key=value: only children of parent runs with this tag")
    ap.add_argument("--out", default=str(ROOT / "docs" / "compare.png"))
    args = ap.parse_args()
    import mlflow

    client = mlflow.MlflowClient(args.store)
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, f"tags.`lawm.stage` = '{args.stage}'")
    if args.tag:
        key, value = args.tag.split("=", 1)
        parents = {r.info.run_id for r in client.search_runs(exps, f"tags.`{key}` = '{value}'")}
        runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in parents]
    if len(runs) < 2:
        raise SystemExit(f"need two runs of {args.stage} to compare, found {len(runs)}")
    ids = [r.info.run_id for r in runs]
    port = free_ports(1)[0]
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", args.store,
                               "--host", "127.0.0.1", "--port", str(port)], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps(sorted(set(
            r.info.experiment_id for r in runs)))})
        url = f"http://127.0.0.1:{port}/#/compare-runs?{query}"
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([chromium_exe(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--window-size=1400,1600",
                            f"--screenshot={Path(args.out).absolute()}", url], check=True, capture_output=True,
                           timeout=180)
        print(f"{args.out}: compare view of {len(ids)} {args.stage} runs ({url})")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
