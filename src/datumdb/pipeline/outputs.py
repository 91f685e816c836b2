"""Where the pipeline's outputs live, and which of them are stale.

The Snakefile and ``dvc.yaml`` name these paths literally (a test checks they agree with this
module). :func:`stale_outputs` compares the fingerprint each existing output records with the
one the current params and inputs imply: the Snakefile forces the jobs of the stale ones, so a
failed or partial run followed by a rerun always ends with outputs that match params.yaml, even
in a fresh clone where Snakemake has no records of its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from datumdb.manifest import MANIFEST_NAME, SHARD_INDEX
from datumdb.pipeline.config import PipelineConfig
from datumdb.pipeline.fingerprint import describe_difference, mean_record, verify_record
from datumdb.pipeline.plan import INPUT_HASHES, Plan, load_hash_cache, make_plan, save_hash_cache
from datumdb.pipeline.splits import SPLITS

__all__ = [
    "DATABASES",
    "MEAN_BINARYPROTO",
    "MEAN_JSON",
    "MEAN_NPY",
    "RESOLVED_PARAMS",
    "SHARDS",
    "SUMMARY",
    "database",
    "database_files",
    "database_matches_params",
    "expected_records",
    "histogram",
    "metrics",
    "missing_outputs",
    "output_files",
    "shard_set",
    "sheet",
    "stale_outputs",
    "verify_details",
]

DATABASES = "data/lmdb"  # each split's one Caffe database, assembled from its shards (not uploaded)
SHARDS = "data/shards"  # each split's shard set (versioned: what DVC stores and pushes)
MEAN_BINARYPROTO = "data/mean/mean.binaryproto"
MEAN_NPY = "data/mean/mean.npy"
MEAN_JSON = "reports/mean.json"
# params.yaml with every default filled in (`datumdb pipeline check --output`), which dvc.yaml's
# stages list their params from: DVC itself would refuse a key left to its default as missing.
RESOLVED_PARAMS = "reports/params.json"
SUMMARY = "reports/summary.md"


def database(split: str) -> str:
    return f"{DATABASES}/{split}"


def shard_set(split: str) -> str:
    return f"{SHARDS}/{split}"


def verify_details(split: str) -> str:
    return f"reports/verify/{split}.json"


def metrics(split: str) -> str:
    return f"reports/metrics/{split}.json"


def histogram(split: str) -> str:
    return f"reports/verify/{split}_labels.csv"


def sheet(split: str) -> str:
    return f"reports/verify/{split}_samples.png"


def database_files(split: str, assemble: bool = True) -> list[str]:
    """The files of a split's assembled database folder (or of its note, when not assembled)."""
    from datumdb.manifest import DATA_NAME
    from datumdb.pipeline.assemble import NOT_ASSEMBLED

    names = (DATA_NAME, MANIFEST_NAME) if assemble else (NOT_ASSEMBLED,)
    return [f"{database(split)}/{name}" for name in names]


def output_files(assemble: bool = True) -> list[str]:
    """Every file the pipeline produces (a shard set as its index, a database as its files), in order."""
    return [
        *(f"{shard_set(split)}/{SHARD_INDEX}" for split in SPLITS),
        *(path for split in SPLITS for path in database_files(split, assemble)),
        *(path(split) for split in SPLITS for path in (verify_details, metrics, histogram, sheet)),
        MEAN_BINARYPROTO,
        MEAN_NPY,
        MEAN_JSON,
        SUMMARY,
    ]


def missing_outputs(root: str | Path = ".", assemble: bool = True) -> list[str]:
    """The pipeline's output files absent under ``root`` (a run has yet to make them)."""
    return [name for name in output_files(assemble) if not (Path(root) / name).is_file()]


def _recorded(path: Path, *keys: str) -> Any:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        for key in keys:
            value = value[key]
        return value
    except (OSError, ValueError, KeyError, TypeError):
        return None


