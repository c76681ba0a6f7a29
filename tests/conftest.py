"""Shared fixtures: a local Ray instance for the session, and ffmpeg-made videos (hostile ones included)."""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
from lawm.data.video import ffmpeg_exe  # noqa: E402


def ffmpeg(*args: str) -> None:
    """Run the project's ffmpeg with an argument list (never a shell)."""
    subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-y", *args], check=True, timeout=120)


def make_video(path: Path, seconds: float = 4.0, fps: int = 10, size: str = "96x64", extra: tuple = (),
               source: str = "testsrc2") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ffmpeg("-f", "lavfi", "-i", f"{source}=size={size}:rate={fps}", "-t", str(seconds),
           "-c:v", "libx264", "-pix_fmt", "yuv420p", *extra, str(path))
    return path


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from pipelines.ray_env import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def stop_server(proc, children: list) -> tuple:
    """SIGTERM a server started with start_new_session=True, wait for it and its `children`, then SIGKILL whatever
    is left of its process group. Returns (exit code or None when it did not stop in 30 s, processes left alive)."""
    import psutil

    if proc.poll() is None:
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
    return rc, alive


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rest(url: str, body: dict | None = None) -> dict:
    """GET (no body) or POST a JSON body to an MLflow REST endpoint; the decoded reply."""
    import json
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"{}")


class MlflowServer:
    """`infra/mlflow/serve.sh` (what `make mlflow-server` runs) on a free loopback port, its data under `folder`.
    Entered: waits for /health (~8 s alone, up to ~30 s with other tests on the 2 cores); `url`, `port`, `data`,
    `stdout`, `stderr`, `proc` and `env` (the server's environment) set. Left: SIGTERM and `stop_server`; `rc`
    and `alive` then hold what it returned."""

    def __init__(self, folder: Path, timeout: float = 90.0, data_name: str = "server", extra_env: dict | None = None):
        self.folder, self.timeout, self.extra_env = folder, timeout, extra_env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data, self.stdout, self.stderr = folder / data_name, folder / "server.stdout", folder / "server.stderr"
        self.rc, self.alive, self.children = None, [], []

    def __enter__(self) -> "MlflowServer":
        import sys
        import time
        import urllib.request

        import psutil

        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(PORT=str(self.port), MLFLOW_DATA_DIR=str(self.data), **self.extra_env)
        env.pop("HOST", None)  # the default must be loopback
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's mlflow
        self.env = env
        repo = Path(__file__).resolve().parents[1]
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(["bash", str(repo / "infra" / "mlflow" / "serve.sh")], env=env, cwd=repo,
                                         stdout=out, stderr=err, start_new_session=True)
        try:
            deadline = time.monotonic() + self.timeout
            while True:
                assert self.proc.poll() is None, self.stderr.read_text()[-3000:]
                try:
                    with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "no /health:\n" + self.stderr.read_text()[-3000:]
                time.sleep(0.5)
            self.children = psutil.Process(self.proc.pid).children(recursive=True)
        except BaseException:
            stop_server(self.proc, self.children)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.rc, self.alive = stop_server(self.proc, self.children)  # serve.sh execs mlflow: SIGTERM reaches it


# The local S3 of the object-store tests (`s3_server`, started on first use): its address, credentials and lawm's
# mirror folder are in the environment from the start of the session, so that every Ray instance the session starts,
# and so every Ray worker, reaches it as a cluster's nodes would through their environment.
S3_ENV = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "lawm-test",
          "AWS_SECRET_ACCESS_KEY": "lawm-test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
          "LAWM_MIRROR_DIR": os.path.join(tempfile.gettempdir(), f"lawm-test-mirror-{os.getpid()}")}
os.environ.update(S3_ENV)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A local S3 (moto_server on loopback, at S3_ENV's address) for pyarrow, boto3 and lawm's mirror: yields
    (endpoint url, S3_ENV). Buckets are made by the tests (`make_bucket`); the mirror folder goes at the end."""
    import shutil
    import socket
    import sys
    import time
    import urllib.request

    folder = tmp_path_factory.mktemp("s3")
    url, env = S3_ENV["AWS_ENDPOINT_URL"], S3_ENV
    port = int(url.rsplit(":", 1)[1])
    with socket.socket() as probe:  # chosen free at import; anything that took it since would answer for S3
        assert probe.connect_ex(("127.0.0.1", port)) != 0, f"port {port}, chosen for moto_server, is taken"
    server = Path(sys.executable).parent / "moto_server"
    with open(folder / "server.log", "wb") as log:
        proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (folder / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, (folder / "server.log").read_text()[-3000:]
                time.sleep(0.3)
        yield url, env
    finally:
        stop_server(proc, [])
        shutil.rmtree(env["LAWM_MIRROR_DIR"], ignore_errors=True)


def make_bucket(name: str) -> str:
    """Create bucket `name` in the s3_server (the environment points boto3 at it); returns "s3://name"."""
    import boto3

    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"
