"""The shards step: build the planned shards that are missing or stale, verify each, index each split.

Each split is a shard set under ``data/shards/<split>`` (:mod:`datumdb.shardset`). The plan
(:mod:`datumdb.pipeline.plan`) says which shards exist and what each must record; a shard whose
manifest records its planned fingerprint is current and is left alone (its file stays the same
file: DVC uploads nothing for it), any other is written again from its members. So the work,
the new bytes and the upload of a version follow the change.

* Snakemake runs :func:`build_part` as one job per part (the parts' plan files are its
  inputs; a part reruns when one of its shards changed), then :func:`finish_split` per split.
* DVC's stage runs :func:`build_shard_sets`: the same parts in parallel processes, then the same
  :func:`finish_split`, so both write the same bytes.

Shards are written without an fsync each and the file system is synced once per job before it
succeeds (hundreds of small databases); each is published by rename and checked
(:func:`~datumdb.verify.verify_database`) right after, by the process that wrote it, so the
checks run in parallel with the build.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datumdb.codec import encode_sample
from datumdb.errors import DatumDBError, InputError, VerificationError
from datumdb.files import sync_folder
from datumdb.imageset import ImageFailure, load_image, serialize_images
from datumdb.manifest import DATA_NAME, SHARD_INDEX, read_manifest
from datumdb.pipeline.config import PipelineConfig
from datumdb.pipeline.plan import (
    Plan,
    ShardTask,
    identity_bytes,
    imageset_identities,
    load_hash_cache,
    make_plan,
    save_hash_cache,
)
from datumdb.pipeline.processes import in_processes
from datumdb.pipeline.sources import imageset_options, listed_entries, open_source, resolve_entries
from datumdb.pipeline.splits import SPLITS
from datumdb.shardset import read_shard_index, sample_hashes, write_shard, write_shard_index
from datumdb.writer import remove_database_folder, remove_stale_partials, written_by_datumdb

__all__ = ["build_part", "build_shard_sets", "current_fingerprint", "finish_split", "stale_tasks"]


def current_fingerprint(folder: str | os.PathLike[str]) -> str | None:
    """The build fingerprint the shard at ``folder`` records, or None (absent, damaged, foreign)."""
    folder = Path(folder)
    if not (folder / DATA_NAME).is_file():
        return None
    try:
        metadata = read_manifest(folder).get("metadata")
    except DatumDBError:  # unreadable or damaged: the shard is built again
        return None
    pipeline = metadata.get("pipeline") if isinstance(metadata, dict) else None
    value = pipeline.get("fingerprint") if isinstance(pipeline, dict) else None
    return value if isinstance(value, str) else None


def stale_tasks(tasks: Sequence[ShardTask], root: str | os.PathLike[str]) -> list[ShardTask]:
    """The tasks whose shard under ``root/<split>/<name>`` is missing or records another fingerprint."""
    return [t for t in tasks if current_fingerprint(Path(root) / t.split / t.name) != t.fingerprint]


def build_part(
    config: PipelineConfig, tasks: Sequence[ShardTask], root: str | os.PathLike[str], *, workers: int = 1
) -> list[ShardTask]:
    """Build the stale shards among ``tasks`` under ``root``; the tasks built.

    ``workers``: processes decoding images (an imageset's shards; at least one when a decode
    timeout applies). Every shard written is verified; the file system is synced once at the end.
    """
    root = Path(root)
    todo = stale_tasks(tasks, root)
    if not todo:
        return []
    if config.dataset.source == "imageset":
        _image_shards(config, todo, root, workers)
    else:
        _array_shards(config, todo, root)
    sync_folder(root)
    return todo


def _writer_options(config: PipelineConfig, channel_order: str) -> dict[str, Any]:
    return {
        "batch_size": config.build.batch_size,
        "map_size": config.build.map_size,
        "encoding": config.encoding if config.encoding in ("none", "png", "jpg") else "none",
        "channel_order": channel_order,
        "hash_file": False,  # DVC hashes every shard file; the content digest is verify's
        "durable": False,  # one sync per job (build_part)
    }


def _publish_checked(path: Path, records: Iterator[Any], metadata: dict[str, Any], options: dict[str, Any]) -> None:
    from datumdb.verify import verify_database

    write_shard(path, records, metadata=metadata, **options)
    report = verify_database(path, decode=False, progress=False)  # its images were decoded just now
    if not report["ok"]:
        raise VerificationError(f"{path}: the shard just written does not verify: {report['problems'][0]}")


def _metadata(config: PipelineConfig, task: ShardTask) -> dict[str, Any]:
    return {
        "source": config.dataset.source,
        "split": task.split,
        "pipeline": task.record,
    }


def _image_shards(config: PipelineConfig, todo: Sequence[ShardTask], root: Path, workers: int) -> None:
    """An imageset's shards: every file serialized once, in one pool for all of them."""
    dataset = config.dataset
    entries, where, classes = listed_entries(dataset)
    by_identity = dict(zip(imageset_identities(entries), entries, strict=True))
    options = imageset_options(dataset, config.seed, config.encoding)
    expected_shape = None
    if config.encoding == "none" and not dataset.imageset.resizes and entries:  # raw pixels: one shape
        image, _ = load_image(resolve_entries(dataset, entries[:1], where)[0], entries[0], options, where)
        expected_shape = (image.shape[2], image.shape[0], image.shape[1])
    members = []
    for task in todo:
        for identity, label, _digest in task.members:
            entry = by_identity.get(identity)
            if entry is None or entry.label != label:
                raise InputError(f"{where}: {identity!r} is not listed as the plan says; plan again")
            members.append(entry)
    results = serialize_images(
        resolve_entries(dataset, members, where),
        members,
        options,
        where,
        skip_errors=dataset.imageset.on_error == "skip",
        timeout=dataset.imageset.decode_timeout,
        workers=max(1, workers),
    )
    writer_options = _writer_options(config, "gray" if dataset.imageset.gray else "BGR")
    for task in todo:
        order = sample_hashes([identity_bytes(m[0]) for m in task.members], config.seed)[:, 1].tolist()
        skipped: list[dict[str, Any]] = []
        records = []
        for number, (member, result) in enumerate(zip(task.members, results, strict=False)):
            entry = by_identity[member[0]]
            if isinstance(result, ImageFailure):
                skipped.append({"path": entry.path, "line": entry.line, "position": number, "reason": result.reason})
                continue
            value, shape = result
            if expected_shape is not None and shape != expected_shape:
                raise InputError(
                    f"{where}:{entry.line}: {entry.path} is {shape}, the first image is {expected_shape}; raw "
                    "pixels (encoding: none) need one shape: set dataset.imageset.resize_height and resize_width, "
                    "or store encoded images (encoding: original, png or jpg)"
                )
            records.append((b"_" + entry.path.encode("utf-8"), value, shape, order[number]))
        metadata = {**_metadata(config, task), "skipped": skipped}
        if classes is not None:
            metadata["classes"] = classes
        _publish_checked(root / task.split / task.name, iter(records), metadata, writer_options)


