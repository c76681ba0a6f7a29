"""infra/: the deployment files parse and say what the pipeline needs; the MLflow launcher really serves.

The cluster launcher YAML is checked against the JSON schema shipped inside the installed `ray` package and by Ray's
own validation (after Ray fills in its provider defaults), the KubeRay/Kubernetes manifests and the Dockerfile by
their structure and by their agreement with each other and with the checkout (Ray version, image tag, WORKDIR, config
path, shared mount). Least privilege is checked where it is written: no sudo grant left for `ray` in the image, every
Kubernetes container without capabilities or privilege escalation, MLflow reachable from the Ray pods only; each
checker is also shown a deliberately broken copy and must object. `infra/mlflow/serve.sh` is started for real on a
free loopback port, used through MLFLOW_TRACKING_URI by lawm's own tracking code, and stopped by SIGTERM.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import MlflowServer
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


def test_cluster_launcher_config_validates_against_the_schema_shipped_with_ray():
    import jsonschema
    import ray

    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    raw = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    jsonschema.validate(raw, schema)  # the file as written, before Ray merges any defaults into it

    broken = {
        "a misspelt top-level key": lambda c: c.update(max_worker=c.pop("max_workers")),
        "a count that is text": lambda c: c.update(max_workers="sixteen"),
        "no cluster name": lambda c: c.pop("cluster_name"),
        "a node type without node_config": lambda c: c["available_node_types"]["gpu_h100x8"].pop("node_config"),
        "a provider without a type": lambda c: c["provider"].pop("type"),
        "docker without an image field name": lambda c: c["docker"].update(imagee=c["docker"].pop("image")),
    }
    for what, breaks in broken.items():
        bad = copy.deepcopy(raw)
        breaks(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
            pytest.fail(f"the schema accepted {what}")


def test_cluster_launcher_container_has_no_privileges():
    opts = yaml.safe_load((INFRA / "cluster.yaml").read_text())["docker"]["run_options"]
    assert "--cap-drop=ALL" in opts and "--security-opt=no-new-privileges" in opts
    assert not any(o.startswith(("--privileged", "--cap-add", "--user=root", "--user=0")) for o in opts), opts


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


def dockerfile_instructions(text: str | None = None) -> list[tuple[str, str]]:
    text = (INFRA / "Dockerfile").read_text() if text is None else text
    text = text.replace("\\\n", " ")
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


# What would give `ray` root again: a sudoers line for it, sudo-group membership, a setuid bit, any sudoers edit.
GRANTS = re.compile(r"NOPASSWD|/etc/sudoers|usermod\s+(-\w*a\w*G|-G)\s*\S*\b(sudo|admin|wheel)\b"
                    r"|adduser\s+ray\s+(sudo|admin|wheel)|gpasswd\s+-a|chmod\s+[^ ]*[ug]\+s|chmod\s+[2467][0-7]{3}\b")


def sudo_problems(text: str) -> list[str]:
    """Why `ray` could still become root in the image this Dockerfile builds (empty: it cannot).

    The upstream base image appends `ray ALL=NOPASSWD: ALL` to /etc/sudoers and puts `ray` in the `sudo` group
    (ray-project/ray, docker/base-deps/Dockerfile). Wanted: as root, a RUN that deletes ray's sudoers lines and takes it
    out of the group; after it, nothing that grants anything back; the image ending as a non-root user; and, as that
    user, a RUN that fails the build if `sudo -n` still works.
    """
    ins = dockerfile_instructions(text)
    problems = []
    user, removal = "root?", None  # the base image's last USER is ray; unknown until the Dockerfile says
    for i, (op, rest) in enumerate(ins):
        if op == "USER":
            user = rest.split(":")[0]
        elif op == "RUN" and re.search(r"sed\s+-i\S*\s.*\bray\b.*/etc/sudoers", rest) and "gpasswd -d ray sudo" in rest:
            if user in ("root", "0"):
                removal = i
            else:
                problems.append(f"the sudoers edit runs as {user!r}, not root: it cannot work")
    if removal is None:
        return problems + ["no RUN as root removes ray's sudoers line and sudo group membership"]
    for op, rest in ins[removal + 1:]:
        if GRANTS.search(rest) or (op == "COPY" and "sudoers" in rest):
            problems.append(f"after the removal, this grants root again: {op} {rest}")
    users = [rest.split(":")[0] for op, rest in ins if op == "USER"]
    if not users or users[-1] in ("root", "0"):
        problems.append("the image does not end as a non-root user")
    last_user = max(i for i, (op, _) in enumerate(ins) if op == "USER")
    if not any(op == "RUN" and "sudo -n true" in rest and "exit 1" in rest for op, rest in ins[last_user + 1:]):
        problems.append("no RUN as the final user proves that `sudo -n` is refused")
    return problems


def test_dockerfile_leaves_ray_no_way_to_root():
    text = (INFRA / "Dockerfile").read_text()
    assert sudo_problems(text) == []

    removal = next(line for line in text.splitlines() if line.startswith("RUN sed -i") and "/etc/sudoers" in line)
    check = next(line for line in text.splitlines() if "sudo -n true" in line)
    last_user = [line for line in text.splitlines() if line.startswith("USER ")][-1]
    tail = text.rstrip("\n") + "\n"
    broken = {
        "the upstream grant appended again": tail + "USER root\nRUN echo 'ray ALL=NOPASSWD: ALL' >> /etc/sudoers\n"
                                                    + last_user + "\n",
        "ray put back in the sudo group": tail + "USER root\nRUN usermod -aG sudo ray\n" + last_user + "\n",
        "a setuid shell": tail + "USER root\nRUN cp /bin/bash /usr/local/bin/sh2 && chmod u+s /usr/local/bin/sh2\n"
                                 + last_user + "\n",
        "a sudoers.d file copied in": tail + "COPY infra/ray-sudo /etc/sudoers.d/ray\n",
        "the removal dropped": text.replace(removal, "RUN true"),
        "the removal run as ray": text.replace("USER root\n", "USER ray\n", 1),
        "the image ending as root": tail + "USER root\n",
        "the sudo check dropped": text.replace(check, ""),
    }
    for what, copy_text in broken.items():
        assert sudo_problems(copy_text), f"not caught: {what}"


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


def security_problems(pod_spec: dict, container: dict, where: str) -> list[str]:
    """Why this container could gain privileges (empty: it cannot). Pod-level fields count where Kubernetes applies
    them to the container (runAsNonRoot, runAsUser, seccompProfile); the rest must be on the container itself."""
    pod = pod_spec.get("securityContext", {})
    own = container.get("securityContext", {})

    def eff(key):
        return own.get(key, pod.get(key))

    problems = []
    if own.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation is not false")
    caps = own.get("capabilities", {})
    if "ALL" not in caps.get("drop", []) or caps.get("add"):
        problems.append(f"{where}: capabilities are not all dropped ({caps})")
    if eff("runAsNonRoot") is not True:
        problems.append(f"{where}: runAsNonRoot is not true")
    if eff("runAsUser") == 0:
        problems.append(f"{where}: runs as uid 0")
    if (eff("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append(f"{where}: seccompProfile is not RuntimeDefault")
    if own.get("privileged"):
        problems.append(f"{where}: privileged")
    return problems


def every_pod_container(path: Path) -> list[tuple[str, dict, dict]]:
    """(where, pod spec, container) for every container that any manifest in `path` will start."""
    out = []
    for doc in load_all(path):
        kind, spec = doc["kind"], doc.get("spec", {})
        if kind == "RayCluster":
            head_pod = spec["headGroupSpec"]["template"]["spec"]
            # the autoscaler is a sidecar in the head pod: the pod's context applies to it too
            autoscaler = {"securityContext": spec["autoscalerOptions"].get("securityContext", {})}
            out.append(("autoscaler", head_pod, autoscaler))
            out += [(f"RayCluster/{name}/{c['name']}", g["template"]["spec"], c) for name, g, c in all_containers(doc)]
        elif kind == "RayJob":
            pod = spec["submitterPodTemplate"]["spec"]
            out += [(f"RayJob/{c['name']}", pod, c) for c in pod["containers"]]
        elif kind in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            pod = spec["template"]["spec"]
            out += [(f"{kind}/{c['name']}", pod, c) for c in pod.get("initContainers", []) + pod["containers"]]
        else:
            assert "template" not in spec, f"{path.name}: {kind} starts pods that this test does not look at"
    return out


def test_every_pod_runs_unprivileged():
    found = []
    for path in (INFRA / "kuberay" / "raycluster.yaml", INFRA / "kuberay" / "rayjob.yaml",
                 INFRA / "mlflow" / "mlflow.yaml"):
        containers = every_pod_container(path)
        assert containers, f"{path.name}: no containers found"
        for where, pod, container in containers:
            assert security_problems(pod, container, where) == []
            found.append(where)
    # head, both worker groups, the autoscaler, the submitter and MLflow
    assert len(found) == 6, found

    # the checker objects to each weakening, on a copy of the real head container
    cluster = by_kind(INFRA / "kuberay" / "raycluster.yaml", "RayCluster")
    _, group, container = all_containers(cluster)[0]
    pod = group["template"]["spec"]
    weakened = {
        "escalation allowed": lambda p, c: c["securityContext"].update(allowPrivilegeEscalation=True),
        "escalation unset": lambda p, c: c["securityContext"].pop("allowPrivilegeEscalation"),
        "a capability added": lambda p, c: c["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
        "capabilities kept": lambda p, c: c["securityContext"].pop("capabilities"),
        "root allowed": lambda p, c: [ctx.pop("runAsNonRoot") for ctx in (c["securityContext"], p["securityContext"])],
        "uid 0": lambda p, c: c["securityContext"].update(runAsUser=0),
        "unconfined seccomp": lambda p, c: c["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        "privileged": lambda p, c: c["securityContext"].update(privileged=True),
    }
    for what, weaken in weakened.items():
        p, c = copy.deepcopy(pod), copy.deepcopy(container)
        weaken(p, c)
        assert security_problems(p, c, what), f"not caught: {what}"


def test_mlflow_admits_only_the_ray_pods():
    path = INFRA / "mlflow" / "mlflow.yaml"
    dep, svc, policy = by_kind(path, "Deployment"), by_kind(path, "Service"), by_kind(path, "NetworkPolicy")
    cluster = by_kind(INFRA / "kuberay" / "raycluster.yaml", "RayCluster")
    mlflow_labels = dep["spec"]["template"]["metadata"]["labels"]
    ray_pods = [cluster["spec"]["headGroupSpec"]] + cluster["spec"]["workerGroupSpecs"]
    ray_labels = [g["template"].get("metadata", {}).get("labels", {}) for g in ray_pods]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    server_ports = {p["name"] for p in container["ports"]} | {p["containerPort"] for p in container["ports"]}

    def admitted(labels: dict, namespace: str, port) -> bool:
        """Does `policy` let a pod with these labels, in this namespace, reach the MLflow pod on this port?"""
        if not policy["spec"]["podSelector"]["matchLabels"].items() <= mlflow_labels.items():
            return True  # the policy does not even select the MLflow pod: everything is admitted
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and not any(p.get("port") in (port, None) for p in ports):
                continue
            peers = rule.get("from")
            if not peers:
                return True  # a rule without `from` admits every source
            for peer in peers:
                assert set(peer) <= {"podSelector", "namespaceSelector", "ipBlock"}, peer
                if "ipBlock" in peer or "namespaceSelector" in peer:
                    return True  # CIDRs hold pod IPs, and other namespaces' pods are not what this policy is for
                if namespace != policy["metadata"]["namespace"]:
                    continue  # a podSelector alone picks pods of the policy's own namespace
                sel = peer.get("podSelector", {})
                if sel.get("matchExpressions") or sel.get("matchLabels", {}).items() <= labels.items():
                    return True  # expressions are not evaluated here: counted as admitting
        return False

    ns = policy["metadata"]["namespace"]
    assert ns == dep["metadata"]["namespace"] == svc["metadata"]["namespace"] == cluster["metadata"]["namespace"]
    port = svc["spec"]["ports"][0]["targetPort"]
    assert port in server_ports
    for labels in ray_labels:
        assert admitted(labels, ns, port), f"a Ray pod ({labels}) cannot reach MLflow"
    assert not admitted({}, ns, port), "a pod without labels reaches MLflow"
    assert not admitted({"app": "something-else"}, ns, port)
    assert not admitted(ray_labels[0], "other-namespace", port), "pods of other namespaces reach MLflow"
    assert not any(p.get("namespaceSelector") is not None or "ipBlock" in p
                   for r in policy["spec"]["ingress"] for p in r.get("from", [])), "open beyond the Ray pods"

    # the same judge on broken copies: each must let someone else in
    for what, breaks in {
        "a rule without from": lambda q: q["spec"]["ingress"][0].pop("from"),
        "an empty pod selector": lambda q: q["spec"]["ingress"][0]["from"][0].update(podSelector={}),
        "selecting another pod": lambda q: q["spec"].update(podSelector={"matchLabels": {"app": "not-mlflow"}}),
        "a second, open rule": lambda q: q["spec"]["ingress"].append({}),
        "a peer from any namespace": lambda q: q["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}}),
    }.items():
        original = copy.deepcopy(policy)
        breaks(policy)
        try:
            assert admitted({}, ns, port), f"not caught: {what}"
        finally:
            policy.clear()
            policy.update(original)


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

    server = MlflowServer(tmp_path, timeout=60, data_name="mlflow data")  # a space: paths are arguments, not shell
    port, data, url = server.port, server.data, server.url
    server.extra_env["ALLOWED_HOSTS"] = f"mlflow.test:{port},127.0.0.1:*,localhost:*"
    with server:
        proc, env = server.proc, server.env
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
    rc, alive = server.rc, server.alive
    assert rc is not None, "serve.sh did not stop on SIGTERM within 30 s"
    assert rc in (0, -signal.SIGTERM, 128 + signal.SIGTERM), rc
    assert not alive, f"server processes left behind after SIGTERM: {alive}"
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):  # nothing listens there any more
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
