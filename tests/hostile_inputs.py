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
