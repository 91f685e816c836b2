"""Verification: decode every record, recompute the content digest, compare with the manifest.

A database passes only if every record parses and decodes (raw sizes consistent, encoded
images decodable, float_data finite unless ``allow_nonfinite``), keys come in strictly
increasing order, and the count, content digest, label histogram and shapes recomputed from
the records, and the sha256 of ``data.mdb`` itself, equal what the writer recorded in
``datumdb.json`` (whose own checksum must hold too). The result is a report (a plain dict, ready
for ``--json``) listing every problem found, each naming the key where there is one. A database
without a manifest (made by Caffe, say) passes if every record decodes, with a warning; with
``strict=True`` it fails.

LMDB trusts its file: a damaged B-tree can make it crash the process or loop. ``isolate=True``
(what the CLI uses) runs the scan in a child process that reports its progress (records read,
bytes hashed) to the parent through a pipe; the parent kills it only when it *stalls*, i.e.
reports no progress for ``timeout`` seconds, so a healthy database passes however slow it is to
read, and a crash or a hang is reported as a failed verification instead of taking the caller
down. (A B-tree whose damage makes LMDB go round in circles repeats keys, which the key-order
check stops.) One record's decode counts as progress for at most ``timeout`` seconds: past that
the child ends itself and the key is reported (every decode is bounded from the image's header
first, :mod:`datumdb.imageheader`; this bounds what a header cannot tell). The child runs with
``python -I`` and imports exactly the datumdb package of the parent: nothing from the working
directory, ``PYTHONPATH`` or the user's site-packages.

A shard set (:mod:`datumdb.shardset`) is verified as its index and then every shard as a
database of its own (:func:`verify_shard_set`).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import operator
import os
import select
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

import datumdb
from datumdb._progress import progress as progress_bar
from datumdb.codec import RawLayout, datum_to_array, decode, shape_name
from datumdb.errors import DatabaseNotFoundError, DatumDBError, InputError
from datumdb.fastpath import OffsetIndex
from datumdb.framing import BackgroundDigest, FramedRecords, frame_items
from datumdb.imageheader import check_decodable
from datumdb.manifest import (
    DATA_NAME,
    MANIFEST_NAME,
    RECORDS_PER_CHUNK,
    SHARD_INDEX,
    ContentDigest,
    decode_mode,
    listed_shapes,
    read_manifest,
    shape_summary,
    shapes_sha256,
)
from datumdb.reader import DatumReader
from datumdb.shardset import read_shard_index, shard_set_digest, stray_shards
from datumdb.writer import restore_interrupted_publish

__all__ = [
    "DEFAULT_STALL_LIMIT",
    "check_stall_limit",
    "child_command",
    "content_digest",
    "verify_database",
    "verify_shard_set",
]

MAX_PROBLEMS = 20  # a badly broken database should not print a million lines
CHUNK_BYTES = 8 << 20  # values checked and hashed at a time (a few such chunks are alive at once)


def content_digest(db_path: str | os.PathLike[str], *, progress: bool | None = None) -> str:
    """Recompute the content digest of a database from its records (no manifest needed)."""
    with DatumReader(db_path) as reader:
        digest = ContentDigest()
        for key, value in progress_bar(reader.items(), enabled=progress, total=len(reader), desc="digest", unit="rec"):
            digest.update(key, value)
        return digest.hexdigest


DEFAULT_STALL_LIMIT = 60.0  # seconds without progress before an isolated scan is declared hung
STARTUP_LIMIT = 60.0  # seconds the child may take to start Python and import datumdb
_SLOW_DECODE_EXIT = 75  # the child's exit status when one record's decode took too long


def verify_database(
    db_path: str | os.PathLike[str],
    *,
    progress: bool | None = None,
    isolate: bool = False,
    timeout: float | None = None,
    strict: bool = False,
    allow_nonfinite: bool = False,
    decode: bool = True,
) -> dict[str, Any]:
    """Check a database against its manifest; returns a report with ``ok`` and ``problems``.

    ``decode=False`` checks an encoded image's header (its format and bounds) instead of decoding
    its pixels, and so not its decoded shape: what the job that just wrote the database checks
    (it decoded every image to write it); the full check decodes every image.

    With ``isolate=True`` the scan runs in a child process, killed only if it makes no progress
    for ``timeout`` seconds (the stall limit, default 60; a finite positive number). ``strict``
    fails a database without a manifest; ``allow_nonfinite`` accepts NaN and infinite values in
    ``float_data`` (reported as a warning instead of a problem).
    """
    stall_limit = check_stall_limit(DEFAULT_STALL_LIMIT if timeout is None else timeout)
    path = Path(db_path)
    # A rebuild killed between its two renames (file systems without an atomic exchange) leaves
    # the target absent and the previous version complete beside it: put it back first.
    restored = restore_interrupted_publish(path)
    if not (path / DATA_NAME).is_file():  # bad input, not a failed verification
        raise DatabaseNotFoundError(f"{path}: no {DATA_NAME} (not an LMDB database folder)")
    for name in (DATA_NAME, MANIFEST_NAME):  # unreadable is bad input too (an OSError), in or out of a child
        if (path / name).exists():  # O_NONBLOCK: a FIFO in its place must not block the open
            os.close(os.open(path / name, os.O_RDONLY | os.O_NONBLOCK))
    options = _Options(strict=strict, allow_nonfinite=allow_nonfinite, decode=decode)
    if isolate:
        report = _verify_in_child(path, progress, stall_limit, options)
    else:
        report = _verify_here(path, progress, options, _Progress())
    if restored is not None:
        report["warnings"].insert(0, f"{path}: was missing after an interrupted rebuild; restored the previous version")
    return report


def check_stall_limit(seconds: object) -> float:
    """The stall limit as a float, or an :class:`InputError`: it must be finite and positive
    (NaN would never expire, infinity never detect a hang, zero fail every database)."""
    try:
        value = float(seconds)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"timeout (--timeout): {seconds!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"timeout (--timeout): must be a finite number of seconds greater than 0, got {seconds!r}")
    return value


@dataclass(frozen=True)
class _Options:
    strict: bool = False
    allow_nonfinite: bool = False
    decode: bool = True


class _Progress:
    """What a scan has done so far, read by the child's heartbeat thread.

    ``busy`` is set while a record is being decoded by our own code (OpenCV included), since
    ``busy_since``, and ``key`` names the record: a decode counts as progress (its cost is
    bounded from the image's header first, :mod:`datumdb.imageheader`), but for at most the
    stall limit, after which the child's heartbeat ends the scan naming the key. Time spent
    inside LMDB with no new record is no progress at all.
    """

    def __init__(self) -> None:
        self.digest: ContentDigest | None = None
        self.bytes_hashed = 0
        self.key = b""
        self.busy_since = 0.0
        self.busy = False

    def decoding(self, key: bytes) -> None:
        """Mark the start of ``key``'s decode (key and start first: the heartbeat reads ``busy`` first)."""
        self.key, self.busy_since = key, time.monotonic()
        self.busy = True

    def snapshot(self) -> tuple[int, int, bool]:
        return (self.digest.count if self.digest is not None else 0), self.bytes_hashed, self.busy

    def slow_decode(self, limit: float) -> bytes | None:
        """The key being decoded if its decode has taken longer than ``limit`` seconds, else None."""
        if not self.busy:
            return None
        key, since = self.key, self.busy_since
        return key if self.busy and time.monotonic() - since > limit else None


def _verify_here(path: Path, progress: bool | None, options: _Options, state: _Progress) -> dict[str, Any]:
    problems: list[str] = []
    warnings: list[str] = []
    manifest: dict[str, Any] | None = None
    if (path / MANIFEST_NAME).exists():
        try:
            manifest = read_manifest(path)
        except DatumDBError as exc:
            problems.append(str(exc))
    elif options.strict:
        problems.append(f"{path}: no {MANIFEST_NAME} (strict): nothing to check the records against")
    else:  # a database made by Caffe or another tool: the records can still be checked
        warnings.append(f"{path}: no {MANIFEST_NAME}; checked that every record decodes, nothing to compare with")

    with ThreadPoolExecutor(1) as pool:  # hash the file on the other core while records are decoded
        file_hash = pool.submit(_file_sha256, path / DATA_NAME, state)
        scan = _scan(path, manifest, progress, problems, options, state)
        data_sha256 = file_hash.result()

    if scan["nonfinite_records"] and options.allow_nonfinite:
        warnings.append(f"{path}: {scan['nonfinite_records']} record(s) hold NaN or infinite float_data (allowed)")
    report: dict[str, Any] = {"path": str(path), **scan, "data_mdb_sha256": data_sha256}
    if manifest is not None:
        _compare(path, manifest, report, problems)
    summary = shape_summary(report["shapes"])  # 10^5 sizes: a summary, and the most common by name
    report["shapes"] = listed_shapes(report["shapes"])
    if summary is not None:
        report["shape_summary"] = summary
    report["ok"] = not problems
    report["problems"] = problems
    report["warnings"] = warnings
    return report


def _file_sha256(path: Path, state: _Progress, chunk_size: int = 1 << 20) -> str:
    """:func:`datumdb.manifest.file_sha256`, counting the bytes read so the watchdog sees progress."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
            state.bytes_hashed += len(chunk)
    return "sha256:" + digest.hexdigest()


def _scan(
    path: Path,
    manifest: dict[str, Any] | None,
    progress: bool | None,
    problems: list[str],
    options: _Options,
    state: _Progress,
) -> dict[str, Any]:
    """Check every record; those of a uniform raw database a chunk at a time.

    A chunk (up to a digest chunk, :data:`RECORDS_PER_CHUNK` records, or :data:`CHUNK_BYTES`)
    whose keys all increase and whose values all have the database's raw layout is checked by
    NumPy over the whole chunk, and its digest is hashed in a worker thread
    (:mod:`datumdb.framing`); any other chunk, and every record of a database that is not
    uniform raw, is checked record by record, which alone finds and names problems. Both ways
    give the same counts, digests and histograms.
    """
    digest = ContentDigest()
    state.digest = digest
    hasher = BackgroundDigest(digest)
    labels: Counter[int] = Counter()
    shapes: Counter[str] = Counter()
    bad_records = nonfinite = 0
    previous = b""  # the last key read; LMDB keys are never empty

    def bad(message: str) -> None:
        nonlocal bad_records
        bad_records += 1
        if len(problems) < MAX_PROBLEMS:
            problems.append(message)

    def check_record(key: bytes, value: bytes, reader: DatumReader, layout: RawLayout | None, layout_name: str) -> bool:
        """Check one record; False if the scan must stop (keys out of order)."""
        nonlocal previous, nonfinite
        if key <= previous:  # a damaged B-tree going round in circles repeats keys
            problems.append(f"{path}: key {_text(key)!r} comes after key {_text(previous)!r}: the B-tree is damaged")
            return False
        previous = key
        digest.update(key, value)
        label = layout.label(value) if layout is not None else None
        if label is not None:  # header, payload size, label and tail exactly as a raw Datum
            labels[label] += 1
            shapes[layout_name] += 1
            return True
        if not options.decode:  # the encoded image's header is checked, its pixels are not decoded
            try:
                datum = decode(value, key)
                if datum.encoded:
                    check_decodable(datum.data)
                    labels[datum.label] += 1
                    shapes["unknown"] += 1
                    return True
            except DatumDBError as exc:
                bad(str(exc))
                return True
        state.decoding(key)
        try:
            datum = decode(value, key)
            array = datum_to_array(datum, imread=reader.decode_mode, key=key)
        except DatumDBError as exc:
            bad(str(exc))
            return True
        finally:
            state.busy = False
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            nonfinite += 1
            if not options.allow_nonfinite:
                bad(f"key {_text(key)!r}: float_data holds NaN or infinity (allow with --allow-nonfinite)")
                return True
        labels[datum.label] += 1
        shapes[shape_name(array.shape)] += 1
        return True

    def check_chunks(items: Iterator[tuple[bytes, bytes]], reader: DatumReader, layout: RawLayout, name: str) -> None:
        """Check ``items`` a chunk at a time: in bulk where the chunk allows, else record by record."""
        nonlocal previous
        size = _chunk_records(layout)
        index = reader._offset_index()  # what the reader will serve these records from, if anything
        position = 0
        while True:
            chunk, error = _read_chunk(items, size)
            uniform = _uniform_chunk(chunk, previous, layout) if chunk else None
            if uniform is not None and index is not None and not _served_alike(index, position, chunk, uniform[1]):
                problems.append(
                    f"{path}: records {position}..{position + len(chunk) - 1} (from key {_text(chunk[0][0])!r}) "
                    "read through the offset index differ from what LMDB returns"
                )
                return
            position += len(chunk)
            if uniform is not None:
                records, found = uniform
                hasher.submit(records)
                unique, counts = np.unique(found, return_counts=True)
                for label, times in zip(unique.tolist(), counts.tolist(), strict=True):
                    labels[label] += times
                shapes[name] += len(chunk)
                previous = chunk[-1][0]
            else:
                hasher.wait()  # the digest takes this chunk's records one by one
                if not all(check_record(key, value, reader, layout, name) for key, value in chunk):
                    return
            if error is not None:
                raise error
            if len(chunk) < size:
                return

    try:
        try:
            with DatumReader(path, imread=decode_mode(manifest)) as reader:  # type: ignore[arg-type]
                items = progress_bar(reader.items(), enabled=progress, total=len(reader), desc="verify", unit="rec")
                layout = reader._raw_layout()  # uniform raw records: a full structural check, no parse
                layout_name = shape_name(layout.shape) if layout is not None else ""
                if layout is None:  # nothing to check in bulk: one record at a time, in the memory of one
                    for key, value in items:
                        if not check_record(key, value, reader, layout, layout_name):
                            break
                else:
                    check_chunks(items, reader, layout, layout_name)
        except (DatumDBError, lmdb.Error) as exc:
            where = f"after key {_text(previous)!r}" if previous else "before the first record"
            problems.append(f"{path}: LMDB cannot read the database {where}: {exc}")
        hasher.wait()
    finally:
        hasher.close()
    return {
        "count": digest.count,
        "digest": digest.hexdigest,
        "chunk_digests": digest.chunk_digests,
        "chunk_first_keys": [key.decode("utf-8", "backslashreplace") for key in digest.chunk_first_keys],
        "bad_records": bad_records,
        "nonfinite_records": nonfinite,
        "label_histogram": {str(k): labels[k] for k in sorted(labels)},
        "shapes": dict(sorted(shapes.items())),
    }


def _chunk_records(layout: RawLayout) -> int:
    """Records checked at a time: a power of two (so digest chunks are hashed whole) of about
    :data:`CHUNK_BYTES` of values, at most a digest chunk: bounded memory for large images too."""
    fitting = max(1, min(RECORDS_PER_CHUNK, CHUNK_BYTES // (layout.tail_start + 4)))
    return 1 << (fitting.bit_length() - 1)


def _read_chunk(
    items: Iterator[tuple[bytes, bytes]], size: int
) -> tuple[list[tuple[bytes, bytes]], DatumDBError | lmdb.Error | None]:
    """The next ``size`` records (fewer at the end), and the error that cut reading short, if
    any: the records read before it are checked before the error is reported, as one by one."""
    chunk: list[tuple[bytes, bytes]] = []
    try:
        chunk.extend(itertools.islice(items, size))
    except (DatumDBError, lmdb.Error) as exc:
        return chunk, exc
    return chunk, None


def _uniform_chunk(
    chunk: list[tuple[bytes, bytes]], previous: bytes, layout: RawLayout
) -> tuple[FramedRecords, np.ndarray] | None:
    """The framed records and labels of ``chunk`` if its keys increase from ``previous`` and
    every value has ``layout``; None if anything needs a look record by record."""
    keys = [key for key, _ in chunk]
    if not (previous < keys[0] and all(map(operator.lt, keys, itertools.islice(keys, 1, None)))):
        return None
    records = frame_items(keys, [value for _, value in chunk])
    found = layout.labels(records.buffer, records.value_starts, records.value_ends)
    return None if found is None else (records, found)


def _served_alike(index: OffsetIndex, start: int, chunk: list[tuple[bytes, bytes]], labels: np.ndarray) -> bool:
    """Whether the reader's offset index serves exactly these records (pixels and labels) at
    positions ``start``...: verify checks what the reader will serve, not only what LMDB returns."""
    layout = index.layout
    begin = len(layout.header)
    expected = np.frombuffer(b"".join(value[begin : begin + layout.size] for _, value in chunk), dtype=np.uint8)
    served = index.payloads(start, start + len(chunk))
    return np.array_equal(served.reshape(-1), expected) and np.array_equal(
        index.labels[start : start + len(chunk)], labels
    )


def _text(key: bytes) -> str:
    return key.decode("utf-8", "backslashreplace")


def _compare(path: Path, manifest: dict[str, Any], report: dict[str, Any], problems: list[str]) -> None:
    expected_file = manifest.get("data_mdb", {}).get("sha256")
    checks = [
        ("count", report["count"], manifest.get("count")),
        ("content digest", report["digest"], manifest.get("digest")),
        ("label histogram", report["label_histogram"], manifest.get("label_histogram")),
    ]
    if expected_file is not None:
        checks.append(("data.mdb sha256", report["data_mdb_sha256"], expected_file))
    for name, found, expected in checks:
        if found != expected:
            problems.append(f"{path}: {name} is {_short(found)} but the manifest says {_short(expected)}")
    if report["digest"] != manifest.get("digest"):
        problems.extend(_changed_chunks(path, manifest, report))
    expected_shapes = {k: v for k, v in manifest.get("shapes", {}).items() if k != "unknown"}
    found_shapes = {k: v for k, v in report["shapes"].items() if k in expected_shapes}
    if "unknown" in report["shapes"] and "unknown" not in manifest.get("shapes", {}):
        return  # encoded images checked without decoding (decode=False): their shapes are not known
    if expected_shapes and found_shapes != expected_shapes:
        problems.append(
            f"{path}: decoded shapes {_short(report['shapes'])} do not match the manifest's {_short(expected_shapes)}"
        )
    summary = manifest.get("shape_summary")
    expected_sha256 = summary.get("sha256") if isinstance(summary, dict) else None
    if isinstance(expected_sha256, str) and "unknown" not in manifest.get("shapes", {}) and "unknown" not in summary:
        found_sha256 = shapes_sha256(report["shapes"])  # the manifest lists the most common shapes only
        if found_sha256 != expected_sha256:
            problems.append(
                f"{path}: the decoded shapes ({len(report['shapes'])} distinct) do not match the manifest's "
                f"shape histogram ({summary.get('distinct')} distinct; sha256 {found_sha256} != {expected_sha256})"
            )


def _changed_chunks(path: Path, manifest: dict[str, Any], report: dict[str, Any]) -> list[str]:
    """Name the records whose chunk digest differs from the one written (the first few)."""
    expected = manifest.get("chunk_digests", {})
    size = expected.get("records_per_chunk", RECORDS_PER_CHUNK)
    found, keys = report["chunk_digests"], report["chunk_first_keys"]
    changed = [i for i in range(min(len(found), len(expected.get("sha256", [])))) if found[i] != expected["sha256"][i]]
    problems = []
    for i in changed[:3]:
        last = f" to before key {keys[i + 1]!r}" if i + 1 < len(keys) else " to the end"
        problems.append(
            f"{path}: records {i * size}..{i * size + size - 1} (from key {keys[i]!r}{last}) "
            "differ from what was written"
        )
    return problems


# The isolated child: ``python -I`` (no working directory, PYTHONPATH or user site on sys.path),
# then exactly the parent's datumdb package first on sys.path. argv: PACKAGE_ROOT DB [OPTIONS].
_CHILD_BOOTSTRAP = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from datumdb.verify import _child_main; raise SystemExit(_child_main(sys.argv[1:]))"
)


def child_command(module_code: str, *args: str) -> list[str]:
    """A command that runs ``module_code`` in an isolated interpreter importing this datumdb.

    ``python -m datumdb...`` would put the working directory first on ``sys.path``, so a
    ``datumdb/`` folder there would be imported and run instead. ``-I`` removes it (and
    ``PYTHONPATH`` and the user's site-packages); the code then puts the folder holding this
    very package (argv[1]) first, so the child runs the same datumdb as its parent.
    """
    package_root = str(Path(datumdb.__file__).resolve().parents[1])
    return [sys.executable, "-I", "-c", module_code, package_root, *args]


def _verify_in_child(path: Path, progress: bool | None, stall_limit: float, options: _Options) -> dict[str, Any]:
    """Run the scan in a child; kill it if it reports no progress for ``stall_limit`` seconds.

    One record's decode counts as progress for at most ``stall_limit`` seconds: the child ends
    itself past that (``--decode-limit``) and says which key, since a decoder stuck in C can
    only be stopped by ending its process.
    """
    arguments = [
        str(path),
        f"--heartbeat={min(1.0, max(0.01, stall_limit / 4)):.6f}",
        f"--decode-limit={stall_limit!r}",
    ]
    if progress is not None:
        arguments.append("--progress" if progress else "--no-progress")
    arguments += ["--strict"] * options.strict + ["--allow-nonfinite"] * options.allow_nonfinite
    child = subprocess.Popen(
        child_command(_CHILD_BOOTSTRAP, *arguments), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    assert child.stdout is not None
    pending, report_text, seen, started, slow_key = b"", None, (0, 0), False, None
    last_progress = time.monotonic()
    stalled = False
    try:
        while True:
            # Until its first heartbeat the child is starting Python and importing (bounded work,
            # slow on a busy machine): it gets at least STARTUP_LIMIT for that.
            limit = stall_limit if started else max(stall_limit, STARTUP_LIMIT)
            remaining = last_progress + limit - time.monotonic()
            if remaining <= 0:
                stalled = True
                break
            if not select.select([child.stdout], [], [], remaining)[0]:
                continue
            chunk = os.read(child.stdout.fileno(), 1 << 16)
            if not chunk:
                break  # the child is done (or dead)
            *lines, pending = (pending + chunk).split(b"\n")
            if lines and not started:
                started, last_progress = True, time.monotonic()
            for line in lines:
                if line.startswith(b"slow "):
                    slow_key = bytes.fromhex(line[len(b"slow ") :].decode("ascii", "replace"))
                elif line.startswith(b"report "):
                    report_text = line[len(b"report ") :]
                elif line.startswith(b"progress "):
                    records, hashed, busy = (int(field) for field in line.split()[1:4])
                    if (records, hashed) != seen or busy:
                        seen, last_progress = (records, hashed), time.monotonic()
            if pending.startswith(b"report "):  # a long report still arriving is progress too
                last_progress = time.monotonic()
        if not stalled:  # its output is closed: it is exiting (or has died)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=max(stall_limit, STARTUP_LIMIT))
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stdout.close()
    try:
        report = json.loads(report_text) if report_text is not None else None
    except json.JSONDecodeError:
        report = None
    if isinstance(report, dict):  # complete: how the child then exited does not matter
        return report
    if slow_key is not None:
        failed = _failed(
            path,
            f"{path}: key {_text(slow_key)!r}: decoding took longer than {stall_limit:g} s (--timeout); the scan "
            "stopped there (a decompression bomb or a broken image)",
        )
        failed["bad_records"] = 1
        return failed
    if stalled:
        return _failed(
            path,
            f"{path}: reading the database made no progress for {stall_limit:g} s (after {seen[0]} records): "
            "LMDB hung on a damaged B-tree, or the disk stopped answering",
        )
    if child.returncode < 0:
        return _failed(
            path,
            f"{path}: the LMDB library crashed reading the database (signal {-child.returncode}); data.mdb is corrupt",
        )
    return _failed(path, f"{path}: the verification process failed (exit {child.returncode})")


def _failed(path: Path, problem: str) -> dict[str, Any]:
    return {
        "path": str(path),
        "ok": False,
        "problems": [problem],
        "warnings": [],
        "count": None,
        "digest": None,
        "bad_records": None,
        "nonfinite_records": None,
        "label_histogram": {},
        "shapes": {},
        "data_mdb_sha256": None,
    }


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _child_main(argv: list[str]) -> int:
    """The isolated scan (see :func:`child_command`): progress lines and one JSON report.

    The protocol goes to the original stdout, and fd 1 is pointed at stderr, so that nothing
    else printed in this process can be taken for a report. A heartbeat thread writes
    ``progress RECORDS BYTES_HASHED BUSY`` every ``--heartbeat`` seconds; the last line is
    ``report JSON``, or ``slow KEY_HEX`` when one record's decode took longer than
    ``--decode-limit`` seconds, after which the child exits at once (the decoder may be stuck in
    C, where no exception reaches it). argv is ``DB [OPTIONS]``.
    """
    # The database comes first, always: a folder may be named like an option ("--strict").
    path, flags = Path(argv[0]), argv[1:]
    options = _Options(strict="--strict" in flags, allow_nonfinite="--allow-nonfinite" in flags)
    progress = True if "--progress" in flags else (False if "--no-progress" in flags else None)
    interval = next((float(arg.split("=", 1)[1]) for arg in flags if arg.startswith("--heartbeat=")), 1.0)
    decode_limit = next((float(arg.split("=", 1)[1]) for arg in flags if arg.startswith("--decode-limit=")), None)
    out = os.dup(1)
    os.dup2(2, 1)
    lock, done, state = threading.Lock(), threading.Event(), _Progress()

    def heartbeat() -> None:  # the first line at once: it tells the parent the child has started
        while True:
            records, hashed, busy = state.snapshot()
            slow = state.slow_decode(decode_limit) if decode_limit is not None else None
            with lock:
                if done.is_set():
                    return
                if slow is not None:
                    os.write(out, b"slow %s\n" % slow.hex().encode())
                    os._exit(_SLOW_DECODE_EXIT)
                os.write(out, b"progress %d %d %d\n" % (records, hashed, busy))
            if done.wait(interval):
                return

    threading.Thread(target=heartbeat, daemon=True).start()
    try:
        report = _verify_here(path, progress, options, state)
    except (DatumDBError, OSError) as exc:  # a file that vanished or became unreadable meanwhile
        report = _failed(path, str(exc))
    data = b"report " + json.dumps(report).encode() + b"\n"
    with lock:
        done.set()
        while data:
            data = data[os.write(out, data) :]
    return 0


def verify_shard_set(folder: str | os.PathLike[str], **options: Any) -> dict[str, Any]:
    """``datumdb verify`` of a shard set: its index, then every shard as a database of its own.

    One report, as for a database: ``ok`` only if the index holds (every shard present, counts
    adding up) and every shard passes with the count and content digest the index records.
    Problems name the shard. ``options`` are :func:`verify_database`'s.
    """
    folder = Path(folder)
    index = read_shard_index(folder)
    problems: list[str] = []
    warnings: list[str] = []
    bad = 0
    for shard in index["shards"]:
        report = verify_database(folder / shard["name"], **options)
        problems += report["problems"]
        warnings += report["warnings"]
        bad += report.get("bad_records") or 0
        if report["ok"] and (report["count"], report["digest"]) != (shard["count"], shard.get("digest")):
            problems.append(
                f"{folder / shard['name']}: {report['count']} records, digest {report['digest']}; "
                f"{SHARD_INDEX} says {shard['count']}, {shard.get('digest')}"
            )
    known = {shard["name"] for shard in index["shards"]}
    problems += [f"{stray}: a shard folder {SHARD_INDEX} does not list" for stray in stray_shards(folder, known)]
    return {
        "path": str(folder),
        "ok": not problems,
        "count": index["count"],
        "shards": len(index["shards"]),
        "digest": shard_set_digest(index),
        "problems": problems,
        "warnings": warnings,
        "bad_records": bad,
    }
