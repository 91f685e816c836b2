"""The build steps: samples -> record files (one job per shard) -> one LMDB per split.

Snakemake runs :func:`make_records` as one job per shard (in parallel, on a cluster too; the
record files are ``temp()`` and deleted once the databases exist) and :func:`build_split` as
one job per split, the only writer of its database. DVC runs one stage at a time, so its build
stage calls :func:`build_all`, which does the shards' work in parallel processes itself, into a
private folder it removes. Both run the same functions in the same order, so they write the same
bytes: keys are the position within the split in global-index order, and shard ``s``'s records
precede shard ``s+1``'s.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from datumdb.codec import encode_sample
from datumdb.decodepool import die_with_parent
from datumdb.errors import InputError
from datumdb.imageset import ImageFailure, read_class_folders, serialize_images
from datumdb.keys import index_key
from datumdb.manifest import read_manifest
from datumdb.pipeline.config import PipelineConfig
from datumdb.pipeline.fingerprint import build_params, build_record, input_digest
from datumdb.pipeline.records import RecordFile, RecordWriter
from datumdb.pipeline.sources import ImageFiles, Source, open_source
from datumdb.pipeline.splits import SPLITS, assign_splits, positions_in_split, shard_range
from datumdb.writer import HOST_TAG, DatabaseWriter, check_target, process_alive

__all__ = ["build_all", "build_split", "make_records", "records_path"]

READ_CHUNK = 1024  # samples read from the source at a time: bounds a shard job's memory


def records_path(records: str | os.PathLike[str], shard: int | str, split: str) -> Path:
    """Where shard ``shard``'s records of ``split`` live under the records folder."""
    return Path(records) / str(shard) / f"{split}.rec"


def make_records(config: PipelineConfig, shard: int, records: str | os.PathLike[str]) -> dict[str, int]:
    """Encode shard ``shard``'s samples as Datums into its record files under ``records``; the counts."""
    source = open_source(config.dataset, config.seed, config.encoding)
    start, stop = shard_range(shard, config.partition.count, source.count)
    assignment = assign_splits(source.count, config.seed, config.split.fractions)
    positions = positions_in_split(assignment)
    sizes = np.bincount(assignment, minlength=len(SPLITS))
    if (
        source.files is None
        and config.encoding != "none"
        and source.read(start, min(start + 1, stop))[0].dtype != np.uint8
    ):
        raise InputError(f"encoding {config.encoding!r} needs uint8 images; dataset.source gives float data")

    header = {
        "shard": shard,
        "shards": config.partition.count,
        "params": build_params(config),
        "channel_order": source.channel_order,
    }
    with contextlib.ExitStack() as stack:  # all three files renamed into place only if every record was written
        writers = [
            stack.enter_context(RecordWriter(records_path(records, shard, name), {**header, "split": name}))
            for name in SPLITS
        ]
        if source.files is not None:
            _image_records(source, source.files, range(start, stop), assignment, positions, writers)
            return {name: writer.count for name, writer in zip(SPLITS, writers, strict=True)}
        for chunk_start in range(start, stop, READ_CHUNK):  # each sample read (or generated) once
            chunk_stop = min(chunk_start + READ_CHUNK, stop)
            images, labels = source.read(chunk_start, chunk_stop)
            for offset, label in enumerate(labels.tolist()):
                index = chunk_start + offset
                split = int(assignment[index])
                key = index_key(int(positions[index]), int(sizes[split]))
                writers[split].add(key, encode_sample(images[offset], label, config.encoding, key))  # type: ignore[arg-type]
    return {name: writer.count for name, writer in zip(SPLITS, writers, strict=True)}


def _image_records(
    source: Source,
    files: ImageFiles,
    indices: range,
    assignment: np.ndarray,
    positions: np.ndarray,
    writers: list[RecordWriter],
) -> None:
    """An imageset's records: Caffe keys naming the files, each file serialized on its own.

    Nothing is stacked, so sizes may vary; an unreadable image stops the job or, with
    ``on_error: skip``, is noted (path, list line, reason) in its split's record file.
    """
    samples = serialize_images(
        [files.paths[i] for i in indices],
        [files.entries[i] for i in indices],
        files.options,
        files.where,
        skip_errors=files.on_error == "skip",
        timeout=files.decode_timeout,
    )
    for index, result in zip(indices, samples, strict=True):
        split, position = int(assignment[index]), int(positions[index])
        if isinstance(result, ImageFailure):
            writers[split].skip({**files.describe(index), "position": position, "reason": result.reason})
            continue
        value, shape = result
        if source.shape is not None and shape != source.shape:
            entry = files.entries[index]
            raise InputError(
                f"{files.where}:{entry.line}: {entry.path} is {shape}, the first image is {source.shape}; raw "
                "pixels (encoding: none) need one shape: set dataset.imageset.resize_height and resize_width, "
                "or store encoded images (encoding: original, png or jpg)"
            )
        writers[split].add(files.key(index, position), value, shape)


