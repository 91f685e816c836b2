"""The contact sheet: a grid of a split's verified sample, each image with its label and key.

What a person looks at to trust a dataset: wrong colours (RGB stored as BGR), labels that do
not match their images, or garbage show at a glance. Deterministic PNG bytes (OpenCV's encoder,
fixed fonts and layout), so both orchestrators write the same file.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from datumdb.errors import InputError

__all__ = ["SHEET_COLUMNS", "SHEET_MAX", "contact_sheet"]

SHEET_COLUMNS = 8
SHEET_MAX = 64
TILE_SIDE = 64  # every image is shown within a TILE_SIDE square, its aspect ratio kept


def _fit(hwc: np.ndarray) -> np.ndarray:
    """Letterbox: a small image is enlarged by a whole factor (pixels stay sharp), a large one
    shrunk (area averaging) until its longer side is TILE_SIDE; mixed sizes then share one grid."""
    longest = max(hwc.shape[:2])
    if longest <= TILE_SIDE:
        scale = max(1, TILE_SIDE // longest)
        return cv2.resize(hwc, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    height, width = (max(1, round(side * TILE_SIDE / longest)) for side in hwc.shape[:2])
    return cv2.resize(hwc, (width, height), interpolation=cv2.INTER_AREA)


def contact_sheet(
    images: Sequence[np.ndarray], labels: Sequence[int], keys: Sequence[str], channel_order: str
) -> bytes:
    """PNG bytes of a grid of (C, H, W) images, each captioned with its label and key."""
    tiles = []
    for image, label, key in zip(images, labels, keys, strict=True):
        chw = np.asarray(image)
        if chw.dtype != np.uint8:  # float data: stretch to the 8-bit range for display
            low, high = float(chw.min()), float(chw.max())
            chw = ((chw - low) * (255.0 / (high - low or 1.0))).round().astype(np.uint8)
        hwc = chw.transpose(1, 2, 0)
        if hwc.shape[2] == 1:
            hwc = cv2.cvtColor(hwc, cv2.COLOR_GRAY2BGR)
        elif hwc.shape[2] == 3 and channel_order == "RGB":
            hwc = hwc[:, :, ::-1]
        elif hwc.shape[2] != 3:
            hwc = cv2.cvtColor(np.ascontiguousarray(hwc[:, :, :1]), cv2.COLOR_GRAY2BGR)
        hwc = _fit(np.ascontiguousarray(hwc))
        height, width = hwc.shape[:2]
        width = max(width, 72)
        tile = np.full((height + 34, width + 8, 3), 255, dtype=np.uint8)
        tile[4 : 4 + height, 4 : 4 + hwc.shape[1]] = hwc
        font = cv2.FONT_HERSHEY_SIMPLEX
        cv2.putText(tile, f"label {label}", (4, height + 17), font, 0.4, (0, 0, 0), 1, cv2.LINE_8)
        cv2.putText(tile, key, (4, height + 30), font, 0.35, (90, 90, 90), 1, cv2.LINE_8)
        tiles.append(tile)
    if not tiles:
        tiles.append(np.full((40, 120, 3), 255, dtype=np.uint8))
    tile_h = max(t.shape[0] for t in tiles)
    tile_w = max(t.shape[1] for t in tiles)
    columns = min(SHEET_COLUMNS, len(tiles))
    rows = -(-len(tiles) // columns)
    sheet = np.full((rows * tile_h, columns * tile_w, 3), 255, dtype=np.uint8)
    for index, tile in enumerate(tiles):
        r, c = divmod(index, columns)
        sheet[r * tile_h : r * tile_h + tile.shape[0], c * tile_w : c * tile_w + tile.shape[1]] = tile
    ok, buffer = cv2.imencode(".png", sheet)
    if not ok:
        raise InputError("OpenCV could not encode the contact sheet")
    return buffer.tobytes()
