"""Scale curve: build and verify cost per record, and peak memory, at 10^4, 10^5 and 10^6 records.

A flat cost per record and a bounded peak RSS are the claim: nothing in a build or a verify may
grow with the database (a list of keys, a dict of labels, a hash of every value kept around).
Each size is built with ``datumdb convert-arrays`` and checked with ``datumdb verify``, both run
as commands from a small launcher process so that their own peak RSS is measured (see
:func:`peak_rss_mb`), and timed around the command, so start-up is included (about 0.2 s: it is
visible at 10^4 and vanishes at 10^6).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.common import DATUMDB, make_arrays

SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (2_000, 20_000)
SHAPE = (3, 32, 32)


def _status(pid: int) -> dict[str, int]:
    """The kB figures of /proc/<pid>/status (VmHWM, RssAnon, ...); empty once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    fields = (line.split(":", 1) for line in text.splitlines() if line.endswith(" kB"))
    return {name: int(value.split()[0]) for name, value in fields}


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc (Linux)."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                pending += [int(child) for child in task.read_text().split()]
    return found


def timed_rss(command: list[str]) -> tuple[float, float, float]:
    """(seconds, peak RSS MB, peak anonymous RSS MB) of ``command`` and its children, sampled every 10 ms.

    RSS counts the pages of ``data.mdb`` a reader has mapped and touched (page cache, dropped by
    the kernel whenever it needs the memory); the anonymous part is what the process allocated.
    """
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    peak = anonymous = 0
    while process.poll() is None:
        for pid in _tree(process.pid):  # `datumdb verify` scans in a child process of its own
            status = _status(pid)
            peak = max(peak, status.get("VmHWM", 0))
            anonymous = max(anonymous, status.get("RssAnon", 0))
        time.sleep(0.01)
    seconds = time.perf_counter() - start
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    return seconds, peak / 1024, anonymous / 1024


def curve(work: Path, *, quick: bool) -> list[dict[str, Any]]:
    """One row per size: seconds and µs per record for build and verify, peak RSS of each, sizes."""
    rows = []
    for count in QUICK_SIZES if quick else SIZES:
        folder = work / f"scale-{count}"
        folder.mkdir()
        try:
            images, labels = make_arrays(folder, count, SHAPE, seed=count)
            db = folder / "db"
            os.sync()  # the build does not pay for writing its input out
            build_s, build_rss, build_anon = timed_rss([*DATUMDB, "convert-arrays", str(images), str(labels), str(db)])
            os.sync()  # the verify below reads a database whose pages are written, as a later job would
            verify_s, verify_rss, verify_anon = timed_rss([*DATUMDB, "verify", str(db)])
            rows.append(
                {
                    "records": count,
                    "npy_bytes": images.stat().st_size,
                    "data_mdb_bytes": (db / "data.mdb").stat().st_size,
                    "build_s": build_s,
                    "build_us_per_record": build_s / count * 1e6,
                    "build_peak_rss_mb": build_rss,
                    "build_peak_anonymous_mb": build_anon,
                    "verify_s": verify_s,
                    "verify_us_per_record": verify_s / count * 1e6,
                    "verify_peak_rss_mb": verify_rss,
                    "verify_peak_anonymous_mb": verify_anon,
                }
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| records | data.mdb | build | µs/record | peak RSS (anonymous) | verify | µs/record | peak RSS (anonymous) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        build = f"{row['build_peak_rss_mb']:.0f} MB ({row['build_peak_anonymous_mb']:.0f} MB)"
        verify = f"{row['verify_peak_rss_mb']:.0f} MB ({row['verify_peak_anonymous_mb']:.0f} MB)"
        lines.append(
            f"| {row['records']:,} | {row['data_mdb_bytes'] / 1e9:.2f} GB | {row['build_s']:.2f} s | "
            f"{row['build_us_per_record']:.1f} | {build} | {row['verify_s']:.2f} s | "
            f"{row['verify_us_per_record']:.1f} | {verify} |"
        )
    return "\n".join(lines)


def flatness(rows: list[dict[str, Any]]) -> dict[str, float]:
    """What "flat cost, bounded memory" is judged on: the cost per record at the largest size over
    the cost at the one before (start-up blurs the smallest), and the largest anonymous peak."""
    last, before = rows[-1], rows[-2] if len(rows) > 1 else rows[-1]
    return {
        "build_growth": last["build_us_per_record"] / before["build_us_per_record"],
        "verify_growth": last["verify_us_per_record"] / before["verify_us_per_record"],
        "peak_anonymous_mb": max(max(r["build_peak_anonymous_mb"], r["verify_peak_anonymous_mb"]) for r in rows),
        "peak_rss_mb": max(max(r["build_peak_rss_mb"], r["verify_peak_rss_mb"]) for r in rows),
    }