def build_split(
    config: PipelineConfig,
    split: str,
    records: str | os.PathLike[str],
    db: str | os.PathLike[str],
    *,
    inputs: str | None = None,
) -> dict[str, Any]:
    """Append the shards' record files of ``split``, in shard order, into the database ``db``.

    The manifest records the build fingerprint (:func:`~datumdb.pipeline.fingerprint.build_record`).
    Record files made with other params (a stale intermediate) are refused, naming the file.
    A database already at ``db`` is replaced only if datumdb wrote it (a Caffe-made one is
    refused: :func:`~datumdb.writer.written_by_datumdb`), as ``--overwrite`` is not asked here.
    """
    records = Path(records)
    record = build_record(config, split, inputs if inputs is not None else input_digest(config))
    opened = []
    for shard in range(config.partition.count):
        path = records_path(records, shard, split)
        records_file = RecordFile(path)
        header = records_file.header
        expected = {"shard": shard, "shards": config.partition.count, "params": record["params"], "split": split}
        if {k: header.get(k) for k in expected} != expected:
            raise InputError(f"{path}: made with other params than {split}'s build (a stale intermediate); remake it")
        opened.append(records_file)
    metadata: dict[str, Any] = {"source": config.dataset.source, "split": split, "pipeline": record}
    skipped = [sample for records_file in opened for sample in records_file.skipped]
    if config.dataset.source == "imageset":
        metadata["skipped"] = skipped  # (always present: an empty list says nothing was left out)
        if config.dataset.imageset.layout == "folders":
            metadata["classes"] = read_class_folders(Path(config.dataset.input_dir) / config.dataset.imageset.root)[1]
    with DatabaseWriter(
        db,
        # The orchestrators rebuild without --overwrite: a build replaces its own previous
        # database, but never one datumdb did not write (a Caffe-made one).
        overwrite=True,
        only_replace_own=True,
        batch_size=config.build.batch_size,
        map_size=config.build.map_size,
        encoding=config.encoding if config.encoding in ("none", "png", "jpg") else "none",  # type: ignore[arg-type]
        channel_order=opened[0].header["channel_order"],
        metadata=metadata,
    ) as writer:
        for records_file in opened:
            for key, value, shape in records_file:
                writer.add_serialized(value, key, shape=shape)
    return read_manifest(Path(db))


_RECORDS_PREFIX = ".records-"  # build_all's private folder: .records-HOST-PID-random


def _remove_dead_records_folders(databases: Path) -> None:
    """Remove the record folders that killed ``build_all`` runs of this host left behind.

    Only folders named by a dead process of this host (a live build here, or any build on another
    node of a shared file system, is left alone) and holding only what build_all writes: shard
    folders (digits) of files.
    """
    for folder in databases.glob(f"{_RECORDS_PREFIX}*"):
        host, _, rest = folder.name[len(_RECORDS_PREFIX) :].partition("-")
        pid = rest.split("-", 1)[0]
        if host != HOST_TAG or not pid.isdigit() or process_alive(int(pid)) or folder.is_symlink():
            continue
        shards = list(folder.iterdir())
        if all(s.name.isdigit() and s.is_dir() and not s.is_symlink() for s in shards) and all(
            f.is_file() and not f.is_symlink() for s in shards for f in s.iterdir()
        ):
            shutil.rmtree(folder, ignore_errors=True)


def build_all(
    config: PipelineConfig, databases: str | os.PathLike[str], *, jobs: int | None = None
) -> dict[str, dict[str, Any]]:
    """Every split's database under ``databases/<split>``, the shards encoded in ``jobs`` processes.

    The record files go to a private folder beside the databases, removed at the end, whatever
    happens; one that a ``kill -9`` left is removed at the next start. The worker processes die
    with this one. Processes are forked before any LMDB environment is open.
    """
    databases = Path(databases)
    for split in SPLITS:  # a database it may not replace is refused before the shards' work
        check_target(databases / split, overwrite=True, only_replace_own=True)
    databases.mkdir(parents=True, exist_ok=True)
    inputs = input_digest(config)
    jobs = max(1, min(jobs or os.cpu_count() or 1, config.partition.count))
    _remove_dead_records_folders(databases)
    work = Path(tempfile.mkdtemp(prefix=f"{_RECORDS_PREFIX}{HOST_TAG}-{os.getpid()}-", dir=databases))
    try:
        shards = range(config.partition.count)
        if jobs == 1:
            for shard in shards:
                make_records(config, shard, work)
        else:
            context = multiprocessing.get_context("fork")
            pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=die_with_parent, initargs=(os.getpid(),))
            with pool:
                for future in [pool.submit(make_records, config, s, work) for s in shards]:
                    future.result()
        return {split: build_split(config, split, work, databases / split, inputs=inputs) for split in SPLITS}
    finally:
        shutil.rmtree(work, ignore_errors=True)
