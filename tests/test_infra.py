"""infra/: the deployment files parse and say what the pipeline needs; the MLflow launcher really serves.

The cluster launcher YAML is checked by Ray's own schema validation (after Ray fills in its provider defaults), the
KubeRay/Kubernetes manifests and the Dockerfile by their structure and by their agreement with each other and with
the checkout (Ray version, image tag, WORKDIR, config path, shared mount). `infra/mlflow/serve.sh` is started for
real on a free loopback port, used through MLFLOW_TRACKING_URI by lawm's own tracking code, and stopped by SIGTERM.
"""
from __future__ import annotations

import copy
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
SHARED_MOUNT = "/mnt/lawm"


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def by_kind(path: Path, kind: str) -> dict:
    docs = [d for d in load_all(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, found {len(docs)}"
    return docs[0]


def assert_pinned(image: str) -> None:
    """A registry reference with an explicit, non-moving tag (or a digest)."""
    assert "@sha256:" in image or re.search(r":[\w][\w.-]*$", image.rsplit("/", 1)[-1]), f"{image}: no tag"
    assert not image.endswith(":latest"), f"{image}: ':latest' is not a pin"


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def assert_token_auth(env: dict[str, dict], where: str) -> None:
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE=token missing"
    ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
    assert ref.get("name") and ref.get("key"), f"{where}: RAY_AUTH_TOKEN must come from a Secret"


# ---------------------------------------------------------------------------------------------------------------
# Every YAML parses


def test_every_yaml_in_infra_parses():
    files = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))
    names = {p.relative_to(INFRA).as_posix() for p in files}
    assert {"cluster.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "mlflow/mlflow.yaml"} <= names
    for path in files:
        docs = load_all(path)
        assert docs, f"{path}: empty"
        assert all(isinstance(d, dict) for d in docs), f"{path}: a document is not a mapping"
        text = path.read_text()
        assert ":latest" not in text, f"{path}: unpinned image"
        assert "RAY_AUTH_MODE=disabled" not in text and "value: disabled" not in text, f"{path}: auth turned off"


# ---------------------------------------------------------------------------------------------------------------
# Ray cluster launcher


def test_cluster_launcher_config_passes_rays_validation():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    cfg = prepare_config(copy.deepcopy(raw))  # merges Ray's AWS defaults, as `ray up` does
    validate_config(cfg)

    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["not_a_field"] = 1  # the validator is really looking
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(bad)

    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert not head["resources"].get("GPU"), "the head is a CPU node"
    gpu_groups = {n: t for n, t in types.items() if n != cfg["head_node_type"] and t["resources"].get("GPU")}
    assert gpu_groups, "no GPU worker group"
    for name, group in gpu_groups.items():
        assert group["resources"]["GPU"] == 8, f"{name}: 8 GPUs per node"
        assert 0 <= group["min_workers"] <= group["max_workers"], f"{name}: min/max"
        assert group["max_workers"] >= 1
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cfg["max_workers"]
    assert sum(t.get("max_workers", 0) for n, t in types.items() if n != cfg["head_node_type"]) <= cfg["max_workers"]


def test_cluster_launcher_image_storage_and_auth():
    cfg = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    assert_pinned(cfg["docker"]["image"])
    opts = cfg["docker"]["run_options"]
    assert f"--volume={SHARED_MOUNT}:{SHARED_MOUNT}" in opts, "shared storage is not mounted into the container"
    assert any(SHARED_MOUNT in c and "mount" in c for c in cfg["initialization_commands"]), "nothing mounts it"
    assert "--env=RAY_AUTH_MODE=token" in opts
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), f"{key}: token auth not on"
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])
    # the token travels to every node from the user's machine, never in the image or the repo
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


# ---------------------------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (INFRA / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_base_user_and_install():
    import ray

    ins = dockerfile_instructions()
    froms = [rest for op, rest in ins if op == "FROM"]
    assert len(froms) == 1
    image = froms[0].split()[0]
    assert_pinned(image)
    repo, tag = image.rsplit(":", 1)
    assert repo == "rayproject/ray"
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    # the cluster must run the Ray that submits to it (the one in this venv), on this Python
    assert tag.startswith(f"{ray.__version__}-{py}"), f"base {tag} vs ray {ray.__version__} / {py}"
    assert "gpu" in tag or "cu" in tag, "not a CUDA image"

    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"
    runs = " ".join(rest for op, rest in ins if op == "RUN")
    assert "pip install --no-deps -e ." in runs
    assert "ray==" + ray.__version__ in runs, "pip may move Ray away from the base image's version"
    assert "lawm_datasets" in runs, "the build does not check that lawm_datasets imports"
    for op, rest in ins:
        if op in ("ENV", "ARG"):
            assert not re.search(r"(TOKEN|SECRET|PASSWORD|KEY)\w*\s*=", rest, re.I), f"secret-like {op}: {rest}"
        assert not (op == "COPY" and ("auth_token" in rest or ".ray" in rest)), f"copies a secret: {rest}"
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "runs"} <= set(ignore)