def _array_shards(config: PipelineConfig, todo: Sequence[ShardTask], root: Path) -> None:
    """Array sources' shards: each shard's rows read as one range."""
    source = open_source(config.dataset, config.seed, config.encoding)
    if config.encoding != "none" and source.read(0, 1)[0].dtype != np.uint8:
        raise InputError(f"encoding {config.encoding!r} needs uint8 images; dataset.source gives float data")
    writer_options = _writer_options(config, source.channel_order)
    for task in todo:
        indices = np.array([m[0] for m in task.members], dtype=np.int64)
        if indices.min() < 0 or indices.max() >= source.count:
            raise InputError(f"{config.dataset.source}: the plan names sample {int(indices.max())} of {source.count}")
        images, _ = source.read(int(indices.min()), int(indices.max()) + 1)
        rows = indices - indices.min()
        order = sample_hashes([identity_bytes(i) for i in indices.tolist()], config.seed)[:, 1].tolist()

        def records(task: ShardTask = task, images: np.ndarray = images, rows: np.ndarray = rows,
                    order: list[int] = order) -> Iterator[Any]:  # fmt: skip
            for number, (row, member) in enumerate(zip(rows.tolist(), task.members, strict=True)):
                image = images[row]
                value = encode_sample(image, int(member[1]), config.encoding, b"%08d" % number)  # type: ignore[arg-type]
                yield b"", value, (int(image.shape[0]), int(image.shape[1]), int(image.shape[2])), order[number]

        _publish_checked(root / task.split / task.name, records(), _metadata(config, task), writer_options)


