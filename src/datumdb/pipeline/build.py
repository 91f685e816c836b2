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
from datumdb.errors import InputError
from datumdb.keys import index_key
from datumdb.manifest import read_manifest
from datumdb.pipeline.config import PipelineConfig
from datumdb.pipeline.fingerprint import build_params, build_record, input_digest
from datumdb.pipeline.records import RecordWriter, read_records
from datumdb.pipeline.sources import open_source
from datumdb.pipeline.splits import SPLITS, assign_splits, positions_in_split, shard_range
from datumdb.writer import DatabaseWriter

__all__ = ["build_all", "build_split", "make_records", "records_path"]

READ_CHUNK = 1024  # samples read from the source at a time: bounds a shard job's memory


def records_path(records: str | os.PathLike[str], shard: int | str, split: str) -> Path:
    """Where shard ``shard``'s records of ``split`` live under the records folder."""
    return Path(records) / str(shard) / f"{split}.rec"


def make_records(config: PipelineConfig, shard: int, records: str | os.PathLike[str]) -> dict[str, int]:
    """Encode shard ``shard``'s samples as Datums into its record files under ``records``; the counts."""
    source = open_source(config.dataset, config.seed)
    start, stop = shard_range(shard, config.partition.count, source.count)
    assignment = assign_splits(source.count, config.seed, config.split.fractions)
    positions = positions_in_split(assignment)
    sizes = np.bincount(assignment, minlength=len(SPLITS))
    if config.encoding != "none" and source.read(start, min(start + 1, stop))[0].dtype != np.uint8:
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
        for chunk_start in range(start, stop, READ_CHUNK):  # each sample read (or generated) once
            chunk_stop = min(chunk_start + READ_CHUNK, stop)
            images, labels = source.read(chunk_start, chunk_stop)
            for offset, label in enumerate(labels.tolist()):
                index = chunk_start + offset
                split = int(assignment[index])
                key = index_key(int(positions[index]), int(sizes[split]))
                writers[split].add(key, encode_sample(images[offset], label, config.encoding, key))  # type: ignore[arg-type]
    return {name: writer.count for name, writer in zip(SPLITS, writers, strict=True)}


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
    """
    records = Path(records)
    record = build_record(config, split, inputs if inputs is not None else input_digest(config))
    opened = []
    for shard in range(config.partition.count):
        path = records_path(records, shard, split)
        header, items = read_records(path)
        expected = {"shard": shard, "shards": config.partition.count, "params": record["params"], "split": split}
        if {k: header.get(k) for k in expected} != expected:
            raise InputError(f"{path}: made with other params than {split}'s build (a stale intermediate); remake it")
        opened.append((header, items))
    metadata = {"source": config.dataset.source, "split": split, "pipeline": record}
    with DatabaseWriter(
        db,
        overwrite=True,
        batch_size=config.build.batch_size,
        map_size=config.build.map_size,
        encoding=config.encoding,  # type: ignore[arg-type]
        channel_order=opened[0][0]["channel_order"],
        metadata=metadata,
    ) as writer:
        for _, items in opened:
            for key, value in items:
                writer.add_serialized(value, key)
    return read_manifest(Path(db))


def build_all(
    config: PipelineConfig, databases: str | os.PathLike[str], *, jobs: int | None = None
) -> dict[str, dict[str, Any]]:
    """Every split's database under ``databases/<split>``, the shards encoded in ``jobs`` processes.

    The record files go to a private folder beside the databases, removed at the end, whatever
    happens. Processes are forked before any LMDB environment is open.
    """
    databases = Path(databases)
    databases.mkdir(parents=True, exist_ok=True)
    inputs = input_digest(config)
    jobs = max(1, min(jobs or os.cpu_count() or 1, config.partition.count))
    work = Path(tempfile.mkdtemp(prefix=".records-", dir=databases))
    try:
        shards = range(config.partition.count)
        if jobs == 1:
            for shard in shards:
                make_records(config, shard, work)
        else:
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(jobs, mp_context=context) as pool:
                for future in [pool.submit(make_records, config, s, work) for s in shards]:
                    future.result()
        return {split: build_split(config, split, work, databases / split, inputs=inputs) for split in SPLITS}
    finally:
        shutil.rmtree(work, ignore_errors=True)
