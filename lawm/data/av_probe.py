"""Probe one video file with PyAV and print the result as one JSON line. Run as a child process only.

    python lawm/data/av_probe.py PATH    →  {"info": {...}}  or  {"error": REASON, "message": TEXT}

PyAV runs the FFmpeg demuxers and decoders inside the calling process, so a file that crashes them (a segfault,
an abort) would take that process with it. `lawm.data.video.probe` therefore runs this script in a child of its
own, with a timeout, and reads the child's death as a recorded failure. The script imports nothing from lawm
(it is run by file path, and its start-up cost is the `av` import alone).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import av


class ProbeFailure(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


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
        raise ProbeFailure("decode_error", "video stream holds no decodable frame") from None
    except av.error.FFmpegError as err:
        raise ProbeFailure("decode_error", str(err)[:300]) from None
    return int(round(getattr(frame, "rotation", 0) or 0)) % 360


def probe_file(path: Path, timeout: float) -> dict:
    """The fields of lawm.data.video.VideoInfo. Raises ProbeFailure with reasons: not_a_video, truncated,
    no_video_stream, decode_error (the caller has checked that the path is a non-empty regular file)."""
    try:
        container = av.open(str(path), timeout=timeout)
    except av.error.FFmpegError as err:
        text = str(err).split(": '")[0][:300]
        if _looks_like_video(path):
            raise ProbeFailure("truncated", f"container header present but unreadable ({text})") from None
        raise ProbeFailure("not_a_video", text) from None
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams})
            raise ProbeFailure("no_video_stream", f"streams present: {kinds or 'none'}")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        width, height = int(ctx.width or 0), int(ctx.height or 0)
        if width <= 0 or height <= 0:
            raise ProbeFailure("not_a_video", "video stream has no frame size")
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
        return {"duration": duration, "fps": fps, "width": width, "height": height, "rotation": rotation,
                "codec": ctx.name, "pix_fmt": pix_fmt, "bit_depth": bit_depth, "frames": frames}


def main(argv: list[str]) -> int:
    path, timeout = Path(argv[1]), float(argv[2])
    try:
        result = {"info": probe_file(path, timeout)}
    except ProbeFailure as err:
        result = {"error": err.reason, "message": err.message}
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
