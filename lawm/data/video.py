"""Video I/O: probe with PyAV in a child process, decode through ffmpeg (ffmpeg-python builds the argument lists),
encode our own clips in-process with PyAV.

Never builds a shell string: ffmpeg runs from an argument list, and every input path is passed as an
absolute `file:` URL so a name like `-y`, `concat:x` or `$(rm -rf)` is only ever a file name.
Frames stream through a pipe one at a time, so memory stays flat in the video's length.

Untrusted files are only ever parsed in child processes: `probe` runs PyAV in a child with a timeout, and
`stream_frames` decodes in an ffmpeg child watched for progress. A child that dies on a signal becomes a
`VideoError` (`crashed` for SIGSEGV/SIGABRT/…, `killed` for SIGKILL), never a dead caller. Nothing opens a
path before `os.stat` has shown it is a regular file, so a FIFO or a device cannot block a reader.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from fractions import Fraction
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import ffmpeg
import numpy as np

# Reasons that say nothing about the file (the machine, the moment, a killed process): a rerun retries them.
# Every other reason is the file's own and permanent (kept until the input or the settings change).
TRANSIENT_REASONS = frozenset({"timeout", "stalled", "killed", "probe_error", "encode_error", "worker_died"})
# Signals a decoder dies of when the input breaks it; SIGKILL (the OOM killer, an operator) is not one of them.
CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGILL})


class VideoError(Exception):
    """A video that cannot give clips. `reason` is a short machine-readable class for failures.parquet;
    `kind` is `transient` (a rerun retries it) or `permanent`."""

    def __init__(self, reason: str, message: str, stage: str = "probe"):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.stage = stage

    @property
    def kind(self) -> str:
        return "transient" if self.reason in TRANSIENT_REASONS else "permanent"


def death_error(returncode: int, what: str, stage: str) -> VideoError:
    """The VideoError for a child process that died on signal `-returncode`."""
    sig = signal.Signals(-returncode)
    if sig in CRASH_SIGNALS:
        return VideoError("crashed", f"{what} died of {sig.name}", stage=stage)
    return VideoError("killed", f"{what} was killed by {sig.name}", stage=stage)


def ffmpeg_exe() -> str:
    """The ffmpeg binary: $LAWM_FFMPEG, else the pinned static build of imageio-ffmpeg, else the system one."""
    if os.environ.get("LAWM_FFMPEG"):
        return os.environ["LAWM_FFMPEG"]
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:  # pragma: no cover - only when the wheel is missing
        exe = shutil.which("ffmpeg")
        if exe is None:
            raise RuntimeError("no ffmpeg found: install imageio-ffmpeg or set LAWM_FFMPEG") from None
        return exe


def file_url(path: str | Path) -> str:
    return "file:" + str(Path(path).absolute())


@dataclass
class VideoInfo:
    duration: float  # seconds
    fps: float
    width: int  # as displayed, after rotation
    height: int
    rotation: int  # degrees the player applies
    codec: str
    pix_fmt: str
    bit_depth: int
    frames: int  # container's count, or duration * fps when absent

    def to_dict(self) -> dict:
        return asdict(self)


def check_regular(path: str | Path, stage: str = "probe") -> os.stat_result:
    """stat (never open) `path`: raises VideoError missing, broken_symlink, not_a_file or empty."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if path.is_symlink():
            raise VideoError("broken_symlink", f"{path} points to {os.readlink(path)}, which does not exist",
                             stage=stage) from None
        raise VideoError("missing", f"{path} does not exist", stage=stage) from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device")
        raise VideoError("not_a_file", f"{path} is {kind}, not a regular file", stage=stage)
    if st.st_size == 0:
        raise VideoError("empty", "file has zero bytes", stage=stage)
    return st


_AV_PROBE = Path(__file__).with_name("av_probe.py")


