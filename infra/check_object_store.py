"""An object-store run root on a multi-node Ray cluster whose nodes do not share their mirrors: the check that the test
suite cannot make (it needs root, for mount namespaces, and ~3 minutes).

    sudo .venv/bin/python infra/check_object_store.py        # from the repository root; prints what it found

It starts a local S3 (moto_server), an MLflow tracking server (infra/mlflow/serve.sh) and a three-node cluster
(infra/local_cluster.py, 1 CPU each) whose two worker nodes see a folder of their own at LAWM_MIRROR_DIR, so a file
one node writes into its mirror reaches another only through the store. Then, as a user would:

    ray job submit --working-dir <checkout> --runtime-env-json '{"env_vars": {AWS_*, LAWM_MIRROR_DIR,
        MLFLOW_TRACKING_URI}}' -- python jobs/full_pipeline.py --config jobs/configs/demo.yaml
        run.root=s3://lawm-check/run --stages generate,ingest,simulate,ingest_sim,encode,train_lam,eval_probe
        <small settings> train_lam.scaling.num_workers=2

It checks: the job succeeded; every stage's marker is in the bucket; both worker nodes' mirrors hold files (work ran
there, and what it read came from the store); the training stage finished in the tracking server. Exit 1 on a failed
check, with the reason.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from infra.local_cluster import BIN, LocalCluster, free_ports, working_dir  # noqa: E402

STAGES = "generate,ingest,simulate,ingest_sim,encode,train_lam,eval_probe"
SMALL = ["generate.synthetic.n_videos=6", "generate.synthetic.val_fraction=0.3", "generate.synthetic.seconds=5",
         "generate.synthetic.size=[64,64]", "generate.real_samples=false", "ingest.size=32", "ingest.min_shards=2",
         "simulate.manip.enabled=false", "simulate.nav.episodes=4", "simulate.nav.val_fraction=0.5",
         "simulate.nav.steps=24", "simulate.nav.width=64", "simulate.nav.height=64", "ingest_sim.size=32",
         "ingest_sim.min_shards=2", "encode.encoder.patch_size=8", "train_lam.scaling.num_workers=2",
         "train_lam.train.steps=40", "train_lam.train.log_every=10", "train_lam.train.ckpt_every=20",
         "train_lam.train.batch_size=4", "train_lam.train.loader_workers=0"]


def _wait(url: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            sys.exit(f"{what} exited ({proc.returncode})")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                sys.exit(f"{what} did not answer at {url}")
            time.sleep(0.5)


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as reply:
        return json.loads(reply.read())


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def main() -> int:
    if os.geteuid() != 0:
        sys.exit("needs root: the worker nodes get their own mirror through mount namespaces (unshare -m)")
    base = Path(tempfile.mkdtemp(prefix="lawm-osc-", dir="/tmp"))
    s3_port, mlflow_port = free_ports(2)
    store = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}", "AWS_ACCESS_KEY_ID": "lawm-check",
             "AWS_SECRET_ACCESS_KEY": "lawm-check", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_EC2_METADATA_DISABLED": "true", "LAWM_MIRROR_DIR": str(base / "mirror")}
    mirrors = {name: base / name for name in ("mirror", "node2", "node3")}  # the head's, and one per worker node
    for folder in mirrors.values():
        folder.mkdir()
    servers = []
    try:
        servers.append(_start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
                              {**os.environ, **store}, base / "s3.log"))
        _wait(f"{store['AWS_ENDPOINT_URL']}/moto-api/", servers[-1], "moto_server")
        servers.append(_start(["bash", str(REPO / "infra" / "mlflow" / "serve.sh")],
                              {**os.environ, "PORT": str(mlflow_port), "MLFLOW_DATA_DIR": str(base / "mlflow"),
                               "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}, base / "mlflow.log"))
        tracking = f"http://127.0.0.1:{mlflow_port}"
        _wait(f"{tracking}/health", servers[-1], "the MLflow server")
        import boto3

        boto3.client("s3", endpoint_url=store["AWS_ENDPOINT_URL"], aws_access_key_id="lawm-check",
                     aws_secret_access_key="lawm-check", region_name="us-east-1").create_bucket(Bucket="lawm-check")

        nodes = [{"num_cpus": 1}, *({"num_cpus": 1, "private": {store["LAWM_MIRROR_DIR"]: mirrors[n]}}
                                    for n in ("node2", "node3"))]
        with LocalCluster(nodes=nodes) as cluster:
            start = time.perf_counter()
            ok, log = cluster.submit(
                [sys.executable, "jobs/full_pipeline.py", "--config", "jobs/configs/demo.yaml",
                 "run.root=s3://lawm-check/run", "--stages", STAGES, *SMALL],
                working_dir=working_dir(cluster.base / "wd", REPO),
                runtime_env={"env_vars": {**store, "MLFLOW_TRACKING_URI": tracking}}, timeout=1500)
            seconds = time.perf_counter() - start
            actors = cluster.list_state("actors")
            nodes_of = {a["class_name"]: set() for a in actors}
            for a in actors:
                if a["node_id"]:
                    nodes_of[a["class_name"]].add(a["node_id"])
        (base / "job.log").write_text(log)
        failures = [] if ok else [f"the job failed:\n{log[-4000:]}"]

        s3 = boto3.client("s3", endpoint_url=store["AWS_ENDPOINT_URL"], aws_access_key_id="lawm-check",
                          aws_secret_access_key="lawm-check", region_name="us-east-1")
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="lawm-check")
                for o in page.get("Contents", [])]
        missing = [s for s in STAGES.split(",") if f"run/{s}/_stage.json" not in keys]
        failures += [f"no marker in the bucket for {missing}"] if missing else []
        held = {name: sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
                for name, folder in mirrors.items()}
        failures += [f"{n}'s own mirror is empty: no work ran there" for n in ("node2", "node3") if not held[n]]
        exps = _post(f"{tracking}/api/2.0/mlflow/experiments/search", {"max_results": 100})["experiments"]
        runs = _post(f"{tracking}/api/2.0/mlflow/runs/search",
                     {"experiment_ids": [e["experiment_id"] for e in exps], "max_results": 100}).get("runs", [])
        stages = {t["value"]: r["info"]["status"] for r in runs for t in r["data"].get("tags", [])
                  if t["key"] == "lawm.stage"}
        failures += [] if stages.get("train_lam") == "FINISHED" else [f"train_lam in MLflow: {stages}"]

        print(f"job: {'succeeded' if ok else 'FAILED'} in {seconds:.0f} s; {len(keys)} objects in the bucket")
        for name, files in held.items():
            print(f"{name} mirror: {len(files)} files, e.g. {files[:4]}")
        print("actors by node count: " + ", ".join(f"{k} {len(v)}" for k, v in sorted(nodes_of.items())))
        print(f"MLflow stage runs: {stages}")
        for failure in failures:
            print(f"FAILED: {failure}")
        return 1 if failures else 0
    finally:
        for proc in servers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
