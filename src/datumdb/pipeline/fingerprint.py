"""Fingerprints: everything that determines an output's bytes, recorded in the output itself.

Why: an orchestrator's own bookkeeping is not enough to know an output is current. Snakemake
keeps it in ``.snakemake/`` (absent in a fresh clone, and a failed upstream job that deleted its
outputs does not make it rerun a downstream job whose outputs still exist); DVC keeps it in
``dvc.lock``. So every pipeline output records a fingerprint: a sha256 over

* the parameters that shape it (only those: the chosen source's settings, the seed, the split
  fractions, the encoding and the writer's options for a database; plus ``verify.sample`` for a
  verify report),
* the content of its input files (the source's files, every listed image of an imageset), and
* the code that makes it (the datumdb modules the step runs, :data:`STEP_CODE`).

Databases carry it in their manifest (``metadata.pipeline``), reports in their JSON. The
Snakefile recomputes the expected fingerprints when it starts and forces the jobs of outputs
whose recorded fingerprint differs (:func:`stale_outputs`); ``datumdb verify DB --params
params.yaml`` says whether a database matches the current params and which keys differ; DVC
stages list the same parameters and code files (a test checks ``dvc.yaml`` against
:data:`STEP_CODE`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from datumdb.errors import InputError
from datumdb.limits import check_regular_file, open_regular_file
from datumdb.pipeline.config import PipelineConfig, resolved_json
from datumdb.pipeline.splits import SPLITS

__all__ = [
    "PACKAGE_DIR",
    "STEP_CODE",
    "code_digest",
    "combined_input_digest",
    "describe_difference",
    "file_sha256",
    "fingerprint",
    "input_digest",
    "input_files",
    "mean_record",
    "recorded_build_fingerprint",
    "report_record",
    "stage_params_json",
    "verify_record",
]

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/datumdb

# The datumdb files whose code shapes each step's output (relative to src/datumdb); dvc.yaml lists
# the same as each stage's deps. Not cli.py (it only parses and dispatches) nor _progress.py.
_COMMON = (
    "__init__.py",  # the version, recorded in every manifest
    "errors.py",
    "files.py",
    "limits.py",
    "pipeline/__init__.py",
    "pipeline/config.py",
    "pipeline/params.schema.yaml",
    "pipeline/fingerprint.py",
    "pipeline/splits.py",
)
_SOURCES = ("sources.py", "synthetic.py", "imageset.py", "decodepool.py", "pipeline/sources.py")
_READ = (
    "codec.py",
    "imageheader.py",
    "pnggray.py",
    "manifest.py",
    "reader.py",
    "btree.py",
    "lmdbmap.py",
    "fastpath.py",
    "keys.py",
)
_SHARDS = (  # what writes (and, right after, checks) a shard set
    *_COMMON,
    *_SOURCES,
    *_READ,
    "framing.py",
    "shardset.py",
    "verify.py",
    "writer.py",
    "pipeline/plan.py",
    "pipeline/processes.py",
    "pipeline/shards.py",
)
STEP_CODE: dict[str, tuple[str, ...]] = {
    "shards": tuple(sorted(set(_SHARDS))),
    "assemble": tuple(sorted({*_SHARDS, "pipeline/assemble.py"})),
    "verify": tuple(
        sorted(
            {
                *_SHARDS,
                "pipeline/check.py",
                "pipeline/outputs.py",  # where the reports of every split go (DVC's stage)
                "pipeline/sheet.py",
                "pipeline/summary.py",
            }
        )
    ),
    "mean": tuple(
        sorted(
            {
                *_COMMON,
                *_READ,
                "mean.py",
                "shardset.py",
                "proto/__init__.py",
                "proto/datum_pb2.py",
                "pipeline/mean.py",
                "pipeline/summary.py",
            }
        )
    ),
    "report": tuple(sorted({*_COMMON, "pipeline/summary.py"})),
}
_CHUNK = 1 << 20
_ANY_SIZE = 1 << 62  # an input file of any size is hashed (in chunks), never read whole


def fingerprint(what: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``what`` (sorted keys, no spaces)."""
    text = json.dumps(what, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(text.encode("ascii")).hexdigest()


@functools.cache
def code_digest(step: str) -> str:
    """sha256 over the names and bytes of the files a step runs (read once per process: every
    record of a verify, mean or report output embeds the build's, so it is asked for often)."""
    digest = hashlib.sha256()
    for name in STEP_CODE[step]:
        data = (PACKAGE_DIR / name).read_bytes()
        digest.update(b"%d:%s%d:" % (len(name), name.encode(), len(data)) + data)
    return "sha256:" + digest.hexdigest()


def stage_params_json(config: PipelineConfig, inputs: str) -> bytes:
    """What DVC's stages read their params from (outputs.RESOLVED_PARAMS), as JSON: every parameter
    with its default (so a key left out of params.yaml takes its default under DVC too), the input
    files' digest as ``input_files`` (only the files the source reads count, not a `.dvc` file
    beside them) and each step's code digest as ``code.<step>`` (:func:`code_digest`).

    Why the code digests: a stage that listed its ~30 code files as deps made dvc.lock list them
    again for every stage, and DVC parses and rewrites dvc.lock after each stage it runs or
    records (a third of a small change's record time went to that YAML). Only the params stage
    lists the code files; a stage reruns when its own step's digest changes, as before.
    """
    return resolved_json(config, input_files=inputs, code={step: code_digest(step) for step in STEP_CODE})


# ----------------------------------------------------------------------------- inputs


def input_files(config: PipelineConfig) -> list[tuple[str, str | Path]]:
    """(name relative to input_dir, path) of every file the chosen source reads, in a fixed order."""
    dataset = config.dataset
    folder = Path(dataset.input_dir)
    if dataset.source == "synthetic":
        names: list[str] = []
    elif dataset.source == "arrays":
        names = [dataset.arrays.images, dataset.arrays.labels]
    elif dataset.source == "cifar10":
        names = list(dataset.cifar10.batches)
    elif dataset.source == "mnist":
        names = [dataset.mnist.images, dataset.mnist.labels]
    else:  # imageset: the list file and every image it lists, or every image of the class folders
        from datumdb.imageset import read_class_folders, read_list_file, resolve_file

        root = folder / dataset.imageset.root
        if dataset.imageset.layout == "folders":
            where = root
            files = []
            entries = read_class_folders(root)[0]
        else:
            where = folder / dataset.imageset.list_file
            files = [(dataset.imageset.list_file, where)]
            entries = read_list_file(where)
        real_root, folders = os.path.realpath(root), {}
        for entry in entries:  # resolved as the build resolves them
            path = resolve_file(root, entry, where, real_root=real_root, folders=folders)
            files.append((f"{dataset.imageset.root}/{entry.path}", path))
        return files
    return [(name, folder / name) for name in names]


def input_digest(config: PipelineConfig, cache: dict[str, Any] | None = None) -> str:
    """sha256 over the names and contents of the source's input files.

    ``cache`` (path -> [size, mtime_ns, inode, sha256]) lets a caller that asks often (the
    Snakefile, at every start) skip files whose stat is unchanged; the build itself hashes fresh.
    """
    return combined_input_digest((name, file_sha256(path, cache)) for name, path in input_files(config))


def combined_input_digest(named_hashes: Iterable[tuple[str, str]]) -> str:
    """:func:`input_digest` from each input file's name and sha256 (hex), in :func:`input_files`'
    order: the plan, which has hashed every file already, computes it without reading them again."""
    digest = hashlib.sha256()
    for name, sha in named_hashes:
        digest.update(b"%d:%s" % (len(name.encode()), name.encode()) + sha.encode())
    return "sha256:" + digest.hexdigest()


def file_sha256(path: str | Path, cache: dict[str, Any] | None) -> str:
    """A file's sha256 (hex); with ``cache``, taken from it while size, mtime and inode match.

    A cached file is only ``stat``-ed (a regular file, its identity as cached): the plan looks
    up every input of a version, and opening each of a million photos to learn nothing new
    cost more than the lookup. A file not in the cache is opened as a regular file and read.
    """
    key = os.path.abspath(path) if cache is not None else ""  # (no Path per photo of a long list)
    try:
        if cache is not None:
            info = check_regular_file(path, "input file", limit=_ANY_SIZE)
            cached = cache.get(key)
            if cached is not None and cached[:3] == [info.st_size, info.st_mtime_ns, info.st_ino]:
                return cached[3]
        handle = open_regular_file(path, "input file", limit=_ANY_SIZE)
    except FileNotFoundError:
        raise InputError(f"{path}: input file not found") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the input file: {exc.strerror or exc}") from None
    with handle:
        info = os.fstat(handle.fileno())
        digest = hashlib.sha256()
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    if cache is not None:
        cache[key] = [info.st_size, info.st_mtime_ns, info.st_ino, value]
    return value


# ----------------------------------------------------------------------------- records


def build_params(config: PipelineConfig) -> dict[str, Any]:
    """The parameters that shape the databases (not partition.shards: it only cuts the work)."""
    return {
        "dataset": config.dataset.source_options(),
        "seed": config.seed,
        "split": list(config.split.fractions),
        "encoding": config.encoding,
        "build": {
            "batch_size": config.build.batch_size,
            "map_size": config.build.map_size,
            "shard_size": config.build.shard_size,
        },
    }


def verify_record(config: PipelineConfig, split: str, databases: Mapping[str, str]) -> dict[str, Any]:
    """What a split's verify report records: the verify options, the databases it read (their
    build fingerprints, ``{split: ..., "train": ...}``) and its code."""
    what = {
        "step": "verify",
        "split": split,
        "params": {"verify": {"sample": config.verify.sample}},
        "databases": {split: databases[split], "train": databases["train"]},
        "code": code_digest("verify"),
    }
    return {**what, "fingerprint": fingerprint(what)}


def mean_record(train: str) -> dict[str, Any]:
    """What the mean records: the build fingerprint of the train database it read, and its code."""
    what = {"step": "mean", "databases": {"train": train}, "code": code_digest("mean")}
    return {**what, "fingerprint": fingerprint(what)}


def report_record(verify: Mapping[str, str], mean: str) -> dict[str, Any]:
    """What the summary records: the fingerprints of the reports it summarises, and its code."""
    what = {"step": "report", "verify": dict(verify), "mean": mean, "code": code_digest("report")}
    return {**what, "fingerprint": fingerprint(what)}


def recorded_build_fingerprint(db: str | os.PathLike[str]) -> str:
    """The build fingerprint a shard set (its index: the plan's) or a database (its manifest)
    records: what the steps that read it record in turn, so they need not hash the inputs again
    (it already stands for them)."""
    from datumdb.manifest import read_manifest
    from datumdb.shardset import is_shard_set, read_shard_index

    if is_shard_set(db):
        pipeline = read_shard_index(db).get("pipeline")
    else:
        metadata = read_manifest(Path(db)).get("metadata")
        pipeline = metadata.get("pipeline") if isinstance(metadata, dict) else None
    value = pipeline.get("fingerprint") if isinstance(pipeline, dict) else None
    if not isinstance(value, str):
        raise InputError(f"{db}: not built by the datumdb pipeline (it records no build fingerprint)")
    return value


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def describe_difference(recorded: Mapping[str, Any] | None, expected: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between a recorded and an expected record, key by key."""
    if not isinstance(recorded, Mapping):
        return ["no pipeline fingerprint recorded (not built by the datumdb pipeline, or by an older version)"]
    return list(_diff(recorded, expected, ""))


def _diff(recorded: Any, expected: Any, where: str) -> Iterable[str]:
    if isinstance(recorded, Mapping) and isinstance(expected, Mapping):
        for key in sorted(set(recorded) | set(expected)):
            if key == "fingerprint":
                continue
            name = f"{where}.{key}" if where else str(key)
            if key not in recorded:
                yield f"{name}: not recorded (expected {_short(expected[key])})"
            elif key not in expected:
                yield f"{name}: recorded {_short(recorded[key])}, no longer a parameter"
            else:
                yield from _diff(recorded[key], expected[key], name)
    elif recorded != expected:
        if where == "inputs":
            yield "the input files changed"
        elif where == "members":
            yield "its members (samples, labels or file contents) changed"
        elif where == "shards":
            yield "made from another version of the shard set"
        elif where == "code":
            yield "the datumdb code of this step changed"
        elif where.startswith(("databases.", "verify.", "mean")):
            yield f"made from an older {where.split('.')[-1]} output"
        else:
            yield f"{where.removeprefix('params.')}: {_short(recorded)} in the output, {_short(expected)} in the params"


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
