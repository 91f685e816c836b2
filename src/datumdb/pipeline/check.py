"""Check a built split against the source it came from, and score it with a simple classifier.

:func:`datumdb.verify.verify_database` proves a database matches its own manifest (the shards
job runs it on every shard it writes). That is not enough for a pipeline: a bug could write a
self-consistent database of the wrong images. So :func:`check_split` also goes back to the
source:

* the shard set must hold exactly the planned shards (:mod:`datumdb.pipeline.plan`, recomputed
  from the params and inputs), each recording its planned fingerprint; the expected record
  count and label histogram come from the plan's members and are compared with the manifests;
* a seeded random sample of records is decoded and compared pixel for pixel with the source's
  sample at the same global index (for lossy JPEG: with the sample put through the same,
  deterministic, JPEG encoder and decoder);
* a nearest-class-mean classifier, fitted on the train split, is scored on the split: far above
  chance only if images and labels travelled together.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from datumdb.codec import (
    Datum,
    ImreadMode,
    datum_to_array,
    decode_image,
    encode_png_or_jpg,
    hwc_to_chw,
    imdecode,
    shape_name,
)
from datumdb.errors import DatumDBError, InputError
from datumdb.files import atomic_write
from datumdb.imageset import keeps_file_bytes, load_image
from datumdb.manifest import SHARD_INDEX, listed_shapes, read_manifest, shape_summary
from datumdb.pipeline import outputs
from datumdb.pipeline.config import STATE_DIR, PipelineConfig
from datumdb.pipeline.fingerprint import code_digest
from datumdb.pipeline.plan import Plan, ShardTask, imageset_identities, load_hash_cache, make_plan, save_hash_cache
from datumdb.pipeline.processes import in_processes
from datumdb.pipeline.sheet import SHEET_MAX, contact_sheet
from datumdb.pipeline.sources import ImageFiles, Source, imageset_options, listed_images, open_source
from datumdb.pipeline.splits import SPLITS
from datumdb.reader import DatumReader
from datumdb.shardset import ShardSetReader, merged_summary, read_shard_index, shard_key, shard_set_digest

__all__ = ["check_split", "nearest_class_mean", "verify_splits", "verify_step"]

_VERIFY_TAG = 0x7E81F  # separates the sampling stream from the other streams seeded with `seed`
_NCM_TAG = 0x9C3A1  # the classifier's sample of a large database


NCM_SIDE = 32
"""Images of varying sizes, and images larger than this on a side, are resized (area) to NCM_SIDE
x NCM_SIDE before the class means: at full size a 256 x 256 photo is 196 608 numbers, and scoring
500 records against 100 class means of that length took half a minute per split."""
NCM_MAX_RECORDS = 500
"""At most this many records (a seeded sample) enter the class means, and as many are scored:
enough to tell a classifier far above chance from one at chance (a few per class of ImageNet's
thousand would not rank it, but chance is then 0.1%), and cheap whatever the split's size: each
verify job reads the train split's sample too, and a version reruns every changed split's."""


CLASS_MEANS_CACHE = STATE_DIR / "class-means.npz"
"""The train split's class means, kept by the first verify job of a version for the others: each
verify job scores its split against them, and opening the train shard set and decoding its sample
was half of a val or test job. One file, keyed by the train set's content digests and everything
else the means depend on (another key, or a damaged file: computed again, never trusted)."""


# Photos of their own sizes are compared at NCM_SIDE x NCM_SIDE: JPEG decodes them at an eighth of
# their size in the DCT (several times faster than a full decode), which is still larger than that.
_PREVIEW_FLAGS = {"color": cv2.IMREAD_REDUCED_COLOR_8, "gray": cv2.IMREAD_REDUCED_GRAYSCALE_8}


def _features(datum: Datum, key: bytes, mixed: bool, imread: ImreadMode) -> np.ndarray:
    if mixed and datum.encoded and imread in _PREVIEW_FLAGS:
        array = hwc_to_chw(imdecode(datum.data, _PREVIEW_FLAGS[imread], key))
    else:
        array = datum_to_array(datum, imread=imread, key=key)
    if mixed or max(array.shape[1:]) > NCM_SIDE:  # one small feature length: area resize of each plane
        hwc = np.ascontiguousarray(array.transpose(1, 2, 0))
        small = cv2.resize(hwc, (NCM_SIDE, NCM_SIDE), interpolation=cv2.INTER_AREA).reshape(NCM_SIDE, NCM_SIDE, -1)
        if mixed:  # photos: one plane if grey, else the first three (an alpha plane left out)
            small = small[:, :, :1] if array.shape[0] == 1 else small[:, :, :3]
        array = small
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


@contextmanager
def _opened(db: str | os.PathLike[str] | DatumReader) -> Iterator[DatumReader]:
    """``db`` if it is open already (left open), else a reader closed afterwards."""
    if isinstance(db, DatumReader):
        yield db
        return
    with DatumReader(db) as reader:
        yield reader


def _class_means(
    db: str | os.PathLike[str] | DatumReader, mixed: bool, seed: int, imread: ImreadMode
) -> tuple[np.ndarray, np.ndarray]:
    """Mean image per label of a database (labels sorted), in float64."""
    sums: dict[int, np.ndarray] = {}
    counts: Counter[int] = Counter()
    with _opened(db) as reader:
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
    train_db: str | os.PathLike[str] | DatumReader,
    db: str | os.PathLike[str] | DatumReader,
    *,
    mixed: bool = False,
    seed: int = 0,
    imread: ImreadMode = "unchanged",
    cache: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Accuracy on ``db`` of the classifier 'label of the nearest train class mean' (and chance).

    ``mixed``: the images have varying sizes, compared at NCM_SIDE x NCM_SIDE. Databases over
    NCM_MAX_RECORDS records are judged on a seeded sample (decoding a million photos to check
    that labels travelled with their images would cost as much as the build, and it is the
    longest job of the pipeline). ``imread`` decodes
    encoded images ("color" turns a grey JPEG among colour ones into three channels, as Caffe).
    Either database may be given open (a reader the caller keeps): a shard set of thousands of
    shards is not opened again. ``cache``: a file keeping the train class means between calls
    (:data:`CLASS_MEANS_CACHE`); a train set of unknown content digest is never cached.
    """
    classes, means = _cached_class_means(train_db, mixed, seed, imread, cache)
    if not len(classes):
        path = train_db.path if isinstance(train_db, DatumReader) else train_db
        raise InputError(f"{path}: the train split is empty; no class means")
    features, labels = [], []
    with _opened(db) as reader:
        for key, datum in _datums(reader, seed):
            x = _features(datum, key, mixed, imread)
            if x.size != means.shape[1]:
                raise InputError(f"{reader.path}: record {key!r} has {x.size} values, train images {means.shape[1]}")
            features.append(x)
            labels.append(datum.label)
    correct = 0
    if features:  # squared distances to every mean at once: |x|^2 - 2 x.m + |m|^2
        x = np.stack(features)
        distances = (x * x).sum(axis=1)[:, None] - 2.0 * (x @ means.T) + (means * means).sum(axis=1)[None, :]
        correct = int((classes[np.argmin(distances, axis=1)] == np.array(labels)).sum())
    total = len(features)
    return {
        "accuracy": round(correct / total, 6) if total else None,
        "chance": round(1.0 / len(classes), 6),
        "classes": len(classes),
        "evaluated": total,
    }


