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
TEXT_WIDTH = 136  # caption width in pixels: a key of ~24 characters a line
LINE_HEIGHT = 13
KEY_LINES = 4  # a key longer than this many lines keeps its start and end, "..." between
_TITLE = (0.4, (0, 0, 0))  # font scale and colour of the label line, and of the key lines
_KEY = (0.35, (90, 90, 90))


def _wrap(text: str, style: tuple[float, tuple[int, int, int]]) -> list[str]:
    """``text`` cut into lines of at most TEXT_WIDTH pixels (OpenCV's Hershey font draws ASCII
    only: other characters show as '?'), at most KEY_LINES of them."""
    text = "".join(c if " " <= c <= "~" else "?" for c in text) or " "
    scale = style[0]

    def fits(line: str) -> bool:
        return cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] <= TEXT_WIDTH

    lines = [""]
    for char in text:
        if lines[-1] and not fits(lines[-1] + char):
            lines.append("")
        lines[-1] += char
    if len(lines) > KEY_LINES:  # the start (index, folder) and the end (file name) tell the most
        half = KEY_LINES // 2
        head, tail = lines[:half], lines[-half:]
        head[-1] = head[-1][:-3] + "..."
        lines = head + tail
    return lines


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
    images: Sequence[np.ndarray],
    labels: Sequence[int],
    keys: Sequence[str],
    channel_order: str,
    *,
    classes: Sequence[str] | None = None,
) -> bytes:
    """PNG bytes of a grid of (C, H, W) images, each captioned with its label (and class name,
    when known) and its whole key, wrapped over as many lines as it needs."""
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
        width = max(width, TEXT_WIDTH)
        title = f"label {label}"
        if classes is not None and 0 <= label < len(classes):
            title += f" {classes[label]}"
        captions = [(line, _TITLE) for line in _wrap(title, _TITLE)] + [(line, _KEY) for line in _wrap(key, _KEY)]
        tile = np.full((height + 8 + LINE_HEIGHT * len(captions), width + 8, 3), 255, dtype=np.uint8)
        tile[4 : 4 + height, 4 : 4 + hwc.shape[1]] = hwc
        for row, (line, (scale, colour)) in enumerate(captions):
            baseline = height + 4 + LINE_HEIGHT * (row + 1) - 3
            cv2.putText(tile, line, (4, baseline), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_8)
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