# ----------------------------------------------------------------------------- a split's index


def finish_split(split_plan: dict[str, Any], folder: str | os.PathLike[str], seed: int) -> dict[str, Any]:
    """Make ``folder``'s index list the planned shards, once each is current; remove the rest.

    Every planned shard must be present and record its planned fingerprint (else the part that
    builds it has not run, or failed: an error naming the shard). The index (``shards.json``)
    records the split plan's fingerprint; shard folders the plan no longer lists, and the
    partial folders of killed builds, are removed, but only those datumdb wrote.
    """
    folder = Path(folder)
    names = []
    for shard in split_plan["shards"]:
        found = current_fingerprint(folder / shard["name"])
        if found != shard["fingerprint"]:
            state = "missing" if found is None else "stale (built from other members or params)"
            raise InputError(f"{folder / shard['name']}: shard {state}; build its part first")
        names.append(shard["name"])
    wanted = {"fingerprint": split_plan["fingerprint"]}
    index = _current_index(folder)
    if index is None or index.get("pipeline") != wanted or [s["name"] for s in index["shards"]] != names:
        index = write_shard_index(folder, split_plan["split"], seed, names, pipeline=wanted)
    _remove_strays(folder, set(names))
    return index


def _current_index(folder: Path) -> dict[str, Any] | None:
    if not (folder / SHARD_INDEX).is_file():
        return None
    try:
        return read_shard_index(folder)
    except DatumDBError:  # damaged, or a shard it lists is gone: written again
        return None


def _remove_strays(folder: Path, keep: set[str]) -> None:
    """Shard folders not in ``keep`` that datumdb wrote, and dead builds' partial folders."""
    from datumdb.shardset import stray_shards

    for stray in stray_shards(folder, keep):
        if written_by_datumdb(stray):
            remove_database_folder(stray)
    for name in {p.name.split(".")[1] for pattern in (".*.partial-*", ".*.old-*") for p in folder.glob(pattern)}:
        remove_stale_partials(folder / name)  # the writer's own cleanup: a folder holding anything else stays


# ----------------------------------------------------------------------------- everything at once (DVC)


def _build_part_tasks(config: PipelineConfig, tasks: list[ShardTask], root: str) -> int:
    return len(build_part(config, tasks, root))


def build_shard_sets(
    config: PipelineConfig, root: str | os.PathLike[str], *, jobs: int | None = None, plan: Plan | None = None
) -> dict[str, dict[str, Any]]:
    """Every split's shard set under ``root/<split>``: plan, build the stale shards (the parts in
    ``jobs`` processes), index each split. What DVC's stage runs; the indexes returned."""
    root = Path(root)
    if plan is None:
        cache = load_hash_cache()
        plan = make_plan(config, cache)
        save_hash_cache(cache)
    for split in SPLITS:
        (root / split).mkdir(parents=True, exist_ok=True)
    parts = [plan.part(p) for p in range(plan.parts)]
    parts = [tasks for tasks in parts if stale_tasks(tasks, root)]
    in_processes(_build_part_tasks, [(config, tasks, str(root)) for tasks in parts], jobs)
    indexes = {split: finish_split(plan.split_plan(split), root / split, config.seed) for split in SPLITS}
    sync_folder(root)
    return indexes