def dockerfile_workdir() -> str:
    return [rest for op, rest in dockerfile_instructions() if op == "WORKDIR"][-1]


# ---------------------------------------------------------------------------------------------------------------
# KubeRay


def all_containers(cluster: dict) -> list[tuple[str, dict, dict]]:
    groups = [("head", cluster["spec"]["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster["spec"]["workerGroupSpecs"]]
    return [(name, g, c) for name, g in groups for c in g["template"]["spec"]["containers"]]


def test_raycluster():
    import ray

    path = INFRA / "kuberay" / "raycluster.yaml"
    cluster = by_kind(path, "RayCluster")
    pvc = by_kind(path, "PersistentVolumeClaim")
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["rayVersion"] == ray.__version__
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "every node must see stage outputs"

    mlflow_svc = by_kind(INFRA / "mlflow" / "mlflow.yaml", "Service")
    ns = mlflow_svc["metadata"]["namespace"]
    port = mlflow_svc["spec"]["ports"][0]["port"]
    allowed = {f"http://{mlflow_svc['metadata']['name']}{sfx}:{port}" for sfx in ("", f".{ns}", f".{ns}.svc",
                                                                                 f".{ns}.svc.cluster.local")}
    images = set()
    gpu_groups = []
    for name, group, container in all_containers(cluster):
        images.add(container["image"])
        env = env_of(container)
        assert_token_auth(env, name)
        assert env["MLFLOW_TRACKING_URI"]["value"] in allowed, f"{name}: MLflow URI is not the Service"
        mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName")
                  for v in group["template"]["spec"]["volumes"]}
        shared = [n for n, c in claims.items() if c == pvc["metadata"]["name"]]
        assert shared and mounts.get(shared[0]) == SHARED_MOUNT, f"{name}: shared volume not at {SHARED_MOUNT}"
        gpus = int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        if name != "head" and gpus:
            gpu_groups.append(group)
            assert gpus == 8
            assert mounts.get("dshm") == "/dev/shm", f"{name}: /dev/shm stays at 64 MiB"
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        if name == "head":
            assert gpus == 0
    assert gpu_groups, "no GPU worker group"
    assert len(images) == 1
    image = images.pop()
    assert_pinned(image)
    launcher_image = yaml.safe_load((INFRA / "cluster.yaml").read_text())["docker"]["image"]
    assert image.rsplit(":", 1)[1] == launcher_image.rsplit(":", 1)[1], "the two deployments run different tags"
    assert_token_auth({e["name"]: e for e in cluster["spec"]["autoscalerOptions"]["env"]}, "autoscaler")


def test_rayjob_runs_the_pipeline_on_shared_storage():
    job = by_kind(INFRA / "kuberay" / "rayjob.yaml", "RayJob")
    cluster = by_kind(INFRA / "kuberay" / "raycluster.yaml", "RayCluster")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert job["metadata"]["namespace"] == cluster["metadata"]["namespace"]

    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python"
    workdir = dockerfile_workdir().rstrip("/") + "/"

    def in_repo(p: str) -> Path:
        assert p.startswith(workdir), f"{p}: not in the image's checkout {workdir}"
        return REPO / p[len(workdir):]

    assert argv[1].endswith("jobs/full_pipeline.py") and in_repo(argv[1]).is_file()
    config = in_repo(argv[argv.index("--config") + 1])
    assert config.is_file(), f"the RayJob runs {config.relative_to(REPO)}, which does not exist"
    overrides = [a for a in argv[2:] if "=" in a and not a.startswith("--")]
    roots = [a.split("=", 1)[1] for a in overrides if a.startswith("run.root=")]
    assert roots and roots[0].startswith(SHARED_MOUNT + "/"), "run.root must be on the shared volume"

    # the config, with these overrides, passes the pipeline's own validation
    from jobs.config import PipelineConfig
    from lawm.config import load

    cfg = load(PipelineConfig, config, overrides)
    assert cfg.run.root == roots[0]

    submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    assert_token_auth(env_of(submitter), "submitter")
    assert submitter["image"] == all_containers(cluster)[0][2]["image"]


def test_mlflow_manifest():
    path = INFRA / "mlflow" / "mlflow.yaml"
    dep, svc = by_kind(path, "Deployment"), by_kind(path, "Service")
    by_kind(path, "PersistentVolumeClaim")
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert_pinned(container["image"])
    import mlflow

    assert container["image"].endswith(f":v{mlflow.__version__}"), "server and clients should be one MLflow"
    args = container["command"] + container["args"]
    assert args[:2] == ["mlflow", "server"]
    opts = dict(a.split("=", 1) for a in args[2:])
    assert opts["--backend-store-uri"].startswith(("sqlite:////", "postgresql"))
    hosts = opts["--allowed-hosts"].split(",")
    ns = svc["metadata"]["namespace"]
    assert f"{svc['metadata']['name']}.{ns}.svc.cluster.local:{svc['spec']['ports'][0]['port']}" in hosts
    assert "*" not in hosts
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    for key in ("--backend-store-uri", "--artifacts-destination"):
        local = opts[key].removeprefix("sqlite:///")
        assert any(local.startswith(m + "/") for m in mounted), f"{key} is not on the volume"
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert pod["securityContext"]["runAsNonRoot"] is True


# ---------------------------------------------------------------------------------------------------------------
# infra/mlflow/serve.sh, for real


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str, host: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def listening(pid: int) -> set[tuple[str, int]]:
    import psutil

    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    out = set()
    for p in procs:
        try:
            out |= {(c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet") if c.status == "LISTEN"}
        except psutil.NoSuchProcess:
            pass
    return out


LOG_WITH_LAWM_TRACKING = textwrap.dedent("""
    import sys
    from pathlib import Path
    from jobs import tracking
    uri = tracking.setup(Path(sys.argv[1]), "infra-test")
    assert uri.startswith("http://127.0.0.1:"), uri
    with tracking.start_parent("infra-test", {"lawm.git_commit": "test"}):
        with tracking.start_stage("ingest", {"fps": 4.0, "size": 64}, {"lawm.config_hash": "abc"}):
            tracking.log_metrics({"clips": 12, "hours": 0.5})
            note = Path(sys.argv[1]) / "note.txt"
            note.parent.mkdir(parents=True, exist_ok=True)
            note.write_text("hello")
            tracking.log_artifact(note)
""")


def test_serve_sh_serves_on_loopback_and_stops_on_sigterm(tmp_path):
    import psutil
    from mlflow import MlflowClient

    port = free_port()
    data = tmp_path / "mlflow data"  # a space: paths are arguments, never shell text
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PORT=str(port), MLFLOW_DATA_DIR=str(data), ALLOWED_HOSTS=f"mlflow.test:{port},127.0.0.1:*,localhost:*")
    env.pop("HOST", None)  # the default must be loopback
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's mlflow
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(["bash", str(INFRA / "mlflow" / "serve.sh")], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60  # ~20 s measured on the shared 2 cores, cold
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if http_status(url + "/health") == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "no /health in 60 s:\n" + (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)

        # exec: the script's pid is MLflow itself; it and its workers listen on 127.0.0.1 only
        cmd = psutil.Process(proc.pid).cmdline()
        assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--workers") + 1] == "1"
        socks = listening(proc.pid)
        assert (("127.0.0.1", port)) in socks
        assert all(ip == "127.0.0.1" for ip, _ in socks), socks

        # --allowed-hosts is passed through: a foreign Host header is refused, a listed one accepted
        api = url + "/api/2.0/mlflow/experiments/search?max_results=1"
        assert http_status(api, host="evil.example.com") == 403
        assert http_status(api, host=f"mlflow.test:{port}") == 200

        # lawm's own tracking code, pointed at the server by MLFLOW_TRACKING_URI, in a separate process
        run_env = {**env, "MLFLOW_TRACKING_URI": url}
        out = subprocess.run([sys.executable, "-c", LOG_WITH_LAWM_TRACKING, str(tmp_path / "root")], env=run_env,
                             cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]

        client = MlflowClient(tracking_uri=url)
        exp = client.get_experiment_by_name("infra-test")
        runs = client.search_runs([exp.experiment_id])
        child = [r for r in runs if r.data.tags.get("lawm.stage") == "ingest"]
        assert len(runs) == 2 and len(child) == 1
        child = child[0]
        assert child.data.metrics == {"clips": 12.0, "hours": 0.5}
        assert child.data.params == {"fps": "4.0", "size": "64"}
        assert {a.path for a in client.list_artifacts(child.info.run_id)} == {"config.yaml", "note.txt"}
        assert not (tmp_path / "root" / "mlflow.db").exists(), "the client used a local store, not the server"
        # artifacts went through the server into its destination folder
        assert list((data / "artifacts").rglob("note.txt")), "artifacts are not in the server's destination"
        assert (data / "mlflow.db").is_file()
    finally:
        children = []
        if proc.poll() is None:
            children = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
            _, alive = psutil.wait_procs(children, timeout=15)
        except subprocess.TimeoutExpired:
            rc, alive = None, children
        finally:
            try:  # never leave a server behind, whatever happened above
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            log.close()
    assert rc is not None, "serve.sh did not stop on SIGTERM within 30 s"
    assert rc in (0, -signal.SIGTERM, 128 + signal.SIGTERM), rc
    assert not alive, f"server processes left behind after SIGTERM: {alive}"
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):  # nothing listens there any more
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
