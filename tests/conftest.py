"""Shared fixtures: a local Ray instance for the session, and ffmpeg-made videos (hostile ones included)."""
from __future__ import annotations

import os
import signal
import subprocess
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
