""".ci/run: CI passes only when tests ran and passed, whatever else the log says."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CI = Path(__file__).resolve().parents[1] / ".ci"


def _ci_with(tmp_path: Path, output: str, exit_code: int) -> int:
    """Run a copy of .ci/run in a folder whose `make test` prints `output` and exits `exit_code`."""
    (tmp_path / ".ci").mkdir()
    for name in ("run", "check-log"):
        shutil.copy(CI / name, tmp_path / ".ci" / name)
    (tmp_path / "out.txt").write_text(output)
    (tmp_path / "Makefile").write_text(f"test:\n\t@cat out.txt; exit {exit_code}\n")
    return subprocess.run(["bash", str(tmp_path / ".ci" / "run")], cwd=tmp_path, capture_output=True,
                          timeout=60).returncode


@pytest.mark.parametrize("output,code,ok", [
    ("........\n8 passed, 2 warnings in 12.31s\n", 0, True),
    ("........\n8 passed in 1.00s (0:00:01)\n", 0, True),
    ("\nno tests ran in 0.01s\n", 5, False),                                   # empty collection
    ("ERROR: file or directory not found: tests/typo.py\n\nno tests ran in 0.01s\n", 4, False),
    ("F.\nE  assert 'no tests ran' in log\n1 failed, 1 passed in 0.5s\n", 1, False),  # the phrase inside a failure
    ("F.\n1 failed, 1 passed in 0.5s\n", 0, False),                            # a summary that contradicts exit 0
    ("make: nothing printed by pytest\n", 0, False),                            # exit 0 but no test ran
    ("3 skipped in 0.2s\n", 0, False),                                          # nothing passed
])
def test_ci_passes_only_when_tests_ran_and_passed(tmp_path, output, code, ok):
    rc = _ci_with(tmp_path, output, code)
    assert (rc == 0) == ok, (output, rc)
