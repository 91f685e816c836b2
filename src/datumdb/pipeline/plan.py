"""The plan of a build: which samples make up which shard, and what each shard must record.

The pipeline stores every split as a shard set (:mod:`datumdb.shardset`): many small Caffe
databases whose members are content-defined, so that a version costs what it changes. The plan
is computed from the params and the inputs alone, before anything is built, by every
orchestrator the same way:

* **Samples in sequence order**: an image list's lines as listed (or the class folders in
  sorted order), an array's rows by index. Appending samples extends the sequence; editing one
  changes it in one place. Each sample's **identity** is its path as listed (its index for
  arrays); a path listed again is a new identity (``path``, then ``path`` + ``\\0`` + n).
* **Members**: per sample ``[identity, label, content digest]`` (the file's sha256; a row's for
  arrays; none for synthetic samples, a pure function of the seed). A shard's **fingerprint**
  covers its members, the params that shape its bytes and the build code: it is what the shard
  records in its manifest, and a shard is rebuilt exactly when it differs.
* **Parts**: the shards are dealt to ``partition.shards`` parts, the units of work of the
  orchestrators (one Snakemake job each, one process each under DVC, one cluster job each under
  SLURM): all splits' shards in the order of their names (hashes of their first samples'
  identities: a random order that edits do not reshuffle), cut into runs of about the same
  number of samples, so the parts take about the same time and the last one does not hold up
  the run. A part's plan file changes when one of its shards does, or when a change of size
  elsewhere moves a shard across a cut (a few shards next to the cuts; a relabel moves none).
* **Split plan**: each split's shards in order with their fingerprints; its fingerprint stands
  for the whole shard set (what verify, mean and the assembled database record).

Input files are hashed once per run, and not at all when their size, mtime and inode match the
cache (:data:`INPUT_HASHES`), which both orchestrators share.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datumdb.errors import InputError
from datumdb.files import atomic_write
from datumdb.imageset import ListEntry
from datumdb.pipeline.config import STATE_DIR, PipelineConfig
from datumdb.pipeline.fingerprint import (
    build_params,
    code_digest,
    combined_input_digest,
    file_sha256,
    fingerprint,
)
from datumdb.pipeline.splits import SPLITS
from datumdb.shardset import plan_shards

__all__ = [
    "INPUT_HASHES",
    "PLAN_FORMAT",
    "Plan",
    "ShardTask",
    "deal_parts",
    "identity_bytes",
    "imageset_identities",
    "load_hash_cache",
    "make_plan",
    "part_file",
    "read_part",
    "read_plan",
    "read_split_plan",
    "save_hash_cache",
    "split_file",
    "write_plan",
]

PLAN_FORMAT = "datumdb-plan/1"
# The stat-keyed cache of input files' sha256 (path -> [size, mtime_ns, inode, sha256]), shared by
# the Snakefile, the DVC stages and the steps: each input file is hashed once, not once per step.
INPUT_HASHES = STATE_DIR / "input-hashes.json"
_ROW_PERSON = b"datumdb-row/1"

Member = list[Any]  # [identity (str, or int for arrays), label, digest (str, "" for synthetic)]


@dataclass(frozen=True)
class ShardTask:
    """One planned shard: where it goes, who is in it, and the fingerprint it must record."""

    split: str
    name: str
    part: int
    members: list[Member]
    record: dict[str, Any]  # what the shard's manifest records (metadata.pipeline): params, code, members' digest

    @property
    def fingerprint(self) -> str:
        return str(self.record["fingerprint"])

    def as_dict(self) -> dict[str, Any]:
        return {"split": self.split, "name": self.name, "record": self.record, "members": self.members}


@dataclass(frozen=True)
class Plan:
    """Every split's shards, in order; the shards of each part; each split's fingerprint."""

    parts: int
    shards: dict[str, list[ShardTask]]
    split_fingerprints: dict[str, str] = field(default_factory=dict)
    inputs: str | None = None
    """:func:`~datumdb.pipeline.fingerprint.input_digest` of the image files planned from, from the
    hashes the plan took of them: what a run records for DVC, without reading them again. None
    where the plan hashed no files (arrays, synthetic: their few files are hashed when asked) and
    for a plan read back from its files."""

    def part(self, number: int) -> list[ShardTask]:
        return [task for split in SPLITS for task in self.shards[split] if task.part == number]

    def split_plan(self, split: str) -> dict[str, Any]:
        """What the split's shard index must list (and record as its fingerprint)."""
        return {
            "format": PLAN_FORMAT,
            "split": split,
            "fingerprint": self.split_fingerprints[split],
            "shards": [
                {"name": task.name, "fingerprint": task.fingerprint, "members": len(task.members)}
                for task in self.shards[split]
            ],
        }

    def part_plan(self, number: int) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "part": number,
            "parts": self.parts,
            "shards": [task.as_dict() for task in self.part(number)],
        }


# ----------------------------------------------------------------------------- planning


