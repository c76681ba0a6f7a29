"""RECON and DROID readers: round trips of fixtures in the real formats, bad episodes, hostile pickles."""
from __future__ import annotations

import io
import os
import pickle

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lawm.data.video import decode_clip, write_video
from lawm_datasets.readers import droid, recon


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
    with pytest.raises(pickle.UnpicklingError, match="refused global"):
        recon.SafeUnpickler(io.BytesIO(blob)).load()
    assert not (tmp_path / "PWNED").exists()
    for evil in (pickle.dumps(eval), pickle.dumps(getattr)):
        with pytest.raises(pickle.UnpicklingError):
            recon.SafeUnpickler(io.BytesIO(evil)).load()
    # numpy arrays and scalars in every protocol still load
    for proto in range(2, 6):
        data = {"a": np.arange(6.0).reshape(3, 2), "b": np.float64(2.5), "c": [1, (2, "x")], "d": b"\x00\x01"}
        back = recon.SafeUnpickler(io.BytesIO(pickle.dumps(data, protocol=proto))).load()
        assert np.array_equal(back["a"], data["a"]) and back["b"] == 2.5 and back["d"] == b"\x00\x01"


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


def make_droid(folder, rng, steps=30, hz=15.0, fps=15.0, frames=None, cameras=("111", "222")):
    (folder / "recordings" / "MP4").mkdir(parents=True)
    cart = np.zeros((steps, 6))
    cart[:, :3] = np.cumsum(rng.normal(0, 0.01, (steps, 3)), 0) + [0.5, 0, 0.2]
    grip = (np.arange(steps) > steps // 2).astype(float)
    with h5py.File(folder / "trajectory.h5", "w") as f:
        f["observation/robot_state/cartesian_position"] = cart
        f["observation/robot_state/gripper_position"] = grip
        f["action/gripper_position"] = grip
        f["action/cartesian_position"] = cart
    n = frames or int(round(steps / hz * fps))
    for cam in cameras:
        write_video(folder / "recordings" / "MP4" / f"{cam}.mp4",
                    (np.full((32, 48, 3), i * 5 % 255, np.uint8) for i in range(n)), fps, (48, 32))
    return cart, grip


def test_droid_round_trip_and_failures(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "droid"
    cart, grip = make_droid(src / "lab" / "ep1", rng, steps=30, fps=15.0)
    make_droid(src / "lab" / "ep2", rng, steps=30, fps=5.0, cameras=("333",))  # video at a lower rate
    (src / "lab" / "ep_bad" ).mkdir(parents=True)
    (src / "lab" / "ep_bad" / "trajectory.h5").write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    nan = src / "lab" / "ep_nan"
    make_droid(nan, rng, cameras=("444",))
    with h5py.File(nan / "trajectory.h5", "a") as f:
        f["observation/robot_state/gripper_position"][3] = np.nan
    long = src / "lab" / "ep_long"
    make_droid(long, rng, steps=30, frames=60, cameras=("555",))  # video twice as long as the trajectory

    result = droid.convert_droid(src, tmp_path / "out", droid.DroidReadConfig(val_fraction=0.0))
    assert result.episodes == 2 and result.videos == 3
    errors = {f["episode"]: f["error"] for f in result.failures}
    assert set(errors) == {"lab_ep_bad", "lab_ep_nan", "lab_ep_long"}
    assert "unreadable trajectory.h5" in errors["lab_ep_bad"] and "NaN" in errors["lab_ep_nan"]
    assert "video lasts" in errors["lab_ep_long"]

    table = pd.read_parquet(result.manifest)
    assert sorted(table["camera"]) == ["111", "222", "333"]
    row = table[table["camera"] == "111"].iloc[0]
    lab = np.load(row["path"].replace(".mp4", ".labels.npz"))
    assert lab["t"].shape == (30,) and np.allclose(lab["ee_pos"], cart[:, :3], atol=1e-6)
    assert np.allclose(lab["action"][:-1, :3], np.diff(cart[:, :3], axis=0), atol=1e-6)
    assert np.allclose(lab["action"][:-1, 3], grip[:-1]) and np.all(lab["action"][-1] == 0)
    assert decode_clip(open(row["path"], "rb").read()).shape[0] == 30
    slow = table[table["camera"] == "333"].iloc[0]
    lab = np.load(slow["path"].replace(".mp4", ".labels.npz"))
    assert lab["t"].shape == (10,) and np.array_equal(lab["step"], np.arange(0, 30, 3))