def probe(path: str | Path, timeout: float = 30.0) -> VideoInfo:
    """Probe a file with PyAV in a child process killed after `timeout` seconds. Raises VideoError with reasons:
    missing, broken_symlink, not_a_file, empty, not_a_video, truncated, no_video_stream, decode_error (the file's
    own), crashed (the child died of SIGSEGV/SIGABRT/...: the file breaks the demuxer), and the transient
    timeout, killed, probe_error."""
    path = Path(path).absolute()
    check_regular(path)
    # A fresh child per file, so no state outlives a crash. Measured on the 2-core machine: 0.10 s of CPU per probe
    # (mostly the `av` import), 0.44 s wall while other jobs ran; bench_ingest.py reports its share (`probe_share`).
    proc = subprocess.Popen([sys.executable, str(_AV_PROBE), str(path), str(timeout)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.communicate()
        raise VideoError("timeout", f"probe killed after {timeout:.0f}s") from None
    if proc.returncode < 0:
        raise death_error(proc.returncode, "the probe", stage="probe")
    try:
        result = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        raise VideoError("probe_error", " | ".join(tail)[:300] or f"probe exit {proc.returncode}") from None
    if "error" in result:
        raise VideoError(result["error"], result["message"])
    return VideoInfo(**result["info"])


def _resize_chain(stream, size: int):
    """Scale the short side to `size`, then centre-crop a `size` x `size` square."""
    stream = stream.filter(
        "scale", f"if(lt(iw,ih),{size},-2)", f"if(lt(iw,ih),-2,{size})", flags="bilinear"
    )
    return stream.filter("crop", size, size)


def decode_args(path: str | Path, fps: float, size: int, start: float | None = None,
                end: float | None = None, threads: int = 0) -> list[str]:
    """ffmpeg arguments that decode `path` to raw RGB frames at `fps`, `size` x `size`, on stdout."""
    in_kwargs = {}
    if start:
        in_kwargs["ss"] = f"{start:.6f}"
    if end is not None:
        in_kwargs["to"] = f"{end:.6f}"
    if threads:
        in_kwargs["threads"] = threads
    stream = ffmpeg.input(file_url(path), **in_kwargs)
    stream = _resize_chain(stream.filter("fps", fps=fps), size)
    out = stream.output("pipe:", format="rawvideo", pix_fmt="rgb24", an=None, sn=None)
    return out.global_args("-nostdin", "-hide_banner", "-loglevel", "error").compile(cmd=ffmpeg_exe())


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the process and anything it spawned (it runs in its own session), so no pipe stays open."""
    try:
        os.killpg(proc.pid, 9)
    except (ProcessLookupError, PermissionError):
        proc.kill()


class _Watchdog:
    """Kills a process that makes no progress: a read of its output that waits `stall` seconds, or `timeout`
    seconds in all. Only time spent waiting for the process counts as a stall, never the consumer's own work.
    `fired` names which limit killed it ("stalled" or "timeout"), or is empty."""

    def __init__(self, proc: subprocess.Popen, timeout: float, stall: float):
        self.fired = ""
        self._proc, self._timeout, self._stall = proc, timeout, stall
        self._t0 = time.monotonic()
        self._waiting_since: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def waiting(self, on: bool) -> None:
        self._waiting_since = time.monotonic() if on else None

    def _watch(self) -> None:
        while not self._stop.wait(min(0.25, self._stall / 4)):
            now, since = time.monotonic(), self._waiting_since
            stalled = since is not None and now - since > self._stall
            if stalled or now - self._t0 > self._timeout:
                self.fired = "stalled" if stalled else "timeout"
                _kill_group(self._proc)
                return

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()


def _stderr_tail(handle) -> str:
    handle.seek(0)
    lines = [ln.strip() for ln in handle.read().decode(errors="replace").splitlines() if ln.strip()]
    return " | ".join(lines[-3:])[:500]


def stream_frames(path: str | Path, fps: float, size: int, start: float | None = None,
                  end: float | None = None, timeout: float = 600.0, stall_timeout: float = 60.0,
                  threads: int = 0) -> Iterator[np.ndarray]:
    """Yield (size, size, 3) uint8 RGB frames resampled to `fps`, one at a time.

    The decoder is watched for progress, not for the duration the file declares: it is killed when no frame
    arrives for `stall_timeout` seconds (VideoError 'stalled') or after `timeout` seconds in all (VideoError
    'timeout'; callers derive it from the file's size). It raises VideoError('crashed'/'killed') when ffmpeg
    dies on a signal, and VideoError('decode_error') when it exits non-zero before giving any frame. A stream
    that breaks after some frames with an ordinary error ends quietly; the frames read so far stand (a
    truncated file still gives clips).
    """
    frame_bytes = size * size * 3
    with tempfile.TemporaryFile() as err:
        args = decode_args(path, fps=fps, size=size, start=start, end=end, threads=threads)
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                bufsize=frame_bytes, start_new_session=True)
        dog = _Watchdog(proc, timeout, stall_timeout)
        count = 0
        try:
            while True:
                dog.waiting(True)
                buf = proc.stdout.read(frame_bytes)
                dog.waiting(False)
                if len(buf) < frame_bytes:
                    break
                count += 1
                yield np.frombuffer(buf, np.uint8).reshape(size, size, 3)
        finally:
            proc.stdout.close()
            if proc.poll() is None and not dog.fired:
                _kill_group(proc)  # the consumer stopped early (the code below is not reached then)
            code = proc.wait()
            dog.cancel()
        if dog.fired == "stalled":
            raise VideoError("stalled", f"ffmpeg gave no frame for {stall_timeout:.0f}s after {count} frames; "
                                        "killed", stage="decode")
        if dog.fired:
            raise VideoError("timeout", f"ffmpeg killed after {timeout:.0f}s ({count} frames)", stage="decode")
        if code < 0:
            raise death_error(code, f"ffmpeg (after {count} frames)", stage="decode")
        if code != 0 and count == 0:
            raise VideoError("decode_error", _stderr_tail(err) or f"ffmpeg exit {code}", stage="decode")


def encode_clip(frames: np.ndarray, fps: float, codec: str = "libx264", crf: int = 18,
                preset: str = "ultrafast") -> bytes:
    """Encode (T, H, W, 3) uint8 frames as an MP4 holding exactly T frames, in this process; returns its bytes.

    In-process through PyAV (the same libav as the ffmpeg binary): these are our own decoded frames, not untrusted
    input, and a clip is small. Measured on 16 x 256 px clips of the bench's 720p videos (2-core CPU, 2026-11-27):
    an ffmpeg child per clip cost 82 ms (veryfast) / 50 ms (ultrafast), of which ~33 ms is starting the process;
    in-process 50 ms (veryfast, 137 KiB) / 31 ms (superfast, 250 KiB) / 15 ms (ultrafast, 165 KiB), all at the same
    PSNR to the decoded frames within 0.5 dB (29.8-30.3 dB on that noisy content). Default: ultrafast, crf 18;
    `preset` and `crf` stay options for smaller shards."""
    t, h, w, _ = frames.shape
    rate = Fraction(fps).limit_denominator(1001)
    buf = io.BytesIO()
    try:
        with av.open(buf, "w", format="mp4") as container:
            stream = container.add_stream(codec, rate=rate)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.thread_count = 1  # parallelism comes from Ray tasks
            if codec in ("libx264", "libx265"):
                stream.options = {"crf": str(crf), "preset": preset, "g": str(t)}
            for frame in np.ascontiguousarray(frames):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())  # flush
    except (av.FFmpegError, ValueError) as err:  # a missing codec, a bad option: the machine's trouble, not the file's
        raise VideoError("encode_error", f"{codec}: {err}"[-300:], stage="encode") from None
    return buf.getvalue()


def decode_clip(data: bytes) -> np.ndarray:
    """Decode an MP4 (bytes) to (T, H, W, 3) uint8 with PyAV: in-process, the same path for training and eval."""
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise VideoError("decode_error", "clip holds no frames", stage="load")
    return np.stack(frames)


def write_video(path: str | Path, frames: np.ndarray | Iterator[np.ndarray], fps: float, size: tuple[int, int],
                codec: str = "libx264", crf: int = 20, extra_output_args: dict | None = None) -> None:
    """Write frames (each (H, W, 3) uint8) to a video file through ffmpeg, streaming; used by the generators."""
    w, h = size
    args = (
        ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", r=fps)
        .output(file_url(path), vcodec=codec, pix_fmt="yuv420p", crf=crf, preset="veryfast",
                **(extra_output_args or {}))
        .global_args("-nostdin", "-hide_banner", "-loglevel", "error", "-y")
        .compile(cmd=ffmpeg_exe())
    )
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for frame in frames:
            proc.stdin.write(np.ascontiguousarray(frame, dtype=np.uint8).tobytes())
    finally:
        proc.stdin.close()
        err = proc.stderr.read()
        if proc.wait() != 0:
            raise RuntimeError(f"ffmpeg failed writing {path}: {err.decode(errors='replace')[-300:]}")
