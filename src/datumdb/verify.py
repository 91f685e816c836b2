"""Verification: decode every record, recompute the content digest, compare with the manifest.

A database passes only if every record parses and decodes (raw sizes consistent, encoded
images decodable), and the count, content digest, label histogram and shapes recomputed from
the records equal what the writer recorded in ``datumdb.json``. The result is a report (a plain
dict, ready for ``--json``) listing every problem found, each naming the key where there is one.
A database without a manifest (made by Caffe, say) passes if every record decodes, with a warning.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from datumdb._progress import progress as progress_bar
from datumdb.codec import datum_to_array, decode
from datumdb.errors import DatumDBError
from datumdb.manifest import MANIFEST_NAME, ContentDigest, read_manifest
from datumdb.reader import DatumReader

__all__ = ["content_digest", "verify_database"]

MAX_PROBLEMS = 20  # a badly broken database should not print a million lines


def content_digest(db_path: str | os.PathLike[str], *, progress: bool | None = None) -> str:
    """Recompute the content digest of a database from its records (no manifest needed)."""
    with DatumReader(db_path) as reader:
        digest = ContentDigest()
        for key, value in progress_bar(reader.items(), enabled=progress, total=len(reader), desc="digest", unit="rec"):
            digest.update(key, value)
        return digest.hexdigest


def verify_database(db_path: str | os.PathLike[str], *, progress: bool | None = None) -> dict[str, Any]:
    """Check a database against its manifest; returns a report with ``ok`` and ``problems``."""
    path = Path(db_path)
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
    digest = ContentDigest()
    labels: Counter[int] = Counter()
    shapes: Counter[str] = Counter()
    bad_records = 0
    with DatumReader(path) as reader:
        items = progress_bar(reader.items(), enabled=progress, total=len(reader), desc="verify", unit="rec")
        for key, value in items:
            digest.update(key, value)
            try:
                datum = decode(value, key)
                array = datum_to_array(datum, key=key)
            except DatumDBError as exc:
                bad_records += 1
                if len(problems) < MAX_PROBLEMS:
                    problems.append(str(exc))
                continue
            labels[datum.label] += 1
            shapes["x".join(map(str, array.shape))] += 1
    report: dict[str, Any] = {
        "path": str(path),
        "count": digest.count,
        "digest": digest.hexdigest,
        "bad_records": bad_records,
        "label_histogram": {str(k): labels[k] for k in sorted(labels)},
        "shapes": dict(sorted(shapes.items())),
    }
    if manifest is not None:
        for field, found in (
            ("count", digest.count),
            ("digest", digest.hexdigest),
            ("label_histogram", report["label_histogram"]),
        ):
            if manifest.get(field) != found:
                problems.append(
                    f"{path}: {field} is {_short(found)} but the manifest says {_short(manifest.get(field))}"
                )
        expected_shapes = {k: v for k, v in manifest.get("shapes", {}).items() if k != "unknown"}
        if expected_shapes and {k: v for k, v in shapes.items() if k in expected_shapes} != expected_shapes:
            problems.append(f"{path}: decoded shapes {dict(shapes)} do not match the manifest's {expected_shapes}")
    report["ok"] = not problems
    report["problems"] = problems
    report["warnings"] = warnings
    return report


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."
