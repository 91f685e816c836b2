"""Verification: decode every record, recompute the content digest, compare with the manifest.

A database passes only if every record parses and decodes (raw sizes consistent, encoded
images decodable), and the count, content digest, label histogram and shapes recomputed from
the records, and the sha256 of ``data.mdb`` itself, equal what the writer recorded in
``datumdb.json`` (whose own checksum must hold too). The result is a report (a plain dict, ready
for ``--json``) listing every problem found, each naming the key where there is one. A database
without a manifest (made by Caffe, say) passes if every record decodes, with a warning.

LMDB trusts its file: a damaged B-tree can make it crash the process or loop. ``isolate=True``
(what the CLI uses) runs the scan in a child process with a time limit, so a corrupt database
is reported as such instead of taking the caller down or hanging it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lmdb

from datumdb._progress import progress as progress_bar
from datumdb.codec import datum_to_array, decode
from datumdb.errors import DatabaseNotFoundError, DatumDBError
from datumdb.manifest import MANIFEST_NAME, RECORDS_PER_CHUNK, ContentDigest, decode_mode, file_sha256, read_manifest
from datumdb.reader import DATA_NAME, DatumReader
from datumdb.writer import restore_interrupted_publish

__all__ = ["content_digest", "verify_database"]

MAX_PROBLEMS = 20  # a badly broken database should not print a million lines


def content_digest(db_path: str | os.PathLike[str], *, progress: bool | None = None) -> str:
    """Recompute the content digest of a database from its records (no manifest needed)."""
    with DatumReader(db_path) as reader:
        digest = ContentDigest()
        for key, value in progress_bar(reader.items(), enabled=progress, total=len(reader), desc="digest", unit="rec"):
            digest.update(key, value)
        return digest.hexdigest


def verify_database(
    db_path: str | os.PathLike[str],
    *,
    progress: bool | None = None,
    isolate: bool = False,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Check a database against its manifest; returns a report with ``ok`` and ``problems``.

    With ``isolate=True`` the scan runs in a child process, killed after ``timeout`` seconds
    (default: 60 s plus 10 s per 100 MB of data.mdb).
    """
    path = Path(db_path)
    # A rebuild killed between its two renames (file systems without an atomic exchange) leaves
    # the target absent and the previous version complete beside it: put it back first.
    restored = restore_interrupted_publish(path)
    if not (path / DATA_NAME).is_file():  # bad input, not a failed verification
        raise DatabaseNotFoundError(f"{path}: no {DATA_NAME} (not an LMDB database folder)")
    if isolate:
        report = _verify_in_child(path, progress, timeout)
    else:
        report = _verify_here(path, progress)
    if restored is not None:
        report["warnings"].insert(0, f"{path}: was missing after an interrupted rebuild; restored the previous version")
    return report


def _verify_here(path: Path, progress: bool | None) -> dict[str, Any]:
    problems: list[str] = []
    warnings: list[str] = []
    manifest: dict[str, Any] | None = None
    if (path / MANIFEST_NAME).exists():
        try:
            manifest = read_manifest(path)
        except DatumDBError as exc:
            problems.append(str(exc))
    else:  # a database made by Caffe or another tool: the records can still be checked
        warnings.append(f"{path}: no {MANIFEST_NAME}; checked that every record decodes, nothing to compare with")

    with ThreadPoolExecutor(1) as pool:  # hash the file on the other core while records are decoded
        file_hash = pool.submit(file_sha256, path / DATA_NAME) if (path / DATA_NAME).is_file() else None
        scan = _scan(path, manifest, progress, problems)
        data_sha256 = file_hash.result() if file_hash is not None else None

    report: dict[str, Any] = {"path": str(path), **scan, "data_mdb_sha256": data_sha256}
    if manifest is not None:
        _compare(path, manifest, report, problems)
    report["ok"] = not problems
    report["problems"] = problems
    report["warnings"] = warnings
    return report


def _scan(path: Path, manifest: dict[str, Any] | None, progress: bool | None, problems: list[str]) -> dict[str, Any]:
    digest = ContentDigest()
    labels: Counter[int] = Counter()
    shapes: Counter[str] = Counter()
    bad_records = 0
    last_key: bytes | None = None
    try:
        with DatumReader(path, imread=decode_mode(manifest)) as reader:  # type: ignore[arg-type]
            items = progress_bar(reader.items(), enabled=progress, total=len(reader), desc="verify", unit="rec")
            layout = reader._raw_layout()  # uniform raw records: a full structural check, no parse
            layout_name = "x".join(map(str, layout.shape)) if layout is not None else ""
            for key, value in items:
                last_key = key
                digest.update(key, value)
                label = layout.label(value) if layout is not None else None
                if label is not None:  # header, payload size, label and tail exactly as a raw Datum
                    labels[label] += 1
                    shapes[layout_name] += 1
                    continue
                try:
                    datum = decode(value, key)
                    array = datum_to_array(datum, imread=reader.decode_mode, key=key)
                except DatumDBError as exc:
                    bad_records += 1
                    if len(problems) < MAX_PROBLEMS:
                        problems.append(str(exc))
                    continue
                labels[datum.label] += 1
                shapes["x".join(map(str, array.shape))] += 1
    except (DatumDBError, lmdb.Error) as exc:
        where = "before the first record" if last_key is None else f"after key {last_key.decode('utf-8', 'replace')!r}"
        problems.append(f"{path}: LMDB cannot read the database {where}: {exc}")
    return {
        "count": digest.count,
        "digest": digest.hexdigest,
        "chunk_digests": digest.chunk_digests,
        "chunk_first_keys": [key.decode("utf-8", "backslashreplace") for key in digest.chunk_first_keys],
        "bad_records": bad_records,
        "label_histogram": {str(k): labels[k] for k in sorted(labels)},
        "shapes": dict(sorted(shapes.items())),
    }


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
    if expected_shapes and found_shapes != expected_shapes:
        problems.append(f"{path}: decoded shapes {report['shapes']} do not match the manifest's {expected_shapes}")


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


def _verify_in_child(path: Path, progress: bool | None, timeout: float | None) -> dict[str, Any]:
    if timeout is None:
        size = (path / DATA_NAME).stat().st_size if (path / DATA_NAME).is_file() else 0
        timeout = 60 + 10 * size / 100e6
    command = [sys.executable, "-m", "datumdb.verify", str(path)]
    if progress is not None:
        command.append("--progress" if progress else "--no-progress")
    try:
        child = subprocess.run(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return _failed(path, f"{path}: reading the database did not finish in {timeout:.0f} s (a damaged B-tree?)")
    if child.returncode < 0:
        return _failed(
            path,
            f"{path}: the LMDB library crashed reading the database (signal {-child.returncode}); data.mdb is corrupt",
        )
    try:
        return json.loads(child.stdout)
    except json.JSONDecodeError:
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
        "label_histogram": {},
        "shapes": {},
        "data_mdb_sha256": None,
    }


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _child_main(argv: list[str]) -> int:
    """``python -m datumdb.verify DB [--progress|--no-progress]``: the isolated scan; JSON on stdout."""
    progress = True if "--progress" in argv else (False if "--no-progress" in argv else None)
    path = next(arg for arg in argv if not arg.startswith("--"))
    try:
        report = verify_database(path, progress=progress)
    except DatumDBError as exc:
        report = _failed(Path(path), str(exc))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1:]))
