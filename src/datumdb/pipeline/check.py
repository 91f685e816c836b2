"""Check a built split against the source it came from, and score it with a simple classifier.

:func:`datumdb.verify.verify_database` proves a database matches its own manifest. That is not
enough for a pipeline: a bug could write a self-consistent database of the wrong images. So
:func:`check_split` also goes back to the source (not to an intermediate: those are not kept):

* the expected record count and label histogram are recomputed from the source's labels and the
  (pure) split assignment, and compared with the manifest and the records;
* a seeded random sample of records is decoded and compared pixel for pixel with the source's
  sample at the same global index (for lossy JPEG: with the sample put through the same,
  deterministic, JPEG encoder and decoder);
* a nearest-class-mean classifier, fitted on the train split, is scored on the split: far above
  chance only if images and labels travelled together.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from datumdb.codec import datum_to_array, decode_image, encode_png_or_jpg, shape_name
from datumdb.errors import InputError
from datumdb.keys import index_key
from datumdb.manifest import read_manifest
from datumdb.pipeline.config import PipelineConfig
from datumdb.pipeline.sheet import SHEET_MAX, contact_sheet
from datumdb.pipeline.sources import open_source
from datumdb.pipeline.splits import SPLITS, assign_splits
from datumdb.reader import DatumReader
from datumdb.verify import verify_database

__all__ = ["check_split", "nearest_class_mean"]

_VERIFY_TAG = 0x7E81F  # separates the sampling stream from the other streams seeded with `seed`


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


def check_split(
    config: PipelineConfig, split: str, db: str | os.PathLike[str], train_db: str | os.PathLike[str]
) -> tuple[dict[str, Any], list[str], bytes]:
    """Verify one split; returns (details, problems, contact sheet PNG). ``problems`` empty = OK."""
    db = Path(db)
    if split not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    source = open_source(config.dataset, config.seed)
    all_labels = source.labels()
    assignment = assign_splits(source.count, config.seed, config.split.fractions)
    members = np.flatnonzero(assignment == SPLITS.index(split))  # global indices, in key order

    report = verify_database(db)  # digest, count, histogram and data.mdb hash vs the manifest
    problems: list[str] = list(report["problems"])
    manifest = read_manifest(db)
    expected_histogram = {str(k): int(v) for k, v in sorted(Counter(all_labels[members].tolist()).items())}
    first = source.read(0, 1)[0]
    dtype = "uint8" if first.dtype == np.uint8 else "float32"
    checks = [
        ("count", report["count"], len(members)),
        ("label histogram", report["label_histogram"], expected_histogram),
        ("manifest label histogram", manifest.get("label_histogram"), expected_histogram),
        ("decoded shapes", report["shapes"], {shape_name(source.shape): len(members)}),
        ("dtype", manifest.get("dtype"), dtype),
    ]
    for name, found, expected in checks:
        if found != expected:
            problems.append(f"{db}: {name} is {found!r}, expected {expected!r} from the source")

    rng = np.random.default_rng([config.seed, _VERIFY_TAG, SPLITS.index(split)])
    picked = np.sort(rng.choice(len(members), size=min(config.verify.sample, len(members)), replace=False))
    encoding = manifest.get("encoding")
    worst = 0.0
    sheet_images, sheet_labels, sheet_keys = [], [], []
    with DatumReader(db) as reader:
        for position in picked.tolist():
            key = index_key(position, len(members))
            index = int(members[position])
            raw_images, raw_labels = source.read(index, index + 1)
            raw = raw_images[0]
            try:
                datum = reader.datum(key)
                array = datum_to_array(datum, key=key)
            except (KeyError, ValueError) as exc:
                problems.append(f"{db}: sampled record {key.decode()} (sample {index}): {exc}")
                continue
            if datum.label != int(raw_labels[0]):
                problems.append(
                    f"{db}: record {key.decode()} has label {datum.label}, sample {index} has {raw_labels[0]}"
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
    details = {
        "split": split,
        "ok": not problems,
        "count": report["count"],
        "digest": report["digest"],
        "data_mdb_sha256": report["data_mdb_sha256"],
        "shape": list(source.shape),
        "dtype": manifest.get("dtype"),
        "encoding": encoding,
        "source": source.name,
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
        source.channel_order,
    )
    return details, problems, sheet


def verify_step(
    config: PipelineConfig,
    split: str,
    db: str | os.PathLike[str],
    train_db: str | os.PathLike[str],
    *,
    details: str | os.PathLike[str],
    metrics: str | os.PathLike[str],
    histogram: str | os.PathLike[str],
    sheet: str | os.PathLike[str],
) -> tuple[dict[str, Any], list[str]]:
    """Check ``split`` and, only if it passes, write its reports; returns (details, problems).

    ``details`` is the full JSON (with the fingerprint of what it checked); ``metrics`` the few
    numbers ``dvc metrics show`` prints (count, accuracy, a digest prefix); ``histogram`` the
    label counts as CSV (``dvc plots``); ``sheet`` the contact sheet PNG.
    """
    from datumdb.files import atomic_write
    from datumdb.pipeline.fingerprint import recorded_build_fingerprint, verify_record
    from datumdb.pipeline.summary import histogram_csv, json_bytes

    report, problems, png = check_split(config, split, db, train_db)
    if problems:
        return report, problems
    databases = {split: recorded_build_fingerprint(db), "train": recorded_build_fingerprint(train_db)}
    report["pipeline"] = verify_record(config, split, databases)
    small = {
        "count": report["count"],
        "ncm_accuracy": report["ncm_accuracy"],
        "chance_accuracy": report["chance_accuracy"],
        "digest": report["digest"].removeprefix("sha256:")[:12],
    }
    atomic_write(details, json_bytes(report))
    atomic_write(metrics, json_bytes(small))
    atomic_write(histogram, histogram_csv(report["label_histogram"]))
    atomic_write(sheet, png)
    return report, problems
