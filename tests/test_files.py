"""lawm.files: the one atomic writer — a crash mid-write leaves the old file or the new one, never a part."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lawm.files import atomic_file, atomic_write_json, read_json_object, sweep_temporaries


def test_a_failure_inside_the_block_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "marker.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_file(target) as fh:
        fh.write(b'{"v": 2, "half')
        raise RuntimeError("disk gone")
    assert read_json_object(target) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marker.json"]


def test_a_killed_writer_leaves_the_old_file_and_a_temporary_that_sweep_removes(tmp_path):
    target = tmp_path / "sub" / "shard.tar"
    atomic_write_json(target, {"old": True})
    code = ("import os, sys\nfrom lawm.files import atomic_file\n"
            f"with atomic_file({str(target)!r}) as fh:\n    fh.write(b'x' * 1000); fh.flush(); os._exit(9)\n")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 9
    assert read_json_object(target) == {"old": True}
    left = [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1  # what the killed process was writing...
    sweep_temporaries(tmp_path)
    assert [p.name for p in target.parent.iterdir()] == ["shard.tar"]  # ...is gone after a sweep


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]", b"\x00\x00"])
def test_empty_corrupt_or_non_object_markers_read_as_absent(tmp_path, content):
    path = tmp_path / "m.json"
    path.write_bytes(content)
    assert read_json_object(path) is None
    assert read_json_object(tmp_path / "missing.json") is None


def test_the_written_file_is_complete_and_replaces_the_old(tmp_path):
    target = tmp_path / "a.bin"
    with atomic_file(target) as fh:
        fh.write(b"1" * 10)
    with atomic_file(target) as fh:
        fh.write(b"2" * 5)
    assert target.read_bytes() == b"22222" and os.listdir(tmp_path) == ["a.bin"]


def test_parquet_round_trip_and_a_failed_write_keeps_the_old_table(tmp_path):
    import pandas as pd

    from lawm.files import atomic_write_parquet

    path = tmp_path / "t.parquet"
    atomic_write_parquet(path, pd.DataFrame({"key": ["a", "b"], "n": [1, 2]}))
    bad = pd.DataFrame({"x": [object()]})  # pyarrow cannot write an arbitrary object: the write fails midway
    with pytest.raises(Exception):
        atomic_write_parquet(path, bad)
    assert pd.read_parquet(path).to_dict("list") == {"key": ["a", "b"], "n": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def test_provenance_matches_only_a_readable_marker_with_the_same_digest(tmp_path):
    from lawm import provenance

    marker = tmp_path / "out" / "settings.json"
    identity = provenance.digest({"fps": 4}, [("a.mp4", 10)])
    assert not provenance.matches(marker, identity)                      # missing
    provenance.record(marker, identity, config={"fps": 4})
    assert provenance.matches(marker, identity)
    assert not provenance.matches(marker, provenance.digest({"fps": 8}, [("a.mp4", 10)]))  # other settings
    assert not provenance.matches(marker, provenance.digest({"fps": 4}, [("b.mp4", 10)]))  # other inputs
    marker.write_bytes(b"")                                              # a power cut
    assert not provenance.matches(marker, identity)
