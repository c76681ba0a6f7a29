"""RECON and DROID readers: round trips of fixtures in the real formats (the DROID fixture follows the layout checked
against droid-dataset/droid, see droid.py), bad episodes, names that must not collide, hostile pickles (code and
allocation bombs, measured with tracemalloc) and HDF5 files that point at other files."""
from __future__ import annotations

import io
import os
import pickle
import re
import struct
import tracemalloc

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lawm.data.video import decode_clip, write_video
from lawm_datasets.readers import common, droid, recon, safe_pickle


def _jpeg(rng, w=40, h=30) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _traj(rng, t):
    yaw = np.cumsum(rng.normal(0, 0.1, t))
    step = rng.uniform(0.05, 0.2, t)
    pos = np.cumsum(np.stack([step * np.cos(yaw), step * np.sin(yaw)], 1), 0)
    return pos, yaw


def make_processed(folder, rng, t=6, protocol=4):
    folder.mkdir(parents=True)
    pos, yaw = _traj(rng, t)
    for i in range(t):
        (folder / f"{i}.jpg").write_bytes(_jpeg(rng))
    with open(folder / "traj_data.pkl", "wb") as fh:
        pickle.dump({"position": pos, "yaw": yaw}, fh, protocol=protocol)
    return pos, yaw


class Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_safe_unpickler_refuses_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blob = pickle.dumps({"position": Boom()})
    with pytest.raises(safe_pickle.RefusedGlobal, match="refused global"):
        safe_pickle.loads(blob)
    assert not (tmp_path / "PWNED").exists()
    for evil in (pickle.dumps(eval), pickle.dumps(getattr), pickle.dumps(np.ndarray), pickle.dumps(dict)):
        with pytest.raises(safe_pickle.UnsafePickle):
            safe_pickle.loads(evil)
    # numpy arrays (C and Fortran order, structured, strings), scalars and builtins load in every protocol
    data = {"a": np.arange(6.0).reshape(3, 2), "f": np.asfortranarray(np.arange(6.0).reshape(3, 2)),
            "st": np.zeros(2, dtype=[("x", "f4"), ("y", "i2")]), "u": np.array(["ab", "c"]), "b": np.float64(2.5),
            "c": [1, (2, "x")], "d": b"\x00\x01", "e": bytearray(b"xy"), "s": {1, 2}, "z": 1 + 2j, "n": b""}
    for proto in range(2, 6):
        back = safe_pickle.loads(pickle.dumps(data, protocol=proto))
        for key, value in data.items():
            if isinstance(value, np.ndarray):
                assert type(back[key]) is np.ndarray and back[key].dtype == value.dtype
                assert np.array_equal(back[key], value)
            else:
                assert back[key] == value and type(back[key]) is type(value)
        assert back["f"].flags.f_contiguous
    # object arrays carry arbitrary objects: refused
    with pytest.raises(safe_pickle.UnsafePickle, match="object array"):
        safe_pickle.loads(pickle.dumps(np.array([1, "x"], dtype=object)))
    # a hostile dtype state must not reach numpy's shared float64 dtype
    assert np.dtype("f8").byteorder == "=" and np.dtype("f8").itemsize == 8