def _cached_class_means(
    train_db: str | os.PathLike[str] | DatumReader,
    mixed: bool,
    seed: int,
    imread: ImreadMode,
    cache: str | os.PathLike[str] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_class_means`, from ``cache`` when it holds them for this train set (its listed
    content digests: nothing opened), else computed and kept there for the next verify job."""
    if cache is not None:
        key = _class_means_key(_listed_digests(train_db), mixed, seed, imread)
        if key is not None:
            try:
                with np.load(io.BytesIO(Path(cache).read_bytes()), allow_pickle=False) as kept:
                    if str(kept["key"]) == key:
                        return kept["classes"], kept["means"]
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                pass  # none yet, or damaged: computed again
    with _opened(train_db) as train:
        classes, means = _class_means(train, mixed, seed, imread)
        key = _class_means_key(_listed_digests(train), mixed, seed, imread)  # of the version read
    if cache is not None and key is not None:
        buffer = io.BytesIO()
        np.savez(buffer, key=np.array(key), classes=classes, means=means)
        atomic_write(cache, buffer.getvalue())
    return classes, means


def _listed_digests(db: str | os.PathLike[str] | DatumReader) -> list[str | None]:
    """The content digests a database or shard set lists (its manifest or index): a reader's of
    the version it pinned, a path's read unopened."""
    if isinstance(db, DatumReader):  # a shard set's version: its shards', in order
        versions = db.version if isinstance(db, ShardSetReader) else (db.version,)
        return [version.digest for version in versions]
    try:
        if (Path(db) / SHARD_INDEX).is_file():
            return [shard.get("digest") for shard in read_shard_index(db)["shards"]]
        return [read_manifest(db).get("digest")]
    except (OSError, DatumDBError):
        return [None]


def _class_means_key(digests: list[str | None], mixed: bool, seed: int, imread: ImreadMode) -> str | None:
    if not digests or not all(isinstance(digest, str) for digest in digests):
        return None  # content unknown (a database without a manifest): never cached
    what = [digests, mixed, seed, imread, NCM_SIDE, NCM_MAX_RECORDS, code_digest("verify")]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()


def check_split(
    config: PipelineConfig,
    split: str,
    db: str | os.PathLike[str],
    train_db: str | os.PathLike[str],
    *,
    plan: Plan | None = None,
) -> tuple[dict[str, Any], list[str], bytes]:
    """Verify one split's shard set; returns (details, problems, contact sheet PNG). ``problems`` empty = OK.

    The plan (recomputed from the params and inputs, the input hashes from the shared cache)
    says which shards the set must hold and what each must record; each shard's records were
    checked against their manifest by the job that wrote them, so this reads manifests, the
    sampled records and the classifier's sample only.
    """
    db = Path(db)
    if split not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    # With the orchestrator's plan, only the sampled files are resolved (and read)
    listed = listed_images(config.dataset, lazy=plan is not None) if config.dataset.source == "imageset" else None
    if plan is None:
        cache = load_hash_cache()
        plan = make_plan(config, cache, listed=listed)
        save_hash_cache(cache)
    tasks = plan.shards[split]
    split_plan = plan.split_plan(split)
    files = _listed_files(config, listed) if listed is not None else None
    source = open_source(config.dataset, config.seed, config.encoding) if files is None else files.source(config)
    problems: list[str] = []
    index = read_shard_index(db)
    names = [shard["name"] for shard in index["shards"]]
    if names != [task.name for task in tasks]:
        problems.append(
            f"{db}/{SHARD_INDEX}: lists {len(names)} shards, the plan of {split} {len(tasks)} "
            "(or others, or in another order): another split's set, or made for other samples"
        )
        return {"split": split, "ok": False}, problems, b""
    if (index.get("pipeline") or {}).get("fingerprint") != split_plan["fingerprint"]:
        problems.append(f"{db}/{SHARD_INDEX}: made for other params or inputs than these")
    kept: list[tuple[ShardTask, int, int]] = []  # (task, member number, position in the shard)
    skipped: list[dict[str, Any]] = []
    labels: Counter[int] = Counter()
    shapes: Counter[str] = Counter()
    manifests = []
    for task, entry in zip(tasks, index["shards"], strict=False):
        manifest = read_manifest(db / task.name)
        manifests.append(manifest)
        metadata = manifest.get("metadata") or {}
        if (metadata.get("pipeline") or {}).get("fingerprint") != task.fingerprint:
            problems.append(f"{db / task.name}: built from other members or params than the plan's")
            continue
        left_out = {s.get("position") for s in metadata.get("skipped") or []}
        for sample in metadata.get("skipped") or []:
            position = sample.get("position")
            if not isinstance(position, int) or not 0 <= position < len(task.members) or files is None:
                problems.append(f"{db / task.name}: the manifest lists a skipped sample not in the shard: {sample!r}")
            elif task.members[position][0].split("\0")[0] != sample.get("path"):
                problems.append(f"{db / task.name}: skipped sample {sample!r} is not member {position}")
            skipped.append({k: sample.get(k) for k in ("path", "line", "reason")})
        local = 0
        for number, member in enumerate(task.members):
            if number in left_out:
                continue
            kept.append((task, number, local))
            labels[int(member[1])] += 1
            local += 1
        if manifest["count"] != local or entry["count"] != local or entry.get("digest") != manifest["digest"]:
            problems.append(
                f"{db / task.name}: holds {manifest['count']} records, the plan {local} (or the index differs)"
            )
        shapes.update(metadata.get("all_shapes") or {})
    expected_histogram = {str(k): int(v) for k, v in sorted(labels.items())}
    # The set's statistics from the manifests just read (as its reader adds them up), not through
    # the reader: that would open every shard's database, and only the sampled ones are read.
    merged = merged_summary(manifests)
    with DatumReader(db) as reader:
        checks = [
            ("count", len(reader), len(kept)),
            ("label histogram", merged["label_histogram"], expected_histogram),
            ("dtype", merged["dtype"], "uint8" if files is not None else _dtype(source)),
        ]
        if source.shape is not None:
            checks.append(("decoded shapes", dict(shapes), {shape_name(source.shape): len(kept)}))
        for name, found, expected in checks:
            if found != expected:
                problems.append(f"{db}: {name} is {found!r}, expected {expected!r} from the source")
        rng = np.random.default_rng([config.seed, _VERIFY_TAG, SPLITS.index(split)])
        picked = np.sort(rng.choice(len(kept), size=min(config.verify.sample, len(kept)), replace=False))
        worst = 0.0
        sheet_images, sheet_labels, sheet_keys = [], [], []
        for position in picked.tolist():
            task, number, local = kept[position]
            identity, label, _ = task.members[number]
            index_of = files.index_of[identity] if files is not None else int(identity)
            tail = b"_" + files.entries[index_of].path.encode("utf-8") if files is not None else b""
            key = task.name.encode() + b"/" + shard_key(local, tail)
            raw = files.load(index_of) if files is not None else source.load(index_of)
            try:
                datum = reader.datum(key)
                if files is not None and config.encoding != "none":
                    array, expected, differs = _compare_file(datum, files.files, index_of, raw, key)
                else:
                    array = datum_to_array(datum, key=key)
                    expected = _lossy(raw, key) if config.encoding == "jpg" else raw
                    differs = array.shape != expected.shape or array.dtype != expected.dtype
                    differs = differs or not np.array_equal(array, expected)
            except (KeyError, ValueError) as exc:
                problems.append(f"{db}: sampled record {key.decode(errors='replace')} ({identity}): {exc}")
                continue
            name = key.decode(errors="replace")
            if datum.label != label:
                problems.append(f"{db}: record {name} has label {datum.label}, sample {identity} has {label}")
            if array.shape != raw.shape:
                problems.append(f"{db}: record {name} is {array.shape}, sample {identity} is {raw.shape}")
                continue
            diff = float(np.abs(array.astype(np.float64) - raw.astype(np.float64)).mean())
            worst = max(worst, diff)
            if differs:
                problems.append(f"{db}: record {name} differs from sample {identity} (mean |diff| {diff:.3f})")
            if len(sheet_images) < SHEET_MAX:
                sheet_images.append(np.array(array))
                sheet_labels.append(datum.label)
                sheet_keys.append(name)
        mixed = source.shape is None
        imread: ImreadMode = "unchanged" if files is None else ("gray" if config.dataset.imageset.gray else "color")
        same = os.path.realpath(train_db) == os.path.realpath(db)  # the train split's check: open once
        ncm = nearest_class_mean(
            reader if same else train_db, reader, mixed=mixed, seed=config.seed, imread=imread, cache=CLASS_MEANS_CACHE
        )
    details = {
        "split": split,
        "ok": not problems,
        "count": len(kept),
        "shards": len(tasks),
        "digest": shard_set_digest(index),
        "shape": list(source.shape) if source.shape is not None else None,
        "dtype": merged["dtype"],
        "encoding": merged["encoding"],
        "source": source.name,
        "sampled": len(picked),
        "sample_max_mean_abs_diff": round(worst, 6),
        "ncm_accuracy": ncm["accuracy"],
        "chance_accuracy": ncm["chance"],
        "label_histogram": expected_histogram,
    }
    encodings = Counter()
    for manifest in manifests:
        encodings.update(
            manifest.get("encodings") or ({manifest["encoding"]: manifest["count"]} if manifest["count"] else {})
        )
    if len(encodings) > 1:  # "mixed": how many of each (the file bytes of a folder of JPEGs and PNGs)
        details["encodings"] = dict(sorted(encodings.items()))
    if files is not None:
        details["skipped"] = skipped
        all_shapes = dict(shapes)
        details["shapes"] = listed_shapes(all_shapes) if mixed else None  # at most SHAPES_LISTED, the most common
        summary = shape_summary(all_shapes) if mixed else None
        if summary is not None:
            details["shape_summary"] = summary
        details["params_encoding"] = config.encoding  # "original": the records are the files' own bytes
        if files.files.classes is not None:
            details["classes"] = files.files.classes
    by_label = sorted(range(len(sheet_keys)), key=lambda i: (sheet_labels[i], sheet_keys[i]))  # classes side by side
    sheet = contact_sheet(
        [sheet_images[i] for i in by_label],
        [sheet_labels[i] for i in by_label],
        [sheet_keys[i] for i in by_label],
        source.channel_order,
        classes=files.files.classes if files is not None else None,
    )
    return details, problems, sheet


@dataclass(frozen=True)
class _Listed:
    """An imageset's files in listed order, found by identity (what the plan names)."""

    files: ImageFiles
    index_of: dict[str, int]

    @property
    def entries(self) -> list[Any]:
        return self.files.entries

    def load(self, index: int) -> np.ndarray:
        image, _ = load_image(self.files.paths[index], self.files.entries[index], self.files.options, self.files.where)
        return hwc_to_chw(image)

    def source(self, config: PipelineConfig) -> Source:
        """What verify needs of the imageset source (its name, shape and channel order), without
        listing and resolving every file again as :func:`open_source` would."""
        options = config.dataset.imageset
        channels = 1 if options.gray else 3
        shape: tuple[int, int, int] | None = None
        if options.resizes:
            shape = (channels, options.resize_height, options.resize_width)
        elif config.encoding == "none" and self.entries:  # raw pixels: every image has the first one's shape
            first = self.load(0)
            shape = (int(first.shape[0]), int(first.shape[1]), int(first.shape[2]))
        unused = _unused_reader
        return Source(
            "imageset", len(self.entries), shape, "gray" if options.gray else "BGR", unused, unused, self.load
        )


def _unused_reader(*args: Any) -> Any:
    raise AssertionError("verify reads an imageset's files one by one")


def _listed_files(config: PipelineConfig, listed: Any) -> _Listed:
    dataset = config.dataset
    entries, paths, where, classes = listed
    options = imageset_options(dataset, config.seed, config.encoding)
    files = ImageFiles(
        entries, paths, options, where, classes, dataset.imageset.on_error, dataset.imageset.decode_timeout
    )
    return _Listed(files, {identity: i for i, identity in enumerate(imageset_identities(entries))})


def _dtype(source: Source) -> str:
    return "uint8" if source.read(0, 1)[0].dtype == np.uint8 else "float32"


def _lossy(raw: np.ndarray, key: bytes) -> np.ndarray:
    """A raw sample put through the same, deterministic, JPEG encoder and decoder."""
    return decode_image(encode_png_or_jpg(raw, "jpg", key), "unchanged", key)


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
    plan: Plan | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Check ``split`` and, only if it passes, write its reports; returns (details, problems).

    ``plan``: the plan the orchestrator made for this run (Snakemake's, read with
    :func:`~datumdb.pipeline.plan.read_plan`); without it the step plans again from the params
    and the inputs (DVC's stages, a check by hand).

    ``details`` is the full JSON (with the fingerprint of what it checked); ``metrics`` the few
    numbers ``dvc metrics show`` prints (count, accuracy, a digest prefix); ``histogram`` the
    label counts as CSV (``dvc plots``); ``sheet`` the contact sheet PNG.
    """
    from datumdb.files import atomic_write, check_output_names
    from datumdb.pipeline.fingerprint import recorded_build_fingerprint, verify_record
    from datumdb.pipeline.summary import histogram_csv, json_bytes

    check_output_names([details, metrics, histogram, sheet], [db, train_db])
    report, problems, png = check_split(config, split, db, train_db, plan=plan)
    if problems:
        return report, problems
    databases = {split: recorded_build_fingerprint(db), "train": recorded_build_fingerprint(train_db)}
    report["pipeline"] = verify_record(config, split, databases)
    small = {
        "count": report["count"],
        "ncm_accuracy": report["ncm_accuracy"],
        "chance_accuracy": report["chance_accuracy"],
        "digest": report["digest"].split(":")[-1][:12],
    }
    atomic_write(details, json_bytes(report))
    atomic_write(metrics, json_bytes(small))
    atomic_write(histogram, histogram_csv(report["label_histogram"], report.get("classes")))
    atomic_write(sheet, png)
    return report, problems


def verify_splits(
    config: PipelineConfig, shard_sets: str | os.PathLike[str], *, jobs: int | None = None
) -> dict[str, tuple[dict[str, Any], list[str]]]:
    """Every split's :func:`verify_step`, ``shard_sets/<split>`` with its reports where
    :mod:`~datumdb.pipeline.outputs` puts them (relative to the working directory, as dvc.yaml
    lists them): what DVC's one verify stage runs, Snakemake running a job per split.

    The plan is made once, here. Train is checked first, in this process: it keeps the class
    means the others score against, which each would otherwise compute again (20 000 photos,
    2 cores: 2.7-3.0 s and 2.6 CPU-seconds this way, 4.1-4.3 s and 4.0-4.2 CPU-seconds with the
    three splits side by side); then the other splits in up to ``jobs`` processes. Per split:
    (details, problems), as verify_step.
    """
    cache = load_hash_cache()
    listed = listed_images(config.dataset) if config.dataset.source == "imageset" else None
    plan = make_plan(config, cache, listed=listed)
    save_hash_cache(cache)
    root = Path(shard_sets)
    calls = {
        split: (
            config,
            split,
            root / split,
            root / "train",
            {
                "details": outputs.verify_details(split),
                "metrics": outputs.metrics(split),
                "histogram": outputs.histogram(split),
                "sheet": outputs.sheet(split),
            },
        )
        for split in SPLITS
    }
    others = [split for split in SPLITS if split != "train"]
    global _SHARED_PLAN
    _SHARED_PLAN = plan  # the forked workers inherit it (a million members pickled per split: seconds)
    try:
        found = {"train": _verify_one(*calls["train"])}
        found.update(zip(others, in_processes(_verify_one, [calls[split] for split in others], jobs), strict=True))
    finally:
        _SHARED_PLAN = None
    return {split: found[split] for split in SPLITS}


_SHARED_PLAN: Plan | None = None


def _verify_one(
    config: PipelineConfig, split: str, db: Path, train_db: Path, reports: dict[str, str]
) -> tuple[dict[str, Any], list[str]]:
    return verify_step(config, split, db, train_db, plan=_SHARED_PLAN, **reports)
