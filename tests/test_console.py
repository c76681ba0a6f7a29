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
    # a progress bar's in-place updates (carriage returns) pass piece by piece, not held until a newline
    bar = b"encode:  10%|#\rencode:  50%|#####\r" + NOISE.encode() + b"\nencode: 100%|##########|\n"
    out = io.BytesIO()
    assert filter_lines(io.BytesIO(bar), out, patterns) == 1
    assert out.getvalue() == b"encode:  10%|#\rencode:  50%|#####\rencode: 100%|##########|\n"


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


def test_a_terminal_behind_the_filter_still_gets_live_progress_bars(tmp_path):
    """fd 2 becomes a pipe inside the block; when it was a terminal, progress bars are told so and stay live."""
    import pty

    script = tmp_path / "tty.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        from jobs.console import quiet_ray_noise
        from pipelines.progress import progress_bar
        print("outside", os.isatty(2), flush=True)
        with quiet_ray_noise():
            bar = progress_bar(3, unit="x", desc="t")
            print("inside", os.isatty(2), os.environ.get("LAWM_CONSOLE_IS_TTY"), bar.mininterval, flush=True)
            bar.close()
        print("after", os.environ.get("LAWM_CONSOLE_IS_TTY"), flush=True)
    """))
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, str(script)], stderr=follower, capture_output=False,
                              stdout=subprocess.PIPE, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "LAWM_RAW_LOGS": ""})
    finally:
        os.close(follower)
        os.close(leader)
    assert proc.stdout.splitlines() == ["outside True", "inside False 1 0.5", "after None"], proc.stdout