def make_plan(config: PipelineConfig, cache: dict[str, Any] | None = None, *, listed: Any = None) -> Plan:
    """The plan for ``config``: its samples' members cut into content-defined shards per split.

    ``cache``: the input-hash cache (:func:`load_hash_cache`), updated in place. ``listed``: an
    imageset's :func:`~datumdb.pipeline.sources.listed_images`, if the caller has it already.
    """
    identities, members, inputs = _members(config, cache, listed)
    cut = plan_shards(
        [identity_bytes(identity) for identity in identities],
        config.seed,
        config.split.fractions,
        config.build.shard_size,
    )  # fmt: skip
    params = build_params(config)
    # A shard's bytes follow its members, not how many samples there are: a synthetic sample is a
    # function of (seed, index), so more samples (count) append shards and leave the others as they are.
    params["dataset"] = {key: value for key, value in params["dataset"].items() if key != "count"}
    code = code_digest("shards")
    part_of = deal_parts(
        [((shard.name, split), len(shard.members)) for split in SPLITS for shard in cut.shards[split]],
        config.partition.count,
    )  # fmt: skip
    shards: dict[str, list[ShardTask]] = {}
    split_fingerprints: dict[str, str] = {}
    for split in SPLITS:
        tasks = []
        for shard in cut.shards[split]:
            shard_members = [members[i] for i in shard.members.tolist()]
            listed = json.dumps(shard_members, separators=(",", ":"), ensure_ascii=True).encode("ascii")
            what = {"step": "shard", "split": split, "params": params, "code": code,
                    "members": "sha256:" + hashlib.sha256(listed).hexdigest()}  # fmt: skip
            tasks.append(ShardTask(split, shard.name, part_of[shard.name, split], shard_members,
                                   {**what, "fingerprint": fingerprint(what)}))  # fmt: skip
        if not tasks:
            raise InputError(
                f"split {split!r} would be empty ({len(identities)} samples, fractions "
                f"{list(config.split.fractions)}); use more samples or a larger fraction"
            )
        shards[split] = tasks
        split_fingerprints[split] = fingerprint(
            {"split": split, "seed": config.seed, "shards": [[t.name, t.fingerprint] for t in tasks]}
        )
    return Plan(config.partition.count, shards, split_fingerprints, inputs)


