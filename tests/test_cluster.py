"""`ray job submit` on a real multi-node Ray cluster on this machine: separate node processes with their own temp
dirs and ports, one carrying a custom resource. The job runs the pipeline from generate to train_lam, shipped as a
working directory holding an edit to `datasets/` that was never installed, and loses a worker node mid-training.

It proves: the job succeeded and its outputs exist; every stage logged through a real MLflow tracking server (what
`make mlflow-server` starts), training workers on other nodes than the head included, and nothing went to a local
store; Ray Data's encode actors and Ray Train's workers ran on several nodes; training survived the lost node through
its checkpoint; every process that imported `lawm_datasets` (the driver and workers on several nodes) imported the
uploaded copy, not the installed checkout."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from conftest import MlflowServer, rest
from infra.local_cluster import LocalCluster, working_dir

ROOT = Path(__file__).resolve().parents[1]
STAGES = "generate,ingest,simulate,ingest_sim,encode,train_lam"


def _working_dir(dest: Path) -> Path:
    """The checkout plus an edit to `datasets/` that was never installed: each process importing it appends its pid
    and file to a log."""
    working_dir(dest, ROOT)
    with (dest / "datasets" / "simcommon.py").open("a") as f:
        f.write("\nif os.environ.get('LAWM_TEST_IMPORT_LOG'):\n"
                "    with open(os.environ['LAWM_TEST_IMPORT_LOG'], 'a') as _log:\n"
                "        _log.write(f'{os.getpid()} {__file__}\\n')\n")
    return dest


def test_ray_job_submit_spreads_over_the_nodes_uses_the_uploaded_code_and_survives_a_lost_node():
    """Three nodes of 1 CPU (the second with a custom resource). The job: generate → train_lam, 2 training workers.
    Once train_lam has a checkpoint, the raylet of a node holding a training worker (never the head, where the
    driver and Ray Train's controller live) is killed: Ray Train restarts the worker group on the nodes left, from
    the last checkpoint, and the job still succeeds."""
    import threading
    import time

    from tests.test_pipeline import TINY

    nodes = [{"num_cpus": 1}, {"num_cpus": 1, "resources": {"second_node": 1}}, {"num_cpus": 1}]
    with LocalCluster(nodes=nodes) as cluster, MlflowServer(cluster.base) as server:
        resources = cluster.wait_for_nodes(3)
        assert sum("second_node" in r for r in resources) == 1, resources
        root, imports = cluster.base / "root", cluster.base / "imports.log"
        progress = root / "train_lam" / "progress.jsonl"
        killed: dict = {}

        def kill_a_worker_node():
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline and not killed:
                steps = [json.loads(x).get("step", 0) for x in progress.read_text().splitlines()] \
                    if progress.exists() else []
                if steps and max(steps) >= 60:  # past the checkpoint at step 40
                    head = next(n["node_id"] for n in cluster.list_state("nodes") if n["is_head_node"])
                    victims = sorted({a["node_id"] for a in cluster.list_state("actors")
                                      if a["class_name"] == "RayTrainWorker" and a["state"] == "ALIVE"} - {head})
                    if victims:
                        killed.update(node_id=victims[0], pids=cluster.kill_raylet(victims[0]))
                        return
                time.sleep(0.5)

        watcher = threading.Thread(target=kill_a_worker_node, daemon=True)
        watcher.start()
        ok, log = cluster.submit(
            [sys.executable, "jobs/full_pipeline.py", "--config", "jobs/configs/demo.yaml", f"run.root={root}",
             "--stages", STAGES, *TINY, "train_lam.scaling.num_workers=2", "train_lam.train.steps=400",
             "train_lam.train.ckpt_every=40", "train_lam.train.log_every=10"],
            working_dir=_working_dir(cluster.base / "wd"),
            runtime_env={"env_vars": {"LAWM_TEST_IMPORT_LOG": str(imports), "MLFLOW_TRACKING_URI": server.url}},
            timeout=1200)
        watcher.join(timeout=5)
        assert killed.get("pids"), f"no worker node was killed: {killed}\n{log[-3000:]}"
        assert ok, log[-6000:]

        # outputs on storage every node sees (here: one machine's disk); runs in the tracking server, none local
        for stage in STAGES.split(","):
            assert json.loads((root / stage / "_stage.json").read_text())["stage"] == stage
        assert not (root / "mlflow.db").exists() and not (root / "mlartifacts").exists()
        exps = rest(f"{server.url}/api/2.0/mlflow/experiments/search", {"max_results": 100})["experiments"]
        runs = rest(f"{server.url}/api/2.0/mlflow/runs/search",
                    {"experiment_ids": [e["experiment_id"] for e in exps], "max_results": 100})["runs"]
        tags = lambda run: {t["key"]: t["value"] for t in run["data"].get("tags", [])}  # noqa: E731
        finished = {tags(r).get("lawm.stage"): r for r in runs if r["info"]["status"] == "FINISHED"}
        assert set(STAGES.split(",")) <= set(finished), sorted(finished)
        lam = finished["train_lam"]
        # rank 0 logged its step metrics from a training worker; every rank tagged its node at each (re)start,
        # through the server, from nodes other than the head
        history = rest(f"{server.url}/api/2.0/mlflow/metrics/get-history?run_id={lam['info']['run_id']}"
                       "&metric_key=pred_loss").get("metrics", [])
        assert len({m["step"] for m in history}) >= 10, history
        placed = {k: v for k, v in tags(lam).items() if k.startswith("lawm.worker_node/")}
        head_id = next(n["node_id"] for n in cluster.list_state("nodes") if n["is_head_node"])
        assert {"lawm.worker_node/rank0/step0", "lawm.worker_node/rank1/step0"} <= set(placed), placed
        assert len(placed) >= 4, placed  # the first start and the restart after the lost node
        assert set(placed.values()) - {head_id}, placed

        # training resumed from its checkpoint after the node was lost, and finished
        events = [json.loads(x) for x in progress.read_text().splitlines()]
        starts = [e["step"] for e in events if e.get("event") == "start"]
        assert starts[0] == 0 and len(starts) >= 2 and starts[-1] >= 40, starts  # resumed, not restarted
        assert events[-1]["event"] == "end" and events[-1]["step"] == 400

        # the work was spread: encode's actors and the training workers ran on more than one node
        by_class: dict[str, set] = {}
        for a in cluster.list_state("actors"):
            if a["node_id"]:  # placed (an actor the pool asked for and dropped before placement has no node)
                by_class.setdefault(a["class_name"], set()).add(a["node_id"])
        encode = set().union(*(v for k, v in by_class.items() if "EncodeActor" in k))
        assert len(encode) >= 2 and len(by_class.get("RayTrainWorker", ())) >= 2, by_class
        assert killed["node_id"] in by_class["RayTrainWorker"]
        assert killed["node_id"] in placed.values()  # a worker on the lost node had tagged the run through the server

        # every import of lawm_datasets came from the uploaded working directory, on more than one node
        lines = [line.split(" ", 1) for line in imports.read_text().splitlines()]
        paths = {p for _, p in lines}
        assert len({pid for pid, _ in lines}) >= 3, lines  # the driver and workers
        assert all(p.startswith(str(cluster.base)) and "runtime_resources" in p for p in paths), paths
        assert len({p.split("/")[3] for p in paths}) >= 2, paths  # /tmp/lawm-rc-x/<node>/...
        assert not any(p.startswith(str(ROOT)) for p in paths)
