"""Animated PNG from PNG frames of one size, in pure Python: each frame's
compressed image data is copied as is (IDAT for the first frame, fdAT for the
rest), so nothing is decoded or re-encoded. The frames must share their
header (size, bit depth, colour type), as screenshots of one clip do.

    write_apng(path, [png_bytes, ...], delays_ms=[...])
    read_frames(path) -> (width, height, delays_ms)   # to check one
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """The (type, data) chunks of a PNG file, CRCs checked."""
    if not png.startswith(SIGNATURE):
        raise ValueError("not a PNG file")
    out, at = [], len(SIGNATURE)
    while at < len(png):
        (length,) = struct.unpack(">I", png[at:at + 4])
        kind, data = png[at + 4:at + 8], png[at + 8:at + 8 + length]
        (crc,) = struct.unpack(">I", png[at + 8 + length:at + 12 + length])
        if zlib.crc32(kind + data) != crc:
            raise ValueError(f"bad CRC in chunk {kind!r}")
        out.append((kind, data))
        at += 12 + length
    return out


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_apng(path: Path, frames: list[bytes], delays_ms: list[int]) -> None:
    """Writes the frames as an endlessly looping animation, frame i shown
    for delays_ms[i] milliseconds."""
    if not frames or len(frames) != len(delays_ms):
        raise ValueError("need one delay per frame, and at least one frame")
    parsed = [chunks(f) for f in frames]
    header = parsed[0][0]
    if header[0] != b"IHDR" or any(p[0] != header for p in parsed):
        raise ValueError("the frames differ in size or pixel format")
    width, height = struct.unpack(">II", header[1][:8])
    # Ancillary chunks before the image data (colour space, gamma) come from the first frame.
    first_data = next(i for i, (kind, _) in enumerate(parsed[0]) if kind == b"IDAT")
    extras = parsed[0][1:first_data]
    out = [SIGNATURE, _chunk(b"IHDR", header[1]), _chunk(b"acTL", struct.pack(">II", len(frames), 0))]
    out += [_chunk(k, d) for k, d in extras]
    seq = 0
    for i, (p, delay) in enumerate(zip(parsed, delays_ms)):
        # fcTL: sequence, size, offset, delay (ms / 1000), dispose none, blend source
        out.append(_chunk(b"fcTL", struct.pack(">IIIIIHHBB", seq, width, height, 0, 0, delay, 1000, 0, 0)))
        seq += 1
        for kind, data in p:
            if kind != b"IDAT":
                continue
            if i == 0:
                out.append(_chunk(b"IDAT", data))
            else:
                out.append(_chunk(b"fdAT", struct.pack(">I", seq) + data))
                seq += 1
    out.append(_chunk(b"IEND", b""))
    Path(path).write_bytes(b"".join(out))


def read_frames(path: Path) -> tuple[int, int, list[int]]:
    """(width, height, each frame's delay in ms) of an animated PNG; checks
    that its frame count matches its acTL and that every frame has data."""
    cs = chunks(Path(path).read_bytes())
    width, height = struct.unpack(">II", cs[0][1][:8])
    actl = [d for k, d in cs if k == b"acTL"]
    if not actl:
        raise ValueError(f"{path} is not animated (no acTL chunk)")
    delays, has_data = [], []
    for kind, data in cs:
        if kind == b"fcTL":
            num, den = struct.unpack(">HH", data[20:24])
            delays.append(round(1000 * num / (den or 100)))
            has_data.append(False)
        elif kind in (b"IDAT", b"fdAT") and has_data:
            has_data[-1] = True
    if struct.unpack(">I", actl[0][:4])[0] != len(delays) or not all(has_data):
        raise ValueError(f"{path}: acTL says {struct.unpack('>I', actl[0][:4])[0]} frames, found {len(delays)}")
    return width, height, delays