def expected_records(config: PipelineConfig, plan: Plan) -> dict[str, tuple[dict[str, Any], tuple[str, ...]]]:
    """What each fingerprinted output must record, per the params and the plan: path -> (record,
    where in the file). A shard set's index records its plan's fingerprint; an assembled
    database, the set's; a verify report, the sets it read; the mean, the train set's."""
    from datumdb.pipeline.assemble import assembled_record

    sets = dict(plan.split_fingerprints)
    expected: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {}
    for split in SPLITS:
        expected[f"{shard_set(split)}/{SHARD_INDEX}"] = ({"fingerprint": sets[split]}, ("pipeline",))
        if config.build.assemble:
            expected[f"{database(split)}/{MANIFEST_NAME}"] = (
                assembled_record(config, sets[split]),
                ("metadata", "pipeline"),
            )
        expected[verify_details(split)] = (verify_record(config, split, sets), ("pipeline",))
    expected[MEAN_JSON] = (mean_record(sets["train"]), ("pipeline",))
    return expected


def stale_outputs(config: PipelineConfig, root: str | Path = ".", *, plan: Plan | None = None) -> dict[str, list[str]]:
    """Existing outputs whose recorded fingerprint is not the expected one: path -> reasons.

    Missing outputs are not listed (every orchestrator makes those anyway). The path given is the
    file that records the fingerprint (the index of a shard set, the manifest of a database).
    """
    root = Path(root)
    if plan is None:
        cache = load_hash_cache(root / INPUT_HASHES)
        plan = make_plan(config, cache)
        save_hash_cache(cache, root / INPUT_HASHES)
    stale = {}
    for name, (record, keys) in expected_records(config, plan).items():
        path = root / name
        if not path.exists():
            continue
        recorded = _recorded(path, *keys)
        if not isinstance(recorded, dict) or recorded.get("fingerprint") != record["fingerprint"]:
            stale[name] = describe_difference(recorded, record) if "step" in record else []
            stale[name] = stale[name] or ["made from other samples, params or inputs"]
    return stale


def database_matches_params(db: str | os.PathLike[str], params: str | os.PathLike[str]) -> list[str]:
    """Problems (empty if none) with ``db`` being what ``params`` and the inputs imply.

    ``db``: a split's shard set, one of its shards, or an assembled database. The record it
    holds is compared with the one the params and inputs give (the plan), key by key for a
    shard or an assembled database: ``params.encoding: recorded "none", expected "png"``,
    ``the datumdb code of this step changed``; for a shard set, shard by shard.
    """
    from datumdb.manifest import read_manifest
    from datumdb.pipeline.assemble import assembled_record
    from datumdb.pipeline.config import load_config
    from datumdb.shardset import is_shard_set, read_shard_index

    config = load_config(params)
    cache = load_hash_cache()
    plan = make_plan(config, cache)
    save_hash_cache(cache)
    if is_shard_set(db):
        index = read_shard_index(db)
        split = index.get("split")
        if split not in SPLITS or (index.get("pipeline") or {}).get("fingerprint") == plan.split_fingerprints[split]:
            return [] if split in SPLITS else [f"{db}: not built by the datumdb pipeline (no split in its index)"]
        if index.get("seed") != config.seed:  # every shard's name and members follow the seed
            return [
                f"{db}: does not match {params}: seed: {index.get('seed')} in the output, {config.seed} in the params"
            ]
        problems = []
        listed = {shard["name"] for shard in index["shards"]}
        for task in plan.shards[split]:
            if task.name not in listed:
                problems.append(f"{db}: does not match {params}: shard {task.name} is missing")
            else:
                problems += database_matches_params(Path(db) / task.name, params)
        problems += [f"{db}: does not match {params}: shard {name} is no longer planned"
                     for name in sorted(listed - {task.name for task in plan.shards[split]})]  # fmt: skip
        return problems or [f"{db}: does not match {params}: its index is out of date"]
    metadata = read_manifest(Path(db)).get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    recorded = metadata.get("pipeline") if isinstance(metadata.get("pipeline"), dict) else None
    split = metadata.get("split") or metadata.get("assembled_from")
    if recorded is None or split not in SPLITS:
        return [f"{db}: not built by the datumdb pipeline (no pipeline record in its manifest)"]
    if recorded.get("step") == "assemble":
        expected = assembled_record(config, plan.split_fingerprints[split])
    else:
        tasks = {task.name: task for task in plan.shards[split]}
        task = tasks.get(Path(db).name)
        if task is None:
            return [f"{db}: does not match {params}: the plan has no shard {Path(db).name} in {split}"]
        expected = task.record
    if recorded.get("fingerprint") == expected["fingerprint"]:
        return []
    reasons = describe_difference(recorded, expected)
    return [f"{db}: does not match {params}: {reason}" for reason in reasons or ["fingerprint differs"]]
