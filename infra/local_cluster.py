"""A real multi-node Ray cluster on one machine, for tests and benchmarks of the cluster path.

Each node is a separate `ray start` (its own raylet, object store, agents, temp dir and ports: two nodes on one
machine must not share the dashboard agent's default port); the head serves the job API on 127.0.0.1. Token
authentication stays on, with a token made for this cluster. Stopping kills exactly this cluster's processes (found by
their temp dir on the command line), never `ray stop`, which would also stop any other Ray of this user.

    with LocalCluster(nodes=[{"num_cpus": 1}, {"num_cpus": 1, "resources": {"second_node": 1}}]) as c:
        subprocess.run(["ray", "job", "submit", "--address", c.dashboard, ...], env=c.env)

A node may also take `private: {path: folder}`: it then runs in its own mount namespace (root only: `unshare -m`)
where each `path` shows that node's `folder`, as a folder on a machine's own disk would on a real cluster.
"""
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

BIN = Path(sys.executable).parent
# mount --bind each (folder, path) pair given before "--", then exec the rest: file names travel as arguments only
_BIND_THEN_EXEC = 'while [ "$1" != -- ]; do mount --bind "$1" "$2" || exit 1; shift 2; done; shift; exec "$@"'
_PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
               "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LocalCluster:
    """`nodes[0]` is the head; each node dict takes `num_cpus` and optional `resources`. `base` holds every node's
    temp dir: kept short, since Ray's unix sockets live under it and a socket path has ~107 characters at most."""

    def __init__(self, nodes: list[dict], start_timeout_s: float = 180.0):
        self.nodes, self.timeout = nodes, start_timeout_s
        self.base = Path(tempfile.mkdtemp(prefix="lawm-rc-", dir="/tmp"))
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0",
                    # as a local instance polls (pipelines/ray_env.py): the nodes share one machine, and the bench
                    # compares this cluster with local mode
                    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")}
        self.env.pop("RAY_ADDRESS", None)
        self._taken: set[int] = set()  # chosen for this cluster, maybe not bound yet: the OS may offer them again
        self.gcs, dash, self.client_port = self._ports(3)
        self.dashboard = f"http://127.0.0.1:{dash}"

    def _ports(self, n: int) -> list[int]:
        """`n` free ports, none chosen before for this cluster (a node that failed to start on a port chosen twice
        was seen: the dashboard's and a node agent's)."""
        while True:
            ports = free_ports(n)
            if not self._taken & set(ports) and len(set(ports)) == n:
                self._taken.update(ports)
                return ports

    def node_dir(self, i: int) -> Path:
        return self.base / ("head" if i == 0 else f"n{i + 1}")

    def __enter__(self) -> "LocalCluster":
        try:
            for i, node in enumerate(self.nodes):
                cmd = [str(BIN / "ray"), "start", f"--temp-dir={self.node_dir(i)}", f"--num-cpus={node['num_cpus']}",
                       "--disable-usage-stats", "--node-ip-address=127.0.0.1",
                       *[f"{flag}={port}" for flag, port in zip(_PORT_FLAGS, self._ports(len(_PORT_FLAGS)))]]
                if node.get("resources"):
                    cmd.append(f"--resources={json.dumps(node['resources'])}")
                if i == 0:
                    cmd += ["--head", f"--port={self.gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                            f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}",
                            f"--ray-client-server-port={self.client_port}"]
                else:
                    cmd.append(f"--address=127.0.0.1:{self.gcs}")
                if node.get("private"):
                    pairs = [x for path, folder in node["private"].items() for x in (str(folder), str(path))]
                    cmd = ["unshare", "-m", "sh", "-c", _BIND_THEN_EXEC, "sh", *pairs, "--", *cmd]
                done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=self.timeout)
                if done.returncode:
                    raise RuntimeError(f"ray start (node {i}) failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
            self.wait_for_nodes(len(self.nodes))
        except BaseException:
            self.stop()
            raise
        return self

    def wait_for_nodes(self, n: int) -> list[dict]:
        """Block until `n` nodes are alive; returns their resources."""
        probe = (f"import json, time, ray\nray.init(address='127.0.0.1:{self.gcs}', logging_level='ERROR')\n"
                 f"for _ in range({int(self.timeout)}):\n    alive = [x for x in ray.nodes() if x['Alive']]\n"
                 f"    if len(alive) == {n}: break\n    time.sleep(1)\nprint(json.dumps([x['Resources'] for x in alive]))")
        done = subprocess.run([sys.executable, "-c", probe], env=self.env, capture_output=True, text=True,
                              timeout=self.timeout + 60)
        resources = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else []
        if len(resources) != n:
            raise RuntimeError(f"{len(resources)} of {n} Ray nodes came up: {done.stderr[-2000:]}")
        return resources

    def submit(self, entrypoint: list[str], *, working_dir: Path, runtime_env: dict | None = None,
               timeout: float = 1800.0) -> tuple[bool, str]:
        """`ray job submit` (waits for the end); returns (succeeded, the job's log as the CLI printed it)."""
        sub_id = f"lawm-{secrets.token_hex(4)}"
        cmd = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard, "--submission-id", sub_id,
               "--working-dir", str(working_dir)]
        if runtime_env:
            cmd += ["--runtime-env-json", json.dumps(runtime_env)]
        done = subprocess.run([*cmd, "--", *entrypoint], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=self.base)
        status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", self.dashboard, sub_id],
                                env=self.env, capture_output=True, text=True, timeout=60).stdout
        return done.returncode == 0 and "succeeded" in status.lower(), done.stdout + done.stderr

    def list_state(self, kind: str) -> list[dict]:
        """`ray list <kind>` (nodes, actors, tasks, ...) as JSON, with detail."""
        out = subprocess.run([str(BIN / "ray"), "list", kind, "--address", self.dashboard, "--format", "json",
                              "--limit", "10000", "--detail"], env=self.env, capture_output=True, text=True,
                             timeout=120, check=True).stdout
        return json.loads(out)

    def _processes(self) -> list[tuple[int, list[bytes]]]:
        """(pid, argv) of every process whose command line names this cluster's temp dirs, this one excepted."""
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(str(self.base).encode() in a for a in argv):
                found.append((int(proc.name), argv))
        return found

    @staticmethod
    def _kill(pids: list[int]) -> list[int]:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def kill_raylet(self, node_id: str) -> list[int]:
        """SIGKILL the raylet of one node (its node id is on its command line): the node is lost, as when a machine
        dies. Returns the pids killed."""
        return self._kill([pid for pid, argv in self._processes()
                           if b"raylet" in argv[0] and any(node_id.encode() in a for a in argv)])

    def stop(self) -> None:
        self._kill([pid for pid, _ in self._processes()])
        time.sleep(1)  # a node's workers exit with their raylet
        shutil.rmtree(self.base, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.stop()


def working_dir(dest: Path, repo: Path) -> Path:
    """The checkout as git sees it (tracked and new files, nothing ignored: no .venv, no runs/): what
    `ray job submit --working-dir .` would upload from a clean checkout."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if rel.startswith("runs/") or not (repo / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, dest / rel)
    return dest
