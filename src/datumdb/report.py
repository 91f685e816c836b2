"""Check a built split against the raw shard arrays it came from, and report on it.

:func:`datumdb.verify.verify_database` proves a database matches its own manifest. That is not
enough for a pipeline: a bug could write a self-consistent database of the wrong images. So
:func:`verify_split` also goes back to the raw shard arrays:

* the expected record count, label histogram, shape and dtype are recomputed from the shards
  and the (pure) split assignment, and compared with the manifest and the records;
* a seeded random sample of records is decoded and compared pixel for pixel with the raw
  array at the same global index (for lossy JPEG: with the raw array put through the same,
  deterministic, JPEG encoder and decoder);
* a nearest-class-mean classifier, fitted on the train split, is scored on the split: far
  above chance only if images and labels travelled together.

Its outputs (metrics JSON, label histogram CSV, contact sheet PNG) are pure functions of the
inputs, so DVC and Snakemake produce the same bytes.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from datumdb.codec import datum_to_array, decode_image, encode_png_or_jpg
from datumdb.errors import InputError
from datumdb.manifest import read_manifest
from datumdb.reader import DatumReader
from datumdb.shards import SPLITS, assign_splits, check_shard_ids, read_shard
from datumdb.verify import verify_database

__all__ = ["contact_sheet", "histogram_csv", "load_json", "nearest_class_mean", "summary_markdown", "verify_split"]

_VERIFY_TAG = 0x7E81F  # separates the sampling stream from the other streams seeded with `seed`
SHEET_COLUMNS = 8
SHEET_MAX = 64


def _load_shards(shard_dir: Path, shard_ids: Sequence[int]) -> tuple[list[np.ndarray], np.ndarray, dict[str, Any]]:
    check_shard_ids(shard_ids)
    images, labels, metas = [], [], []
    for shard in shard_ids:
        shard_images, shard_labels, meta = read_shard(shard_dir / str(shard))
        images.append(shard_images)
        labels.append(shard_labels)
        metas.append(meta)
    expected_start = 0
    for shard, meta in zip(shard_ids, metas, strict=True):
        if meta["start"] != expected_start or meta["count"] != metas[0]["count"]:
            raise InputError(f"{shard_dir / str(shard)}: shard ranges do not tile 0..count (stale shard folder?)")
        expected_start = meta["stop"]
    if expected_start != metas[0]["count"]:
        raise InputError(f"{shard_dir}: shards cover {expected_start} of {metas[0]['count']} samples")
    return images, np.concatenate(labels), metas[0]


def _class_means(db: Path) -> tuple[np.ndarray, np.ndarray]:
    """Mean image per label of a database (labels sorted), in float64."""
    sums: dict[int, np.ndarray] = {}
    counts: Counter[int] = Counter()
    with DatumReader(db) as reader:
        for key, datum in reader.datums():
            array = datum_to_array(datum, key=key).astype(np.float64).reshape(-1)
            if datum.label in sums:
                sums[datum.label] += array
            else:
                sums[datum.label] = array.copy()
            counts[datum.label] += 1
    classes = np.array(sorted(sums), dtype=np.int64)
    return classes, np.stack([sums[c] / counts[c] for c in classes]) if len(classes) else np.empty((0, 0))


def nearest_class_mean(train_db: str | os.PathLike[str], db: str | os.PathLike[str]) -> dict[str, Any]:
    """Accuracy on ``db`` of the classifier 'label of the nearest train class mean' (and chance)."""
    classes, means = _class_means(Path(train_db))
    if not len(classes):
        raise InputError(f"{train_db}: the train split is empty; no class means")
    correct = total = 0
    with DatumReader(db) as reader:
        for key, datum in reader.datums():
            x = datum_to_array(datum, key=key).astype(np.float64).reshape(-1)
            if x.size != means.shape[1]:
                raise InputError(f"{db}: record {key!r} has {x.size} values, train images {means.shape[1]}")
            predicted = classes[int(np.argmin(((means - x) ** 2).sum(axis=1)))]
            correct += int(predicted == datum.label)
            total += 1
    return {
        "accuracy": round(correct / total, 6) if total else None,
        "chance": round(1.0 / len(classes), 6),
        "classes": len(classes),
        "evaluated": total,
    }


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
        scale = max(1, 64 // max(hwc.shape[:2]))
        hwc = cv2.resize(np.ascontiguousarray(hwc), None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
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


def verify_split(
    db: str | os.PathLike[str],
    *,
    split: str,
    shard_dir: str | os.PathLike[str],
    shard_ids: Sequence[int],
    train_db: str | os.PathLike[str],
    seed: int,
    fractions: Sequence[float],
    sample: int,
) -> tuple[dict[str, Any], list[str], bytes]:
    """Verify one split; returns (metrics, problems, contact sheet PNG). ``problems`` empty = OK."""
    db, shard_dir = Path(db), Path(shard_dir)
    if split not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if sample < 0:
        raise InputError(f"verify sample size must be >= 0, got {sample}")
    shard_images, all_labels, meta = _load_shards(shard_dir, shard_ids)
    count = int(meta["count"])
    assignment = assign_splits(count, seed, fractions)
    members = np.flatnonzero(assignment == SPLITS.index(split))  # global indices, in key order
    starts = np.cumsum([0] + [len(images) for images in shard_images])

    report = verify_database(db)  # digest, count, histogram and data.mdb hash vs the manifest
    problems: list[str] = list(report["problems"])
    manifest = read_manifest(db)
    expected_histogram = {str(k): int(v) for k, v in sorted(Counter(all_labels[members].tolist()).items())}
    shape_key = "x".join(map(str, meta["shape"]))
    dtype = "uint8" if meta["dtype"] == "uint8" else "float32"
    checks = [
        ("count", report["count"], len(members)),
        ("label histogram", report["label_histogram"], expected_histogram),
        ("manifest label histogram", manifest.get("label_histogram"), expected_histogram),
        ("decoded shapes", report["shapes"], {shape_key: len(members)}),
        ("dtype", manifest.get("dtype"), dtype),
    ]
    for name, found, expected in checks:
        if found != expected:
            problems.append(f"{db}: {name} is {found!r}, expected {expected!r} from the raw shards")

    rng = np.random.default_rng([seed, _VERIFY_TAG, SPLITS.index(split)])
    picked = np.sort(rng.choice(len(members), size=min(sample, len(members)), replace=False))
    key_width = max(8, len(str(max(len(members) - 1, 0))))
    encoding = manifest.get("encoding")
    worst = 0.0
    sheet_images, sheet_labels, sheet_keys = [], [], []
    with DatumReader(db) as reader:
        for position in picked.tolist():
            key = b"%0*d" % (key_width, position)
            index = int(members[position])
            shard = int(np.searchsorted(starts, index, side="right")) - 1
            raw = np.asarray(shard_images[shard][index - starts[shard]])
            try:
                datum = reader.datum(key)
                array = datum_to_array(datum, key=key)
            except (KeyError, ValueError) as exc:
                problems.append(f"{db}: sampled record {key.decode()} (sample {index}): {exc}")
                continue
            if datum.label != int(all_labels[index]):
                problems.append(
                    f"{db}: record {key.decode()} has label {datum.label}, sample {index} has {all_labels[index]}"
                )
            if array.shape != raw.shape:
                problems.append(f"{db}: record {key.decode()} is {array.shape}, sample {index} is {raw.shape}")
                continue
            if encoding == "jpg":  # lossy: compare with the raw sample put through the same JPEG codec
                expected = decode_image(encode_png_or_jpg(raw, "jpg", key), "unchanged", key)
            else:
                expected = raw
            differs = array.dtype != expected.dtype or not np.array_equal(array, expected)
            diff = float(np.abs(array.astype(np.float64) - raw.astype(np.float64)).mean())
            worst = max(worst, diff)
            if differs:
                problems.append(f"{db}: record {key.decode()} differs from sample {index} (mean |diff| {diff:.3f})")
            if len(sheet_images) < SHEET_MAX:
                sheet_images.append(np.array(array))
                sheet_labels.append(datum.label)
                sheet_keys.append(key.decode())
    ncm = nearest_class_mean(train_db, db)
    metrics = {
        "split": split,
        "ok": not problems,
        "count": report["count"],
        "digest": report["digest"],
        "data_mdb_sha256": report["data_mdb_sha256"],
        "shape": list(meta["shape"]),
        "dtype": manifest.get("dtype"),
        "encoding": encoding,
        "source": meta["source"],
        "sampled": len(picked),
        "sample_max_mean_abs_diff": round(worst, 6),
        "ncm_accuracy": ncm["accuracy"],
        "chance_accuracy": ncm["chance"],
        "label_histogram": report["label_histogram"],
    }
    by_label = sorted(range(len(sheet_keys)), key=lambda i: (sheet_labels[i], sheet_keys[i]))  # classes side by side
    sheet = contact_sheet(
        [sheet_images[i] for i in by_label],
        [sheet_labels[i] for i in by_label],
        [sheet_keys[i] for i in by_label],
        str(meta.get("channel_order")),
    )
    return metrics, problems, sheet


def histogram_csv(histogram: dict[str, int]) -> bytes:
    """The label histogram as CSV (``label,count``), for DVC plots."""
    lines = ["label,count"] + [f"{label},{count}" for label, count in histogram.items()]
    return ("\n".join(lines) + "\n").encode("utf-8")


def summary_markdown(verify_metrics: Sequence[dict[str, Any]], mean: dict[str, Any]) -> str:
    """The final human-readable report: one row per split, the train mean, and the verdict."""
    lines = [
        "# datumdb dataset report",
        "",
        "| split | records | shape | encoding | NCM accuracy | chance | verified | content digest |",
        "|---|---:|---|---|---:|---:|---|---|",
    ]
    for m in verify_metrics:
        lines.append(
            f"| {m['split']} | {m['count']} | {'x'.join(map(str, m['shape']))} | {m['encoding']} | "
            f"{m['ncm_accuracy']} | {m['chance_accuracy']} | {'yes' if m['ok'] else 'NO'} | `{m['digest']}` |"
        )
    channel_means = ", ".join(f"{v:.4f}" for v in mean.get("channel_means", []))
    lines += ["", f"Train mean per channel (stored order): {channel_means}", ""]
    return "\n".join(lines)


def load_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a JSON report file, with an error naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: not found") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
