"""Where the pipeline's outputs live, and which of them are stale.

The Snakefile and ``dvc.yaml`` name these paths literally (a test checks they agree with this
module). :func:`stale_outputs` compares the fingerprint each existing output records with the
one the current params and inputs imply: the Snakefile forces the jobs of the stale ones, so a
failed or partial run followed by a rerun always ends with outputs that match params.yaml, even
in a fresh clone where Snakemake has no records of its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datumdb.errors import InputError
from datumdb.manifest import MANIFEST_NAME
from datumdb.pipeline.config import PipelineConfig
from datumdb.pipeline.fingerprint import (
    build_fingerprints,
    build_record,
    describe_difference,
    input_digest,
    mean_record,
    verify_record,
)
from datumdb.pipeline.splits import SPLITS

__all__ = [
    "DATABASES",
    "MEAN_BINARYPROTO",
    "MEAN_JSON",
    "MEAN_NPY",
    "RECORDS",
    "RESOLVED_PARAMS",
    "SUMMARY",
    "database",
    "histogram",
    "metrics",
    "missing_outputs",
    "output_files",
    "sheet",
    "stale_outputs",
    "stale_records",
    "verify_details",
]

DATABASES = "data/lmdb"
RECORDS = "data/tmp/records"  # Snakemake's per-shard intermediates (temp(): deleted after the build)
MEAN_BINARYPROTO = "data/mean/mean.binaryproto"
MEAN_NPY = "data/mean/mean.npy"
MEAN_JSON = "reports/mean.json"
# params.yaml with every default filled in (`datumdb pipeline check --output`), which dvc.yaml's
# stages list their params from: DVC itself would refuse a key left to its default as missing.
RESOLVED_PARAMS = "reports/params.json"
SUMMARY = "reports/summary.md"


def database(split: str) -> str:
    return f"{DATABASES}/{split}"


def verify_details(split: str) -> str:
    return f"reports/verify/{split}.json"


def metrics(split: str) -> str:
    return f"reports/metrics/{split}.json"


def histogram(split: str) -> str:
    return f"reports/verify/{split}_labels.csv"


def sheet(split: str) -> str:
    return f"reports/verify/{split}_samples.png"


def output_files() -> list[str]:
    """Every file the pipeline produces (a database as its two files), in the order they are made."""
    from datumdb.manifest import DATA_NAME

    return [
        *(f"{database(split)}/{name}" for split in SPLITS for name in (DATA_NAME, MANIFEST_NAME)),
        *(path(split) for split in SPLITS for path in (verify_details, metrics, histogram, sheet)),
        MEAN_BINARYPROTO,
        MEAN_NPY,
        MEAN_JSON,
        SUMMARY,
    ]


def missing_outputs(root: str | Path = ".") -> list[str]:
    """The pipeline's output files absent under ``root`` (a run has yet to make them)."""
    return [name for name in output_files() if not (Path(root) / name).is_file()]


def _recorded(path: Path, *keys: str) -> Any:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        for key in keys:
            value = value[key]
        return value
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stale_outputs(config: PipelineConfig, root: str | Path = ".", *, inputs: str | None = None) -> dict[str, list[str]]:
    """Existing outputs whose recorded fingerprint is not the expected one: path -> reasons.

    Missing outputs are not listed (every orchestrator makes those anyway). The path given is the
    file that records the fingerprint (the manifest for a database).
    """
    root = Path(root)
    inputs = inputs if inputs is not None else input_digest(config)
    builds = build_fingerprints(config, inputs)
    expected: dict[str, tuple[Path, dict[str, Any], tuple[str, ...]]] = {}
    for split in SPLITS:
        expected[f"{database(split)}/{MANIFEST_NAME}"] = (
            root / database(split) / MANIFEST_NAME,
            build_record(config, split, inputs),
            ("metadata", "pipeline"),
        )
        expected[verify_details(split)] = (
            root / verify_details(split),
            verify_record(config, split, builds),
            ("pipeline",),
        )
    expected[MEAN_JSON] = (root / MEAN_JSON, mean_record(builds["train"]), ("pipeline",))
    stale = {}
    for name, (path, record, keys) in expected.items():
        if not path.exists():
            continue
        recorded = _recorded(path, *keys)
        if not isinstance(recorded, dict) or recorded.get("fingerprint") != record["fingerprint"]:
            stale[name] = describe_difference(recorded, record) or ["fingerprint differs"]
    return stale


def stale_records(config: PipelineConfig, records: str | Path, *, inputs: str | None = None) -> dict[int, str]:
    """The shards whose existing record files the build step would refuse: shard -> why.

    A records job that completed before its run was killed, or before a build failed, leaves its
    ``temp()`` files; after a param change the build refuses them (made with other params), and
    Snakemake, which sees complete files, would not remake them: the Snakefile reruns these
    shards' jobs (a stamp among their inputs). The header is compared as
    :func:`datumdb.pipeline.build.build_split` does (kept here so that the build step's code, and
    so every database's fingerprint, stays as it is; a test checks the two agree). Missing files
    are not listed: Snakemake makes those anyway.
    """
    from datumdb.pipeline.build import records_path
    from datumdb.pipeline.records import RecordFile

    inputs = inputs if inputs is not None else input_digest(config)
    stale: dict[int, str] = {}
    for split in SPLITS:
        params = build_record(config, split, inputs)["params"]
        for shard in range(config.partition.count):
            path = records_path(records, shard, split)
            if shard in stale or not path.is_file():
                continue
            try:
                header = RecordFile(path).header
            except InputError as exc:
                stale[shard] = str(exc)
                continue
            expected = {"shard": shard, "shards": config.partition.count, "params": params, "split": split}
            if {key: header.get(key) for key in expected} != expected:
                stale[shard] = f"{path}: made with other params"
    return stale
