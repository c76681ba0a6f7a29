"""Video I/O: probe with PyAV, decode and encode through ffmpeg (ffmpeg-python builds the argument lists).

Never builds a shell string: ffmpeg runs from an argument list, and every input path is passed as an
absolute `file:` URL so a name like `-y`, `concat:x` or `$(rm -rf)` is only ever a file name.
Frames stream through a pipe one at a time, so memory stays flat in the video's length.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import ffmpeg
import numpy as np


class VideoError(Exception):
    """A video that cannot give clips. `reason` is a short machine-readable class for failures.parquet."""

    def __init__(self, reason: str, message: str, stage: str = "probe"):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.stage = stage


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


def _looks_like_video(path: Path) -> bool:
    """Magic bytes of common video containers: such a file that will not open is truncated or corrupt."""
    with path.open("rb") as fh:
        head = fh.read(12)
    return (head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide") or head.startswith(b"\x1aE\xdf\xa3")
            or (head.startswith(b"RIFF") and head[8:12] == b"AVI ") or head.startswith(b"FLV")
            or head.startswith(b"\x00\x00\x01\xba") or head[:1] == b"\x47")


def _first_frame_rotation(container, stream) -> int:
    """Display rotation in degrees. PyAV exposes it on decoded frames, so decode one (this also
    proves the stream decodes at all)."""
    try:
        frame = next(container.decode(stream))
    except StopIteration:
        raise VideoError("decode_error", "video stream holds no decodable frame") from None
    except av.error.FFmpegError as err:
        raise VideoError("decode_error", str(err)[:300]) from None
    return int(round(getattr(frame, "rotation", 0) or 0)) % 360


def probe(path: str | Path, timeout: float = 30.0) -> VideoInfo:
    """Probe a file in-process. Raises VideoError with reasons: missing, empty, not_a_video,
    truncated, no_video_stream."""
    path = Path(path)
    if not path.exists():
        raise VideoError("missing", f"{path} does not exist")
    if path.stat().st_size == 0:
        raise VideoError("empty", "file has zero bytes")
    try:
        container = av.open(str(path), timeout=timeout)
    except av.error.FFmpegError as err:
        text = str(err).split(": '")[0][:300]
        if _looks_like_video(path):
            raise VideoError("truncated", f"container header present but unreadable ({text})") from None
        raise VideoError("not_a_video", text) from None
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams})
            raise VideoError("no_video_stream", f"streams present: {kinds or 'none'}")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        width, height = int(ctx.width or 0), int(ctx.height or 0)
        if width <= 0 or height <= 0:
            raise VideoError("not_a_video", "video stream has no frame size")
        fps = float(stream.average_rate or stream.guessed_rate or stream.base_rate or 0)
        duration = 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        if duration <= 0 and container.duration:
            duration = container.duration / av.time_base
        frames = int(stream.frames or 0) or int(round(duration * fps))
        if fps <= 0 and duration > 0 and frames > 0:
            fps = frames / duration
        rotation = _first_frame_rotation(container, stream)
        if rotation in (90, 270):
            width, height = height, width
        fmt = ctx.format
        pix_fmt = fmt.name if fmt is not None else "unknown"
        bit_depth = max((c.bits for c in fmt.components), default=8) if fmt is not None else 8
        return VideoInfo(duration, fps, width, height, rotation, ctx.name, pix_fmt, bit_depth, frames)


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
    """Kills a process once `timeout` seconds have passed; `fired` tells whether it did."""

    def __init__(self, proc: subprocess.Popen, timeout: float):
        self.fired = False
        self._proc = proc
        self._timer = threading.Timer(timeout, self._kill)
        self._timer.daemon = True
        self._timer.start()

    def _kill(self) -> None:
        self.fired = True
        _kill_group(self._proc)

    def cancel(self) -> None:
        self._timer.cancel()


def _stderr_tail(handle) -> str:
    handle.seek(0)
    lines = [ln.strip() for ln in handle.read().decode(errors="replace").splitlines() if ln.strip()]
    return " | ".join(lines[-3:])[:500]


def stream_frames(path: str | Path, fps: float, size: int, start: float | None = None,
                  end: float | None = None, timeout: float = 600.0, threads: int = 0,
                  ) -> Iterator[np.ndarray]:
    """Yield (size, size, 3) uint8 RGB frames resampled to `fps`, one at a time.

    Raises VideoError('timeout') when ffmpeg runs past `timeout` seconds (it is killed), and
    VideoError('decode_error') when it exits non-zero before giving any frame. A stream that breaks
    after some frames ends quietly; the frames read so far stand (a truncated file still gives clips).
    """
    frame_bytes = size * size * 3
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(decode_args(path, fps, size, start, end, threads), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=err, bufsize=frame_bytes, start_new_session=True)
        dog = _Watchdog(proc, timeout)
        count = 0
        try:
            while True:
                buf = proc.stdout.read(frame_bytes)
                if len(buf) < frame_bytes:
                    break
                count += 1
                yield np.frombuffer(buf, np.uint8).reshape(size, size, 3)
        finally:
            proc.stdout.close()
            if proc.poll() is None and not dog.fired:
                _kill_group(proc)  # the consumer stopped early
            code = proc.wait()
            dog.cancel()
        if dog.fired:
            raise VideoError("timeout", f"ffmpeg killed after {timeout:.0f}s", stage="decode")
        if code != 0 and count == 0:
            raise VideoError("decode_error", _stderr_tail(err) or f"ffmpeg exit {code}", stage="decode")


def encode_clip(frames: np.ndarray, fps: float, codec: str = "libx264", crf: int = 18,
                preset: str = "veryfast", timeout: float = 120.0) -> bytes:
    """Encode (T, H, W, 3) uint8 frames as an MP4 holding exactly T frames; returns the file's bytes."""
    t, h, w, _ = frames.shape
    with tempfile.TemporaryDirectory(prefix="lawm-enc-") as tmp:
        out_path = Path(tmp) / "clip.mp4"
        codec_args = {"vcodec": codec, "pix_fmt": "yuv420p", "frames:v": t, "r": fps}
        if codec in ("libx264", "libx265"):
            codec_args.update(crf=crf, preset=preset, g=t)
        args = (
            ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", r=fps)
            .output(file_url(out_path), movflags="+faststart", **codec_args)
            .global_args("-nostdin", "-hide_banner", "-loglevel", "error", "-threads", "1")
            .compile(cmd=ffmpeg_exe())
        )
        try:
            proc = subprocess.run(args, input=np.ascontiguousarray(frames).tobytes(),
                                  capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise VideoError("timeout", f"encoder killed after {timeout:.0f}s", stage="encode") from None
        if proc.returncode != 0:
            raise VideoError("encode_error", proc.stderr.decode(errors="replace")[-300:], stage="encode")
        return out_path.read_bytes()


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
