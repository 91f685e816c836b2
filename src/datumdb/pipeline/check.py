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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from datumdb.codec import Datum, ImreadMode, datum_to_array, decode_image, encode_png_or_jpg, shape_name
from datumdb.errors import InputError
from datumdb.imageset import keeps_file_bytes
from datumdb.keys import index_key
from datumdb.manifest import read_manifest
from datumdb.pipeline.config import PipelineConfig
from datumdb.pipeline.sheet import SHEET_MAX, contact_sheet
from datumdb.pipeline.sources import ImageFiles, Source, open_source
from datumdb.pipeline.splits import SPLITS, assign_splits
from datumdb.reader import DatumReader
from datumdb.verify import verify_database

__all__ = ["check_split", "nearest_class_mean"]

_VERIFY_TAG = 0x7E81F  # separates the sampling stream from the other streams seeded with `seed`
_NCM_TAG = 0x9C3A1  # the classifier's sample of a large database


NCM_SIDE = 32
"""Images of varying sizes are resized (area) to NCM_SIDE x NCM_SIDE before the class means."""
NCM_MAX_RECORDS = 2_000
"""At most this many records (a seeded sample) enter the class means, and as many are scored:
enough to tell a classifier far above chance from one at chance, and cheap next to the full
decode verify already does (each verify job reads the train split's sample too)."""


def _features(datum: Datum, key: bytes, mixed: bool, imread: ImreadMode) -> np.ndarray:
    array = datum_to_array(datum, imread=imread, key=key)
    if mixed:  # one feature length for every size: channels kept, area resize of each plane
        hwc = np.ascontiguousarray(array.transpose(1, 2, 0))
        small = cv2.resize(hwc, (NCM_SIDE, NCM_SIDE), interpolation=cv2.INTER_AREA).reshape(NCM_SIDE, NCM_SIDE, -1)
        array = small[:, :, :1] if array.shape[0] == 1 else small[:, :, :3]
    return array.astype(np.float64).reshape(-1)


def _datums(reader: DatumReader, seed: int) -> Iterator[tuple[bytes, Datum]]:
    """Every record in key order, or a seeded sample of NCM_MAX_RECORDS of them (in key order)."""
    if len(reader) <= NCM_MAX_RECORDS:
        yield from reader.datums()
        return
    picked = np.sort(np.random.default_rng([seed, _NCM_TAG]).choice(len(reader), NCM_MAX_RECORDS, replace=False))
    for index in picked.tolist():
        key = reader.key(index)
        yield key, reader.datum(key)


def _class_means(db: Path, mixed: bool, seed: int, imread: ImreadMode) -> tuple[np.ndarray, np.ndarray]:
    """Mean image per label of a database (labels sorted), in float64."""
    sums: dict[int, np.ndarray] = {}
    counts: Counter[int] = Counter()
    with DatumReader(db) as reader:
        for key, datum in _datums(reader, seed):
            array = _features(datum, key, mixed, imread)
            if datum.label in sums:
                sums[datum.label] += array
            else:
                sums[datum.label] = array.copy()
            counts[datum.label] += 1
    classes = np.array(sorted(sums), dtype=np.int64)
    return classes, np.stack([sums[c] / counts[c] for c in classes]) if len(classes) else np.empty((0, 0))


