"""`ray job submit` on a real two-node Ray cluster on this machine: a head and a second node, separate node processes
with their own temp dirs and ports, the second carrying a custom resource. The job runs the pipeline from generate
to train_lam, shipped as a working directory holding an edit to `datasets/` that was never installed.

It proves: the job succeeded and its outputs and MLflow runs exist; Ray Data's encode actors and Ray Train's workers
ran on both nodes; every process that imported `lawm_datasets` (the driver and workers on both nodes) imported the
uploaded copy, not the installed checkout."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = "generate,ingest,simulate,ingest_sim,encode,train_lam"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _node_ports(flag_ports: list[int]) -> list[str]:
    names = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
    return [f"{name}={port}" for name, port in zip(names, flag_ports)]


def _kill_cluster(base: Path) -> None:
    """SIGKILL every process whose command line names this cluster's temp dirs (never `ray stop`: it would also
    stop the test session's own local Ray); a node's workers exit with their raylet."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if str(base).encode() in cmd and int(proc.name) != os.getpid():
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def two_nodes():
    # short paths: Ray's unix sockets live under the temp dir and a socket path has ~107 characters at most
    base = Path(tempfile.mkdtemp(prefix="lawm-rc-", dir="/tmp"))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, client, *ports = _free_ports(15)
    common = ["--num-cpus=1", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    head = [str(BIN / "ray"), "start", "--head", f"--port={gcs}", f"--temp-dir={base / 'head'}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}", *_node_ports(ports[:6]), *common]
    second = [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", f"--temp-dir={base / 'n2'}",
              '--resources={"second_node": 1}', *_node_ports(ports[6:12]), *common]
    try:
        for cmd in (head, second):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        probe = ("import ray, time\nray.init(address='127.0.0.1:%d', logging_level='ERROR')\n"
                 "for _ in range(120):\n    alive = [n for n in ray.nodes() if n['Alive']]\n"
                 "    if len(alive) == 2: break\n    time.sleep(1)\nprint(json.dumps([n['Resources'] for n in alive]))"
                 % gcs)
        done = subprocess.run([sys.executable, "-c", "import json\n" + probe], env=env, capture_output=True,
                              text=True, timeout=180)
        resources = json.loads(done.stdout.strip().splitlines()[-1])
        assert len(resources) == 2 and sum("second_node" in r for r in resources) == 1, resources
        yield {"base": base, "env": env, "dashboard": f"http://127.0.0.1:{dash}"}
    finally:
        _kill_cluster(base)
        time.sleep(1)
        shutil.rmtree(base, ignore_errors=True)


def _working_dir(dest: Path) -> Path:
    """The checkout as `git` sees it (tracked and new files, nothing ignored: no .venv, no runs), plus an edit to
    `datasets/` that was never installed: each process importing it appends its pid and file to a log."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if rel.startswith("runs/") or not (ROOT / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    with (dest / "datasets" / "simcommon.py").open("a") as f:
        f.write("\nif os.environ.get('LAWM_TEST_IMPORT_LOG'):\n"
                "    with open(os.environ['LAWM_TEST_IMPORT_LOG'], 'a') as _log:\n"
                "        _log.write(f'{os.getpid()} {__file__}\\n')\n")
    return dest


def _ray_list(kind: str, cluster: dict) -> list[dict]:
    out = subprocess.run([str(BIN / "ray"), "list", kind, "--address", cluster["dashboard"], "--format", "json",
                          "--limit", "10000", "--detail"], env=cluster["env"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return json.loads(out)


def test_ray_job_submit_runs_on_both_nodes_with_the_uploaded_code(two_nodes, tmp_path):
    from tests.test_pipeline import TINY

    cluster = two_nodes
    wd = _working_dir(cluster["base"] / "wd")
    root, imports = cluster["base"] / "root", cluster["base"] / "imports.log"
    runtime_env = {"env_vars": {"LAWM_TEST_IMPORT_LOG": str(imports)}}
    sub_id = f"lawm-test-{secrets.token_hex(4)}"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster["dashboard"], "--submission-id", sub_id,
           "--working-dir", str(wd), "--runtime-env-json", json.dumps(runtime_env), "--",
           sys.executable, "jobs/full_pipeline.py", "--config", "jobs/configs/demo.yaml", f"run.root={root}",
           "--stages", STAGES, *TINY, "train_lam.scaling.num_workers=2", "train_lam.train.steps=10",
           "train_lam.train.ckpt_every=5"]
    done = subprocess.run(cmd, cwd=tmp_path, env=cluster["env"], capture_output=True, text=True, timeout=900)
    log = done.stdout + done.stderr
    status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", cluster["dashboard"], sub_id],
                            env=cluster["env"], capture_output=True, text=True, timeout=60).stdout
    assert done.returncode == 0 and "succeeded" in status.lower(), log[-6000:]

    # outputs and MLflow runs, on storage both nodes see (here: one machine's disk)
    for stage in STAGES.split(","):
        assert json.loads((root / stage / "_stage.json").read_text())["stage"] == stage
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    finished = {r.data.tags.get("lawm.stage") for r in runs if r.info.status == "FINISHED"}
    assert set(STAGES.split(",")) <= finished

    # both nodes worked: encode's actor pool and the two training workers were spread over them
    nodes = {n["node_id"] for n in _ray_list("nodes", cluster)}
    actors = _ray_list("actors", cluster)
    by_class = {}
    for a in actors:
        by_class.setdefault(a["class_name"], set()).add(a["node_id"])
    encode = set().union(*(v for k, v in by_class.items() if "EncodeActor" in k))
    assert len(nodes) == 2 and encode == nodes, by_class
    assert by_class.get("RayTrainWorker") == nodes, by_class

    # every import of lawm_datasets came from the uploaded working directory, in processes on both nodes
    lines = [line.split(" ", 1) for line in imports.read_text().splitlines()]
    paths = {p for _, p in lines}
    assert len({pid for pid, _ in lines}) >= 3, lines  # the driver and workers
    assert all(p.startswith(str(cluster["base"])) and "runtime_resources" in p for p in paths), paths
    assert {p.split("/")[3] for p in paths} == {"head", "n2"}, paths  # /tmp/lawm-rc-x/<node>/...
    assert not any(p.startswith(str(ROOT)) for p in paths)
