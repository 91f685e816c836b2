"""Scale curve: build and verify cost per record, and peak memory, at 10^4, 10^5 and 10^6 records.

A flat cost per record and a bounded peak RSS are the claim: nothing in a build or a verify may
grow with the database (a list of keys, a dict of labels, a hash of every value kept around).
Each size is built with ``datumdb convert-arrays`` and checked with ``datumdb verify``, both run
as commands from a small launcher process so that their own peak RSS is measured (see
:func:`peak_rss_mb`), and timed around the command, so start-up is included (about 0.2 s: it is
visible at 10^4 and vanishes at 10^6).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.common import DATUMDB, make_arrays, peak_rss_mb

SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (2_000, 20_000)
SHAPE = (3, 32, 32)


def timed_rss(command: list[str]) -> tuple[float, float]:
    start = time.perf_counter()
    rss = peak_rss_mb(command)
    return time.perf_counter() - start, rss


def curve(work: Path, *, quick: bool) -> list[dict[str, Any]]:
    """One row per size: seconds and µs per record for build and verify, peak RSS of each, sizes."""
    rows = []
    for count in QUICK_SIZES if quick else SIZES:
        folder = work / f"scale-{count}"
        folder.mkdir()
        try:
            images, labels = make_arrays(folder, count, SHAPE, seed=count)
            db = folder / "db"
            build_s, build_rss = timed_rss([*DATUMDB, "convert-arrays", str(images), str(labels), str(db)])
            os.sync()  # the verify below reads a database whose pages are written, as a later job would
            verify_s, verify_rss = timed_rss([*DATUMDB, "verify", str(db)])
            rows.append(
                {
                    "records": count,
                    "npy_bytes": images.stat().st_size,
                    "data_mdb_bytes": (db / "data.mdb").stat().st_size,
                    "build_s": build_s,
                    "build_us_per_record": build_s / count * 1e6,
                    "build_peak_rss_mb": build_rss,
                    "verify_s": verify_s,
                    "verify_us_per_record": verify_s / count * 1e6,
                    "verify_peak_rss_mb": verify_rss,
                }
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| records | data.mdb | build | build µs/rec | build peak RSS | verify | verify µs/rec | verify peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['records']:,} | {row['data_mdb_bytes'] / 1e9:.2f} GB | {row['build_s']:.2f} s | "
            f"{row['build_us_per_record']:.1f} | {row['build_peak_rss_mb']:.0f} MB | {row['verify_s']:.2f} s | "
            f"{row['verify_us_per_record']:.1f} | {row['verify_peak_rss_mb']:.0f} MB |"
        )
    return "\n".join(lines)


def flatness(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Largest over smallest per-record cost among sizes of at least 10^5 (start-up blurs 10^4),
    and the largest peak RSS: what the claim "flat cost, bounded memory" is judged on."""
    large = [row for row in rows if row["records"] >= 100_000] or rows
    build = [row["build_us_per_record"] for row in large]
    verify = [row["verify_us_per_record"] for row in large]
    return {
        "build_spread": max(build) / min(build),
        "verify_spread": max(verify) / min(verify),
        "peak_rss_mb": max(max(row["build_peak_rss_mb"], row["verify_peak_rss_mb"]) for row in rows),
    }
