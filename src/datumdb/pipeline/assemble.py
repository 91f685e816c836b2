"""The assemble step: each split's one Caffe database, derived locally from its shard set.

Caffe's Data layer reads one LMDB front to back, so the pipeline derives ``data/lmdb/<split>``
from ``data/shards/<split>`` (:func:`datumdb.shardset.assemble`: the shards' values copied in a
seeded shuffled order, keyed ``%08d_<path>`` as Caffe's ``convert_imageset`` keys them). It is
derived, not versioned: DVC does not upload it (``cache: false``), ``make pull`` and ``dvc repro``
make it again from the pulled shards, byte for byte. Its manifest records the fingerprint of the
shard set it came from, so a current one is left as it is.

Snakemake runs :func:`assemble_step` as one job per split; DVC's one stage runs
:func:`assemble_splits`, the splits in parallel processes (DVC runs one stage at a time).

``build.assemble: false`` skips it (disk matters at ImageNet scale, and PyTorch reads the shard
sets directly): a database datumdb assembled there before is removed, and the folder holds only
:data:`NOT_ASSEMBLED`, a note saying so (an output both orchestrators can track).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from datumdb.errors import DatabaseExistsError, DatabaseNotFoundError, DatumDBError
from datumdb.files import atomic_write
from datumdb.manifest import DATA_NAME, MANIFEST_NAME, SHARD_INDEX, read_manifest
from datumdb.pipeline.config import PipelineConfig
from datumdb.pipeline.fingerprint import code_digest, fingerprint, recorded_build_fingerprint
from datumdb.pipeline.processes import in_processes
from datumdb.pipeline.shards import current_fingerprint
from datumdb.pipeline.splits import SPLITS
from datumdb.shardset import assemble, is_shard_set

__all__ = ["NOT_ASSEMBLED", "assemble_splits", "assemble_step", "assembled_record"]

NOT_ASSEMBLED = "NOT-ASSEMBLED.txt"
_NOTE = (
    "build.assemble is false in params.yaml: this split was not assembled into one Caffe database.\n"
    "Read its shard set (data/shards/<split>) with datumdb's DatumReader, or set build.assemble: true.\n"
)


def assembled_record(config: PipelineConfig, shards: str) -> dict[str, Any]:
    """What an assembled database records: the shard set's fingerprint, the writer's options, the code."""
    what = {
        "step": "assemble",
        "shards": shards,
        "params": {"assemble": config.build.assemble, "batch_size": config.build.batch_size},
        "code": code_digest("assemble"),
    }
    return {**what, "fingerprint": fingerprint(what)}


def assemble_step(
    config: PipelineConfig, shard_set: str | os.PathLike[str], db: str | os.PathLike[str]
) -> dict[str, Any]:
    """Assemble ``shard_set`` into ``db`` unless the database there is current; its record."""
    shard_set, db = Path(shard_set), Path(db)
    if not is_shard_set(shard_set):  # (recorded_build_fingerprint would look for a database there)
        raise DatabaseNotFoundError(f"{shard_set}: not a shard set (no {SHARD_INDEX})")
    record = assembled_record(config, recorded_build_fingerprint(shard_set))
    note = db / NOT_ASSEMBLED
    if not config.build.assemble:
        if (db / MANIFEST_NAME).is_file():
            _remove_assembled(db)
        db.mkdir(parents=True, exist_ok=True)
        if not note.is_file() or note.read_text(encoding="utf-8") != _NOTE:
            atomic_write(note, _NOTE.encode("utf-8"))
        return record
    if current_fingerprint(db) == record["fingerprint"]:  # (None without a data.mdb)
        return record
    if note.is_file() and note.read_text(encoding="utf-8") == _NOTE:
        note.unlink()
    _remove_orphan_manifest(db)
    assemble(
        shard_set,
        db,
        overwrite=True,
        only_replace_own=True,
        metadata={"pipeline": record},
        batch_size=config.build.batch_size,
    )
    return record


def assemble_splits(
    config: PipelineConfig,
    shard_sets: str | os.PathLike[str],
    databases: str | os.PathLike[str],
    *,
    jobs: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Every split's :func:`assemble_step`, ``shard_sets/<split>`` into ``databases/<split>``, in up
    to ``jobs`` processes (train's, the longest, first); each split's record. What DVC's stage runs."""
    calls = [(config, Path(shard_sets) / split, Path(databases) / split) for split in SPLITS]
    return dict(zip(SPLITS, in_processes(assemble_step, calls, jobs), strict=True))


def _remove_assembled(db: Path) -> None:
    """Remove the database datumdb assembled at ``db``; one it did not write is refused."""
    from datumdb.writer import remove_database_folder, written_by_datumdb

    if not written_by_datumdb(db) or current_fingerprint(db) is None:
        raise DatabaseExistsError(f"{db}: a database datumdb did not assemble is there; move it away first")
    remove_database_folder(db)


def _remove_orphan_manifest(db: Path) -> None:
    """A folder holding only the manifest of a database datumdb assembled (its data.mdb deleted,
    by hand or by an orchestrator): the manifest goes, so the folder can be assembled into."""
    if (db / DATA_NAME).exists() or not (db / MANIFEST_NAME).is_file():
        return
    if {p.name for p in db.iterdir()} != {MANIFEST_NAME}:
        return
    try:
        pipeline = read_manifest(db).get("metadata", {}).get("pipeline", {})
    except (DatumDBError, AttributeError):  # not a manifest we can read: not ours to remove
        return
    if isinstance(pipeline, dict) and pipeline.get("step") == "assemble":
        (db / MANIFEST_NAME).unlink()