def deal_parts(shards: Sequence[tuple[tuple[str, str], int]], parts: int) -> dict[tuple[str, str], int]:
    """Each shard's part, from ((name, split), number of members) of every shard of every split.

    In the order of the names, the shards are cut into ``parts`` runs of about the same number
    of samples: a shard goes to the part in which its middle sample falls. Dealing by name alone
    (name modulo parts) left parts 55% apart on 20 000 photos (4 046 to 6 254 samples), and the
    run waited for the largest; runs are within one shard of each other, and since the names are
    hashes of identities a run is a random draw from every split.
    """
    ordered = sorted(shards)
    total = sum(size for _, size in ordered) or 1
    dealt, before = {}, 0
    for name, size in ordered:
        dealt[name] = min(parts - 1, (2 * before + size) * parts // (2 * total))
        before += size
    return dealt


def _members(
    config: PipelineConfig, cache: dict[str, Any] | None, listed: Any
) -> tuple[list[Any], list[Member], str | None]:
    """Every sample's identity and member entry, in sequence order; the image files' digest."""
    from datumdb.pipeline.sources import listed_images, open_source

    dataset = config.dataset
    if dataset.source == "imageset":
        entries, paths, _, _ = listed if listed is not None else listed_images(dataset)
        identities = imageset_identities(entries)
        digests = [file_sha256(path, cache) for path in paths]
        imageset = dataset.imageset
        named = [(f"{imageset.root}/{entry.path}", digest) for entry, digest in zip(entries, digests, strict=True)]
        if imageset.layout == "list":  # the list file first, as input_files() names it
            list_file = Path(dataset.input_dir) / imageset.list_file
            named.insert(0, (imageset.list_file, file_sha256(list_file, cache)))
        members = [[i, e.label, d] for i, e, d in zip(identities, entries, digests, strict=True)]
        return identities, members, combined_input_digest(named)
    source = open_source(dataset, config.seed, config.encoding)
    labels = source.labels().tolist()
    if dataset.source == "synthetic":  # a pure function of (seed, index, shape, classes): all in the params
        digests = [""] * source.count
    else:
        digests = _row_digests(source)
    return list(range(source.count)), [[i, labels[i], digests[i]] for i in range(source.count)], None


def identity_bytes(identity: str | int) -> bytes:
    """What a sample's hashes are taken of: a path's UTF-8 bytes, or an index as 8 bytes big-endian."""
    if isinstance(identity, int):
        return identity.to_bytes(8, "big")
    return identity.encode("utf-8", "surrogateescape")


def imageset_identities(entries: Sequence[ListEntry]) -> list[str]:
    """Each listed image's identity: its path as listed; a path listed again gets ``\0`` + n."""
    seen: dict[str, int] = {}
    identities = []
    for entry in entries:
        repeat = seen.get(entry.path, 0)
        seen[entry.path] = repeat + 1
        identities.append(entry.path if not repeat else f"{entry.path}\0{repeat}")
    return identities


def _row_digests(source: Any, chunk: int = 4096) -> list[str]:
    """A digest of each array row's bytes (so editing one row changes one shard)."""
    digests: list[str] = []
    for start in range(0, source.count, chunk):
        images, _ = source.read(start, min(start + chunk, source.count))
        rows = np.ascontiguousarray(images).reshape(len(images), -1).view(np.uint8)
        digests += [hashlib.blake2b(row.data, digest_size=16, person=_ROW_PERSON).hexdigest() for row in rows]
    return digests


# ----------------------------------------------------------------------------- plan files


def part_file(folder: str | os.PathLike[str], part: int) -> Path:
    return Path(folder) / f"part-{part}.json"


def split_file(folder: str | os.PathLike[str], split: str) -> Path:
    return Path(folder) / f"{split}.json"


def _plan_bytes(value: Mapping[str, Any]) -> bytes:
    return (json.dumps(value, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")


def write_plan(plan: Plan, folder: str | os.PathLike[str]) -> list[Path]:
    """Write the part and split plan files under ``folder``; only those whose content changed.

    An unchanged file keeps its bytes and its mtime, so Snakemake sees a changed file exactly
    when a shard of it changed. Plan files of parts that no longer exist are removed. Returns
    the files written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {part_file(folder, p): plan.part_plan(p) for p in range(plan.parts)}
    wanted |= {split_file(folder, split): plan.split_plan(split) for split in SPLITS}
    written = []
    for path, content in wanted.items():
        data = _plan_bytes(content)
        try:
            if path.read_bytes() == data:
                continue
        except OSError:
            pass
        atomic_write(path, data)
        written.append(path)
    for path in folder.glob("part-*.json"):
        if path not in wanted:
            path.unlink(missing_ok=True)
    return written


def _read_plan_file(path: Path, kind: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise InputError(f"{path}: {kind} plan not found (run the plan first)") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable {kind} plan ({exc})") from None
    if not isinstance(value, dict) or value.get("format") != PLAN_FORMAT or not isinstance(value.get("shards"), list):
        raise InputError(f"{path}: not a datumdb {kind} plan ({PLAN_FORMAT})")
    return value


def read_part(path: str | os.PathLike[str]) -> list[ShardTask]:
    """The shard tasks of a part plan file."""
    return _part_tasks(Path(path), _read_plan_file(Path(path), "part"))


def _part_tasks(path: Path, value: dict[str, Any]) -> list[ShardTask]:
    part = value.get("part")
    try:
        tasks = [ShardTask(s["split"], s["name"], part, s["members"], s["record"]) for s in value["shards"]]
        for task in tasks:
            task.fingerprint  # noqa: B018 (a record without one is refused here)
        return tasks
    except (KeyError, TypeError):
        raise InputError(f"{path}: a shard entry lacks split, name, members or record") from None


def read_split_plan(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A split plan file: the split's shards in order, with their fingerprints."""
    return _read_plan_file(Path(path), "split")


def read_plan(folder: str | os.PathLike[str]) -> Plan:
    """The plan written to ``folder`` by :func:`write_plan` (Snakemake's, made at its start-up).

    A step given it need not plan again (list the inputs, look up their hashes, cut the shards):
    the plan's files say what the shard sets must hold. Files that do not agree (a split plan
    naming a shard no part plan has, or with another fingerprint, or a part naming a shard no
    split plan lists) are refused.
    """
    folder = Path(folder)
    splits = {split: read_split_plan(split_file(folder, split)) for split in SPLITS}
    tasks: dict[str, ShardTask] = {}
    parts = 0
    for path in sorted(folder.glob("part-*.json")):
        value = _read_plan_file(path, "part")
        parts = max(parts, value["parts"] if isinstance(value.get("parts"), int) else 0)
        tasks.update((task.name, task) for task in _part_tasks(path, value))
    shards: dict[str, list[ShardTask]] = {}
    for split, split_plan in splits.items():
        shards[split] = []
        for entry in split_plan["shards"]:
            task = tasks.get(entry.get("name"))
            if task is None or task.split != split or task.fingerprint != entry.get("fingerprint"):
                raise InputError(
                    f"{split_file(folder, split)}: shard {entry.get('name')!r} is not planned so in the part "
                    "plans beside it (files of two plans?); plan again"
                )
            shards[split].append(task)
    unlisted = set(tasks) - {task.name for split in SPLITS for task in shards[split]}
    if unlisted:
        raise InputError(f"{folder}: part plans list shard {min(unlisted)!r}, no split plan does (files of two plans?)")
    return Plan(parts, shards, {split: str(value["fingerprint"]) for split, value in splits.items()})


# ----------------------------------------------------------------------------- the hash cache


def load_hash_cache(path: str | os.PathLike[str] = INPUT_HASHES) -> dict[str, Any]:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def save_hash_cache(cache: Mapping[str, Any], path: str | os.PathLike[str] = INPUT_HASHES) -> None:
    atomic_write(path, json.dumps(cache, separators=(",", ":")).encode("utf-8"))