_N = struct.pack("<i", 300_000_000)
HOSTILE = {  # each a few dozen bytes; unguarded, each allocates 300 MB or more (measured: see safe_pickle.py)
    "reconstruct": b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ" + _N + b"\x85C\x01b\x87R.",
    "setstate": (b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R(K\x01J" + _N
                 + b"\x85cnumpy\ndtype\nX\x02\x00\x00\x00f8\x89\x88\x87R\x89C\x00tb."),
    "ndarray_call": b"\x80\x02cnumpy\nndarray\nJ" + _N + b"\x85\x85R.",
    "bytes_n": b"\x80\x02cbuiltins\nbytes\nJ" + _N + b"\x85R.",
    "bytearray_n": b"\x80\x02cbuiltins\nbytearray\nJ" + _N + b"\x85R.",
    "void_dtype": (b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x01\x85"
                   b"X\x0a\x00\x00\x00V300000000\x87R."),
    "memo_index": b"\x80\x02Nr" + struct.pack("<I", 0x0FFFFFFF) + b".",
    "bytes8_length": b"\x80\x04\x8e" + struct.pack("<Q", 300_000_000) + b"abc.",
    "frame_length": b"\x80\x04\x95" + struct.pack("<Q", 300_000_000) + b"N.",
    # set() of one memoised list of 1000 distinct ints, 2000 times: 11 kB of pickle that would build 2000 sets
    # (about 100 MB)
    # 200k empty dicts: one byte of file each, 64 bytes of memory each (a linear bomb, capped by the opcode charge)
    "empty_dicts": b"\x80\x04(" + b"}" * 200_000 + b"l.",
    "set_repeat": (b"\x80\x04](" + b"".join(b"M" + struct.pack("<H", i) for i in range(1000))
                   + b"e\x94\x8c\x08builtins\x94\x8c\x03set\x94\x93\x94(" + b"h\x03h\x00\x85R" * 2000 + b"l."),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_safe_unpickler_refuses_allocation_bombs(tmp_path, name):
    blob = HOSTILE[name]
    assert len(blob) < 128 or name in ("set_repeat", "empty_dicts")
    tracemalloc.start()
    try:
        with pytest.raises(safe_pickle.UnsafePickle, match="refused|not a readable pickle"):
            safe_pickle.loads(blob)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{name}: {peak / 1e6:.0f} MB allocated"


def test_safe_load_limits_file_size(tmp_path):
    path = tmp_path / "traj_data.pkl"
    path.write_bytes(pickle.dumps({"position": np.zeros((100, 2))}))
    assert safe_pickle.safe_load(path)["position"].shape == (100, 2)
    with pytest.raises(safe_pickle.UnsafePickle, match="refused pickle of .* bytes"):
        safe_pickle.safe_load(path, max_file_bytes=1000)


def test_recon_hostile_pickle_is_a_failure(tmp_path):
    rng = np.random.default_rng(5)
    src = tmp_path / "recon"
    for name in ("memo_index", "reconstruct"):
        make_processed(src / name, rng, t=4)
        (src / name / "traj_data.pkl").write_bytes(HOSTILE[name])
    recon.convert_recon(src, tmp_path / "warm")  # first-call imports (pyarrow...) are not what is measured
    tracemalloc.start()
    try:
        result = recon.convert_recon(src, tmp_path / "out", recon.ReconReadConfig(val_fraction=0.0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.episodes == 0 and peak < 16 << 20, f"{peak / 1e6:.0f} MB"
    errors = {f["episode"]: f["error"] for f in result.failures}
    assert "refused memo index" in errors["memo_index"] and "refused ndarray" in errors["reconstruct"]
    # beside a good trajectory: the good one converts, the hostile ones are recorded
    make_processed(src / "good", rng, t=4)
    result = recon.convert_recon(src, tmp_path / "out2", recon.ReconReadConfig(val_fraction=0.0))
    assert result.episodes == 1 and {f["episode"] for f in result.failures} == {"memo_index", "reconstruct"}
    assert len(pd.read_parquet(tmp_path / "out2" / "failures.parquet")) == 2


def test_recon_processed_round_trip_and_failures(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "recon"
    pos, yaw = make_processed(src / "traj_a", rng, t=6, protocol=2)
    make_processed(src / "traj_b", rng, t=5, protocol=5)
    bad = src / "traj_bad"
    bad.mkdir()
    (bad / "0.jpg").write_bytes(_jpeg(rng))
    (bad / "traj_data.pkl").write_bytes(b"\x80\x04garbage")
    evil = src / "traj_evil"
    make_processed(evil, rng, t=3)
    (evil / "traj_data.pkl").write_bytes(pickle.dumps({"position": Boom(), "yaw": [0, 1, 2]}))
    short = src / "traj_short"
    make_processed(short, rng, t=4)
    (short / "3.jpg").unlink()

    result = recon.convert_recon(src, tmp_path / "out", recon.ReconReadConfig(fps=4.0, val_fraction=0.0))
    assert result.episodes == 2 and result.videos == 2
    errors = {f["episode"]: f["error"] for f in result.failures}
    assert set(errors) == {"traj_bad", "traj_evil", "traj_short"}
    assert "not a readable pickle" in errors["traj_bad"] and "refused global" in errors["traj_evil"]
    assert "expected images" in errors["traj_short"]
    assert not (tmp_path / "PWNED").exists()
    assert len(pd.read_parquet(tmp_path / "out" / "failures.parquet")) == 3

    table = pd.read_parquet(result.manifest)
    row = table[table["episode"] == "traj_a"].iloc[0]
    frames = decode_clip(open(row["path"], "rb").read())
    lab = np.load(row["path"].replace(".mp4", ".labels.npz"))
    assert frames.shape == (6, 30, 40, 3) and lab["t"].shape == (6,) and np.allclose(lab["t"], np.arange(6) / 4)
    assert np.allclose(lab["pose"][:, :2], pos, atol=1e-5) and np.allclose(lab["pose"][:, 2], yaw, atol=1e-6)
    # the robot-frame deltas rebuild the trajectory
    p = lab["pose"][0].astype(np.float64)
    for d in lab["delta"][:-1]:
        c, s = np.cos(p[2]), np.sin(p[2])
        p = p + [c * d[0] - s * d[1], s * d[0] + c * d[1], d[2]]
    assert np.allclose(p[:2], pos[-1], atol=1e-4)
    assert lab["action"].shape == (6, 2) and np.all(lab["action"][-1] == 0)
    assert set(table["split"]) == {"train"} and set(table["domain"]) == {"recon"}


def test_recon_hdf5(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "recon_release"
    src.mkdir()
    t = 5
    pos, yaw = _traj(rng, t)
    with h5py.File(src / "run_0001.hdf5", "w") as f:
        f["jackal/position"] = np.concatenate([pos, np.zeros((t, 1))], 1)
        f["jackal/yaw"] = yaw
        imgs = f.create_dataset("images/rgb_left", (t,), dtype=h5py.vlen_dtype(np.uint8))
        for i in range(t):
            imgs[i] = np.frombuffer(_jpeg(rng), np.uint8)
        f["commands/linear_velocity"] = np.full(t, 0.5)
        f["commands/angular_velocity"] = np.full(t, -0.1)
        f["collision/any"] = np.zeros(t, bool)
    (src / "run_0002.hdf5").write_bytes(b"not an hdf5 file")
    with h5py.File(src / "run_0003.hdf5", "w") as f:
        f["jackal/position"] = np.zeros((t, 3))
    result = recon.convert_recon(src, tmp_path / "out")
    assert result.episodes == 1 and {f["episode"] for f in result.failures} == {"run_0002", "run_0003"}
    assert "missing dataset" in [f for f in result.failures if f["episode"] == "run_0003"][0]["error"]
    path = pd.read_parquet(result.manifest)["path"].iloc[0]
    lab = np.load(path.replace(".mp4", ".labels.npz"))
    assert np.allclose(lab["action"][:-1], [0.5, -0.1]) and np.all(lab["action"][-1] == 0)
    assert decode_clip(open(path, "rb").read()).shape[0] == t == lab["pose"].shape[0]


def make_droid(folder, rng, steps=30, fps=60.0, frames=None, cameras=("111", "222"), stereo=True):
    """An episode in the layout checked against droid-dataset/droid (see droid.py): one MP4 frame per control
    step, the MP4 declaring the ZED's configured 60 fps as DROID's SVO export writes it."""
    (folder / "recordings" / "MP4").mkdir(parents=True)
    (folder / "recordings" / "SVO").mkdir(parents=True)
    cart = np.zeros((steps, 6))
    cart[:, :3] = np.cumsum(rng.normal(0, 0.01, (steps, 3)), 0) + [0.5, 0, 0.2]
    cart[:, 3:] = rng.normal(0, 0.1, (steps, 3))
    grip = (np.arange(steps) > steps // 2).astype(float)
    extra = {"received": {}, "extrinsics": {}}
    with h5py.File(folder / "trajectory.h5", "w") as f:
        f.attrs["success"] = True
        f["observation/robot_state/cartesian_position"] = cart
        f["observation/robot_state/gripper_position"] = grip
        f["observation/robot_state/joint_positions"] = rng.normal(0, 1, (steps, 7))
        f["observation/controller_info/movement_enabled"] = np.arange(steps) != 3
        f["action/gripper_position"] = np.clip(grip + 0.1, 0, 1)
        f["action/cartesian_position"] = cart + 0.001
        f["action/joint_position"] = rng.normal(0, 1, (steps, 7))
        for j, cam in enumerate(cameras):
            f[f"observation/camera_type/{cam}"] = np.full(steps, 0 if j == 0 else 1)
            extra["extrinsics"][cam] = rng.normal(0, 1, (steps, 6))
            f[f"observation/camera_extrinsics/{cam}_left"] = extra["extrinsics"][cam]
            f[f"observation/camera_extrinsics/{cam}_right"] = rng.normal(0, 1, (steps, 6))
            extra["received"][cam] = 1.7e12 + np.cumsum(rng.integers(60, 75, steps)).astype(np.int64)
            f[f"observation/timestamp/cameras/{cam}_frame_received"] = extra["received"][cam]
            f[f"observation/timestamp/cameras/{cam}_read_start"] = extra["received"][cam] - 5
    n = frames or steps
    for cam in cameras:
        (folder / "recordings" / "SVO" / f"{cam}.svo").write_bytes(b"not read")
        write_video(folder / "recordings" / "MP4" / f"{cam}.mp4",
                    (np.full((32, 48, 3), i * 5 % 255, np.uint8) for i in range(n)), fps, (48, 32))
        if stereo:
            write_video(folder / "recordings" / "MP4" / f"{cam}-stereo.mp4",
                        (np.zeros((32, 96, 3), np.uint8) for _ in range(n)), fps, (96, 32))
    return cart, grip, extra


def test_droid_round_trip_and_failures(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "droid"
    cart, grip, extra = make_droid(src / "lab" / "ep1", rng, steps=30)
    make_droid(src / "lab" / "ep2", rng, steps=20, fps=15.0, frames=22, cameras=("333",), stereo=False)
    (src / "lab" / "ep_bad").mkdir(parents=True)
    (src / "lab" / "ep_bad" / "trajectory.h5").write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    nan = src / "lab" / "ep_nan"
    make_droid(nan, rng, cameras=("444",), stereo=False)
    with h5py.File(nan / "trajectory.h5", "a") as f:
        f["observation/robot_state/gripper_position"][3] = np.nan
    long = src / "lab" / "ep_long"
    make_droid(long, rng, steps=30, frames=60, cameras=("555",), stereo=False)  # twice as many frames as steps
    svo = src / "lab" / "ep_svo_only"
    make_droid(svo, rng, steps=10, cameras=("666",), stereo=False)
    (svo / "recordings" / "MP4" / "666.mp4").unlink()

    result = droid.convert_droid(src, tmp_path / "out", droid.DroidReadConfig(val_fraction=0.0))
    assert result.episodes == 2 and result.videos == 3
    errors = {f["episode"]: f["error"] for f in result.failures}
    assert common.safe_name("lab/ep_bad").startswith("lab_ep_bad-")
    assert set(errors) == {common.safe_name("lab/ep_bad"), common.safe_name("lab/ep_nan"),
                           common.safe_name("lab/ep_long"), common.safe_name("lab/ep_svo_only")}
    assert "unreadable trajectory.h5" in errors[common.safe_name("lab/ep_bad")]
    assert "NaN" in errors[common.safe_name("lab/ep_nan")]
    assert "60 frames for 30 control steps" in errors[common.safe_name("lab/ep_long")]
    assert "only recordings/SVO" in errors[common.safe_name("lab/ep_svo_only")]

    table = pd.read_parquet(result.manifest)
    assert sorted(table["camera"]) == ["111", "222", "333"]  # the -stereo.mp4 files are skipped
    assert dict(zip(table["camera"], table["camera_role"])) == {"111": "wrist", "222": "exterior", "333": "wrist"}
    row = table[table["camera"] == "222"].iloc[0]
    lab = np.load(row["path"].replace(".mp4", ".labels.npz"))
    # frame i is step i although the MP4 declares 60 fps: t runs on the video's clock, step_time on the robot's
    assert row["fps"] == 60.0 and row["n_frames"] == 30 and np.isnan(row["end"])
    assert lab["t"].shape == (30,) and np.allclose(lab["t"], np.arange(30) / 60.0)
    assert np.array_equal(lab["step"], np.arange(30))
    assert np.allclose(lab["step_time"], (extra["received"]["222"] - extra["received"]["222"][0]) / 1000, atol=1e-4)
    assert np.allclose(lab["ee_pos"], cart[:, :3], atol=1e-6)
    assert np.allclose(lab["cartesian_position"], cart, atol=1e-6)
    assert np.allclose(lab["camera_extrinsics"], extra["extrinsics"]["222"], atol=1e-5)
    assert np.allclose(lab["target_pose"], cart + 0.001, atol=1e-6) and lab["joint_positions"].shape == (30, 7)
    assert lab["movement_enabled"][3] == 0 and lab["movement_enabled"][4] == 1
    assert np.allclose(lab["action"][:-1, :3], np.diff(cart[:, :3], axis=0), atol=1e-6)
    assert np.allclose(lab["action"][:-1, 3], np.clip(grip + 0.1, 0, 1)[:-1]) and np.all(lab["action"][-1] == 0)
    assert decode_clip(open(row["path"], "rb").read()).shape[0] == 30
    # 22 frames for 20 steps: within the allowed mismatch, the 20 pairs are kept and ingest stops at the 20th frame
    short = table[table["camera"] == "333"].iloc[0]
    lab = np.load(short["path"].replace(".mp4", ".labels.npz"))
    assert short["n_frames"] == 20 and short["end"] == pytest.approx(20 / 15.0)
    assert lab["t"].shape == (20,) and np.array_equal(lab["step"], np.arange(20))


def test_names_stay_distinct():
    names = ["traj 1", "traj_1", "traj:1", "a/b", "a_b", "a", "ü"]
    safe = [common.safe_name(n) for n in names]
    assert len(set(safe)) == len(names)
    assert safe[1] == "traj_1" and safe[0].startswith("traj_1-") and safe[5] == "a"
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", n) for n in safe)
    assert common.safe_name("traj 1") == safe[0]  # depends on the name alone: stable across runs


def test_recon_names_never_overwrite(tmp_path):
    rng = np.random.default_rng(3)
    src = tmp_path / "recon"
    pos_space, _ = make_processed(src / "traj 1", rng, t=4)
    pos_under, _ = make_processed(src / "traj_1", rng, t=5)
    t = 4
    for suffix in (".h5", ".hdf5"):  # same stem, two files: the second is a recorded clash
        pos, yaw = _traj(rng, t)
        with h5py.File(src / f"run{suffix}", "w") as f:
            f["jackal/position"] = np.concatenate([pos, np.zeros((t, 1))], 1)
            f["jackal/yaw"] = yaw
            imgs = f.create_dataset("images/rgb_left", (t,), dtype=h5py.vlen_dtype(np.uint8))
            for i in range(t):
                imgs[i] = np.frombuffer(_jpeg(rng), np.uint8)
    result = recon.convert_recon(src, tmp_path / "out", recon.ReconReadConfig(val_fraction=0.0))
    table = pd.read_parquet(result.manifest)
    assert result.episodes == 3 and table["path"].is_unique and table["episode"].is_unique
    by_episode = {r["episode"]: r for r in table.to_dict("records")}
    for name, pos in (("traj 1", pos_space), ("traj_1", pos_under)):
        row = by_episode[common.safe_name(name)]
        lab = np.load(row["path"].replace(".mp4", ".labels.npz"))
        assert row["source"].endswith(name) and np.allclose(lab["pose"][:, :2], pos, atol=1e-5)
    assert [f["episode"] for f in result.failures] == ["run"]
    assert "already taken by" in result.failures[0]["error"] and result.failures[0]["path"].endswith("run.hdf5")
    assert by_episode["run"]["source"].endswith("run.h5")


def test_droid_names_never_overwrite(tmp_path):
    rng = np.random.default_rng(4)
    src = tmp_path / "droid"
    cart_space, _, _ = make_droid(src / "ep 1", rng, steps=12, cameras=("cam 1",), stereo=False)
    cart_under, _, _ = make_droid(src / "ep_1", rng, steps=12, cameras=("cam_1",), stereo=False)
    result = droid.convert_droid(src, tmp_path / "out", droid.DroidReadConfig(val_fraction=0.0))
    table = pd.read_parquet(result.manifest)
    assert result.videos == 2 and not result.failures and table["path"].is_unique
    for episode, cart in (("ep 1", cart_space), ("ep_1", cart_under)):
        row = table[table["episode"] == common.safe_name(episode)].iloc[0]
        lab = np.load(row["path"].replace(".mp4", ".labels.npz"))
        assert np.allclose(lab["cartesian_position"], cart, atol=1e-6)
    # the backstop: two sources for one output file are a failure, never an overwrite
    names = common.OutputNames()
    names.claim(tmp_path / "x.mp4", "first")
    names.claim(tmp_path / "x.mp4", "first")
    with pytest.raises(common.EpisodeError, match="already taken by first"):
        names.claim(tmp_path / "x.mp4", "second")


# ---------------------------------------------------------------- HDF5 that points outside the file

SECRET = np.linspace(-3.3, 4.4, 15).reshape(5, 3) + 0.123456789  # "secret" values no fixture uses


def _secret_files(tmp_path):
    raw = tmp_path / "secret.bin"
    raw.write_bytes(SECRET.astype("<f8").tobytes())
    other = tmp_path / "secret.h5"
    with h5py.File(other, "w") as f:
        f["pos"] = SECRET
        f["yaw"] = SECRET[:, 0]
        f["jackal/position"] = SECRET
    return raw, other


def _recon_with(path, rng, how, raw, other):
    t = 5
    with h5py.File(path, "w") as f:
        if how == "external_group":
            f["jackal"] = h5py.ExternalLink(str(other), "/jackal")
        elif how == "external_storage":
            f.create_dataset("jackal/position", (t, 3), "<f8", external=[(str(raw), 0, SECRET.nbytes)])
        elif how == "external_link":
            f["jackal/position"] = h5py.ExternalLink(str(other), "/pos")
        elif how == "soft_link":
            f["hidden/pos"] = SECRET
            f["jackal/position"] = h5py.SoftLink("/hidden/pos")
        elif how == "virtual":
            layout = h5py.VirtualLayout((t, 3), "<f8")
            layout[:] = h5py.VirtualSource(str(other), "pos", shape=(t, 3))
            f.create_virtual_dataset("jackal/position", layout)
        if how != "external_group":
            f["jackal/yaw"] = np.zeros(t)
        imgs = f.create_dataset("images/rgb_left", (t,), dtype=h5py.vlen_dtype(np.uint8))
        for i in range(t):
            imgs[i] = np.frombuffer(_jpeg(rng), np.uint8)


def _no_secret_in(out):
    for npz in out.glob("*.npz"):
        with np.load(npz) as lab:
            for key in lab.files:
                assert not np.isin(np.round(lab[key].astype(np.float64), 3), np.round(SECRET, 3)).any(), (npz, key)


WAYS_OUT = ("external_storage", "external_link", "external_group", "soft_link", "virtual")


def test_recon_refuses_hdf5_that_reads_other_files(tmp_path):
    rng = np.random.default_rng(6)
    raw, other = _secret_files(tmp_path)
    src = tmp_path / "recon"
    src.mkdir()
    for how in WAYS_OUT:
        _recon_with(src / f"{how}.hdf5", rng, how, raw, other)
    with h5py.File(src / "external_storage.hdf5", "r") as f:  # the fixture does point at the secret
        assert np.allclose(f["jackal/position"][()], SECRET)
    make_processed(src / "good", rng, t=4)
    result = recon.convert_recon(src, tmp_path / "out", recon.ReconReadConfig(val_fraction=0.0))
    errors = {f["episode"]: f["error"] for f in result.failures}
    assert result.episodes == 1 and set(errors) == set(WAYS_OUT)
    assert "stored in external files" in errors["external_storage"] and "secret.bin" in errors["external_storage"]
    assert "ExternalLink" in errors["external_link"] and "ExternalLink" in errors["external_group"]
    assert "SoftLink" in errors["soft_link"] and "virtual dataset" in errors["virtual"]
    assert all("refused" in e and "\n" not in e for e in errors.values())
    _no_secret_in(tmp_path / "out")


@pytest.mark.parametrize("how", WAYS_OUT[:2] + ("huge",))
def test_droid_refuses_hdf5_that_reads_other_files(tmp_path, how):
    rng = np.random.default_rng(7)
    raw, other = _secret_files(tmp_path)
    src = tmp_path / "droid"
    make_droid(src / "good", rng, steps=5, cameras=("111",), stereo=False)
    make_droid(src / "evil", rng, steps=5, cameras=("222",), stereo=False)
    with h5py.File(src / "evil" / "trajectory.h5", "a") as f:
        del f["observation/robot_state/cartesian_position"]
        if how == "external_storage":
            f.create_dataset("observation/robot_state/cartesian_position", (5, 3), "<f8",
                             external=[(str(raw), 0, SECRET.nbytes)])
        elif how == "external_link":
            f["observation/robot_state/cartesian_position"] = h5py.ExternalLink(str(other), "/pos")
        else:  # declared 12.9 GB, stored as a few kB of fill value: read whole it would allocate all of it
            f.create_dataset("observation/robot_state/cartesian_position", (2**28, 6), "<f8", chunks=(4096, 6),
                             compression="gzip")
    result = droid.convert_droid(src, tmp_path / "out", droid.DroidReadConfig(val_fraction=0.0))
    assert result.videos == 1 and [f["episode"] for f in result.failures] == ["evil"]
    error = result.failures[0]["error"]
    assert "refused observation/robot_state/cartesian_position" in error
    assert {"external_storage": "external files", "external_link": "ExternalLink", "huge": "limit"}[how] in error
    _no_secret_in(tmp_path / "out")
