"""Hostile inputs shared by the input-safety tests: forged image headers and float Datums."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np


def forged_jpeg(width: int = 60000, height: int = 60000) -> bytes:
    """A valid 8x8 JPEG whose SOF0 header claims ``width`` x ``height`` pixels."""
    ok, buf = cv2.imencode(".jpg", np.full((8, 8, 3), 128, np.uint8))
    assert ok
    data = bytearray(buf.tobytes())
    sof = data.find(b"\xff\xc0")
    assert sof > 0
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def forged_png(width: int = 60000, height: int = 60000) -> bytes:
    """A valid 8x8 PNG whose IHDR claims ``width`` x ``height`` pixels (its CRC fixed up)."""
    ok, buf = cv2.imencode(".png", np.full((8, 8, 3), 128, np.uint8))
    assert ok
    data = bytearray(buf.tobytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint, written independently of datumdb.codec (negatives as 64-bit)."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def alternating_float_datum(count: int) -> bytes:
    """A (1, 1, count) float Datum whose float_data fields alternate with an unknown field.

    Valid protobuf (every parser must accept it), but each float is its own run: the shape that
    made the old decoder spend ~37x the value's size and seconds per megabyte.
    """
    head = b"\x08\x01\x10\x01\x18" + varint(count) + b"\x28\x07"
    floats = np.arange(count, dtype="<f4")
    units = np.empty((count, 7), dtype=np.uint8)
    units[:, 0] = 0x35  # field 6, fixed32
    units[:, 1:5] = floats.view(np.uint8).reshape(-1, 4)
    units[:, 5:] = (0x40, 0x00)  # field 8, varint 0: unknown to Datum
    return head + units.tobytes()


def tiff_bomb(width: int = 8192, height: int = 8192, rows_per_strip: int = 4) -> bytes:
    """A ~18 KB TIFF declaring float64 RGBA (32 bytes a pixel: 2 GB at 8192 x 8192) whose every
    StripOffsets entry points at one Deflate strip of zeros, as in issue 17 (8.4 GB, 26 s)."""
    strip = zlib.compress(bytes(width * 32 * rows_per_strip), 9)
    strips = -(-height // rows_per_strip)
    count = 12
    bits_at = 8 + 2 + 12 * count + 4
    formats_at = bits_at + 8
    offsets_at = formats_at + 8
    counts_at = offsets_at + 4 * strips
    strip_at = counts_at + 4 * strips
    entries = [  # (tag, type, count, value or offset): SHORT = 3, LONG = 4
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 4, bits_at),  # BitsPerSample 64, 64, 64, 64
        (259, 3, 1, 8),  # Deflate
        (262, 3, 1, 2),  # RGB
        (273, 4, strips, offsets_at),
        (277, 3, 1, 4),
        (278, 4, 1, rows_per_strip),
        (279, 4, strips, counts_at),
        (284, 3, 1, 1),
        (338, 3, 1, 2),  # ExtraSamples: unassociated alpha
        (339, 3, 4, formats_at),  # SampleFormat: IEEE float
    ]
    out = bytearray(b"II*\x00" + struct.pack("<IH", 8, count))
    for tag, kind, number, value in entries:  # a single SHORT sits left-justified in the value field
        field = struct.pack("<HH", value, 0) if kind == 3 and number == 1 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, number) + field
    out += struct.pack("<I", 0) + struct.pack("<4H", 64, 64, 64, 64) + struct.pack("<4H", 3, 3, 3, 3)
    out += struct.pack(f"<{strips}I", *[strip_at] * strips) + struct.pack(f"<{strips}I", *[len(strip)] * strips)
    return bytes(out + strip)


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment of a JPEG; a scan's end includes its entropy-coded data."""
    segments, pos = [(0xD8, 0, 2)], 2
    while pos < len(data):
        marker = data[pos + 1]
        if marker == 0xD9:
            segments.append((marker, pos, pos + 2))
            break
        end = pos + 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if marker == 0xDA:  # entropy-coded data runs to the next marker that is not RSTn
            while not (data[end] == 0xFF and data[end + 1] != 0 and not 0xD0 <= data[end + 1] <= 0xD7):
                end += 1
        segments.append((marker, pos, end))
        pos = end
    return segments


def jpeg_scan_bomb(width: int = 4096, height: int = 4096, extra_scans: int = 3000) -> bytes:
    """A real progressive JPEG (OpenCV's) whose frame claims ``width`` x ``height`` and which
    holds ``extra_scans`` more scans without data: 10 bytes each, and each makes libjpeg sweep
    every block of a component (issue 17: 46 KB, 3,000 scans, 66 s)."""
    ok, buf = cv2.imencode(".jpg", np.full((8, 8, 3), 100, np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert ok
    data = bytearray(buf.tobytes())
    segments = jpeg_segments(bytes(data))
    frame = next(start for marker, start, _ in segments if marker == 0xC2)
    data[frame + 5 : frame + 9] = struct.pack(">HH", height, width)
    _, start, end = [segment for segment in segments if segment[0] == 0xDA][-1]
    empty_scan = bytes(data[start : start + 2 + struct.unpack(">H", data[start + 2 : start + 4])[0]])
    return bytes(data[:end]) + empty_scan * extra_scans + bytes(data[end:])