def nearest_class_mean(
    train_db: str | os.PathLike[str],
    db: str | os.PathLike[str],
    *,
    mixed: bool = False,
    seed: int = 0,
    imread: ImreadMode = "unchanged",
) -> dict[str, Any]:
    """Accuracy on ``db`` of the classifier 'label of the nearest train class mean' (and chance).

    ``mixed``: the images have varying sizes, compared at NCM_SIDE x NCM_SIDE. Databases over
    NCM_MAX_RECORDS records are judged on a seeded sample (decoding a million photos to check
    that labels travelled with their images would cost as much as the build, and it is the
    longest job of the pipeline). ``imread`` decodes
    encoded images ("color" turns a grey JPEG among colour ones into three channels, as Caffe).
    """
    classes, means = _class_means(Path(train_db), mixed, seed, imread)
    if not len(classes):
        raise InputError(f"{train_db}: the train split is empty; no class means")
    correct = total = 0
    with DatumReader(db) as reader:
        for key, datum in _datums(reader, seed):
            x = _features(datum, key, mixed, imread)
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
    source = open_source(config.dataset, config.seed, config.encoding)
    files = source.files
    all_labels = source.labels()
    assignment = assign_splits(source.count, config.seed, config.split.fractions)
    members = np.flatnonzero(assignment == SPLITS.index(split))  # global indices, in key order

    report = verify_database(db)  # digest, count, histogram and data.mdb hash vs the manifest
    problems: list[str] = list(report["problems"])
    manifest = read_manifest(db)
    skipped = manifest.get("metadata", {}).get("skipped", []) if files is not None else []
    left_out = _left_out(skipped, members, files, db, problems)
    kept = members[~np.isin(np.arange(len(members)), sorted(left_out))] if left_out else members
    expected_histogram = {str(k): int(v) for k, v in sorted(Counter(all_labels[kept].tolist()).items())}
    checks = [
        ("count", report["count"], len(kept)),
        ("label histogram", report["label_histogram"], expected_histogram),
        ("manifest label histogram", manifest.get("label_histogram"), expected_histogram),
        ("dtype", manifest.get("dtype"), "uint8" if files is not None else _dtype(source)),
    ]
    if source.shape is not None:
        checks.append(("decoded shapes", report["shapes"], {shape_name(source.shape): len(kept)}))
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
            if position in left_out:
                continue
            index = int(members[position])
            key = files.key(index, position) if files is not None else index_key(position, len(members))
            raw = source.load(index)
            label = int(all_labels[index])
            try:
                datum = reader.datum(key)
                if files is not None and config.encoding != "none":
                    array, expected, differs = _compare_file(datum, files, index, raw, key)
                else:
                    array = datum_to_array(datum, key=key)
                    expected = _lossy(raw, key) if encoding == "jpg" else raw
                    differs = array.shape != expected.shape or array.dtype != expected.dtype
                    differs = differs or not np.array_equal(array, expected)
            except (KeyError, ValueError) as exc:
                problems.append(f"{db}: sampled record {key.decode(errors='replace')} (sample {index}): {exc}")
                continue
            name = key.decode(errors="replace")
            if datum.label != label:
                problems.append(f"{db}: record {name} has label {datum.label}, sample {index} has {label}")
            if array.shape != raw.shape:
                problems.append(f"{db}: record {name} is {array.shape}, sample {index} is {raw.shape}")
                continue
            diff = float(np.abs(array.astype(np.float64) - raw.astype(np.float64)).mean())
            worst = max(worst, diff)
            if differs:
                problems.append(f"{db}: record {name} differs from sample {index} (mean |diff| {diff:.3f})")
            if len(sheet_images) < SHEET_MAX:
                sheet_images.append(np.array(array))
                sheet_labels.append(datum.label)
                sheet_keys.append(name)
    mixed = source.shape is None
    imread: ImreadMode = "unchanged" if files is None else ("gray" if files.options.gray else "color")
    ncm = nearest_class_mean(train_db, db, mixed=mixed, seed=config.seed, imread=imread)
    details = {
        "split": split,
        "ok": not problems,
        "count": report["count"],
        "digest": report["digest"],
        "data_mdb_sha256": report["data_mdb_sha256"],
        "shape": list(source.shape) if source.shape is not None else None,
        "dtype": manifest.get("dtype"),
        "encoding": encoding,
        "source": source.name,
        "sampled": len(picked) - len(left_out.intersection(picked.tolist())),
        "sample_max_mean_abs_diff": round(worst, 6),
        "ncm_accuracy": ncm["accuracy"],
        "chance_accuracy": ncm["chance"],
        "label_histogram": report["label_histogram"],
    }
    if manifest.get("encodings"):  # "mixed": how many of each (the file bytes of a folder of JPEGs and PNGs)
        details["encodings"] = manifest["encodings"]
    if files is not None:
        details["skipped"] = skipped
        details["shapes"] = report["shapes"] if mixed else None  # at most SHAPES_LISTED, the most common
        if mixed and report.get("shape_summary") is not None:
            details["shape_summary"] = report["shape_summary"]
        details["params_encoding"] = config.encoding  # "original": the records are the files' own bytes
        if files.classes is not None:
            details["classes"] = files.classes
    by_label = sorted(range(len(sheet_keys)), key=lambda i: (sheet_labels[i], sheet_keys[i]))  # classes side by side
    sheet = contact_sheet(
        [sheet_images[i] for i in by_label],
        [sheet_labels[i] for i in by_label],
        [sheet_keys[i] for i in by_label],
        source.channel_order,
        classes=files.classes if files is not None else None,
    )
    return details, problems, sheet


def _dtype(source: Source) -> str:
    return "uint8" if source.read(0, 1)[0].dtype == np.uint8 else "float32"


def _lossy(raw: np.ndarray, key: bytes) -> np.ndarray:
    """A raw sample put through the same, deterministic, JPEG encoder and decoder."""
    return decode_image(encode_png_or_jpg(raw, "jpg", key), "unchanged", key)


def _left_out(
    skipped: list[dict[str, Any]], members: np.ndarray, files: ImageFiles | None, db: Path, problems: list[str]
) -> set[int]:
    """Positions the manifest says were skipped, each checked against the file it names."""
    positions: set[int] = set()
    for sample in skipped:
        position = sample.get("position")
        if not isinstance(position, int) or not 0 <= position < len(members) or files is None:
            problems.append(f"{db}: the manifest lists a skipped sample that is not in this split: {sample!r}")
            continue
        if files.describe(int(members[position])) != {"path": sample.get("path"), "line": sample.get("line")}:
            problems.append(f"{db}: skipped sample {sample!r} is not the file at position {position} of the split")
        positions.add(position)
    return positions


def _compare_file(
    datum: Datum, files: ImageFiles, index: int, raw: np.ndarray, key: bytes
) -> tuple[np.ndarray, np.ndarray, bool]:
    """An encoded record against its file: (decoded record, what it should decode to, differs).

    Caffe stores a file's own bytes when nothing changes it (no resize, its type is the wanted
    one; ``original`` always): those must be byte-equal to the file. A re-encoded image must
    decode to the file's pixels (through one more JPEG round trip when the encoding is lossy).
    """
    mode: ImreadMode = "gray" if files.options.gray else "color"
    data = bytes(datum.data)
    if not datum.encoded:
        raise ValueError("stored raw, but the params ask for encoded images")
    original = data == files.file_bytes(index)
    stays_original = keeps_file_bytes(files.entries[index].path, files.options)
    array = decode_image(data, mode, key)
    if stays_original or original:
        return array, raw, original != stays_original or not np.array_equal(array, raw)
    expected = _lossy(raw, key) if files.options.encode_type == "jpg" else raw
    return array, expected, array.shape != expected.shape or not np.array_equal(array, expected)


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
    from datumdb.files import atomic_write, check_output_names
    from datumdb.pipeline.fingerprint import recorded_build_fingerprint, verify_record
    from datumdb.pipeline.summary import histogram_csv, json_bytes

    check_output_names([details, metrics, histogram, sheet], [db, train_db])
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
    atomic_write(histogram, histogram_csv(report["label_histogram"], report.get("classes")))
    atomic_write(sheet, png)
    return report, problems
