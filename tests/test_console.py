"""The console filter: only the listed Ray lines are held back, from C-level writes and child processes too, and a
driver that dies mid-run still gets its last words to the terminal."""
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jobs.console import KNOWN_NOISE, filter_lines

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("[2026-11-27 16:00:40,078 E 4574 4574] core_worker.cc:2465: Actor with class name: 'MapWorker' and ID: 'e5' "
         "has constructor arguments in the object store and max_restarts > 0. If the arguments ...")


def test_filter_lines_drops_only_the_listed_lines_in_order():
    patterns = tuple(p.encode() for p, _ in KNOWN_NOISE)
    src = io.BytesIO(f"first\n{NOISE}\nsecond has max_restarts in it\n".encode()
                     + b"(raylet) WARNING: 8 PYTHON worker processes have been started on node: x\nlast, no newline")
    dst = io.BytesIO()
    assert filter_lines(src, dst, patterns) == 2
    assert dst.getvalue() == b"first\nsecond has max_restarts in it\nlast, no newline"


DRIVER = textwrap.dedent("""
    import os, subprocess, sys
    from jobs.console import quiet_ray_noise
    with quiet_ray_noise():
        os.write(2, b"from C: stage started\\n")
        os.write(2, NOISE.encode() + b"\\n")
        print("from Python: still here", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('from a child\\\\n')"], check=True)
        if sys.argv[1] == "abort":
            os.write(2, b"Fatal: the last words\\n")
            os.abort()
    print("after the block", file=sys.stderr, flush=True)
""")


@pytest.mark.parametrize("mode", ["ok", "abort", "raw"])
def test_quiet_ray_noise_through_fd_2(tmp_path, mode):
    script = tmp_path / "driver.py"
    script.write_text(f"NOISE = {NOISE!r}\n" + DRIVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LAWM_RAW_LOGS": "1" if mode == "raw" else ""}
    proc = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, env=env, timeout=60)
    err = proc.stderr
    for line in ("from C: stage started", "from Python: still here", "from a child"):
        assert line in err, (line, err)
    if mode == "raw":
        assert NOISE in err and "held back" not in err
        return
    assert "max_restarts" not in err
    if mode == "abort":
        assert proc.returncode != 0 and "Fatal: the last words" in err  # drained by the filter after the crash
    else:
        assert proc.returncode == 0
        assert err.index("from a child") < err.index("held back 1 line") < err.index("after the block")
