"""Build and verify at the speed of the disk and of sha256: the figures of datumdb issue 12.

    python -m benchmarks.build [--count N] [--repeats R] [--profile]

:func:`measure` times, as medians of ``repeats`` runs after one untimed warm-up (page cache warm):

* ``convert-arrays`` of N CIFAR-sized (3x32x32 uint8) samples, run as the CLI in a subprocess
  (as a user runs it: interpreter start-up and imports included, reported apart as ``startup_s``),
  against the limit of the hardware for the same build: the very bytes of its records written
  to one file and fsynced (``limit_s``);
* ``verify_database`` of that database against ``hashlib.file_digest(sha256)`` of its data.mdb.

:func:`profile` gives the cProfile of both, in this process, to see where the remaining time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import pstats
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import lmdb

from benchmarks.common import DATUMDB, make_arrays, median_time
from datumdb.sources import convert_arrays
from datumdb.verify import verify_database

__all__ = ["measure", "profile"]

SHAPE = (3, 32, 32)


def _records(db: Path) -> list[bytes]:
    """The serialized values of a built database, in key order: the bytes the limit writes."""
    env = lmdb.open(str(db), readonly=True, lock=False, subdir=True)
    try:
        with env.begin() as txn:
            return [value for _, value in txn.cursor()]
    finally:
        env.close()


def _write_limit(values: list[bytes], path: Path) -> None:
    """The hardware's limit for this build: the same serialized bytes, one sequential file, fsync."""
    with open(path, "wb") as handle:
        for value in values:
            handle.write(value)
        handle.flush()
        os.fsync(handle.fileno())


def _limit_time(db: Path, path: Path, repeats: int) -> float:
    values = _records(db)  # held only while timed: 300 MB for 100k samples
    return median_time(lambda: _write_limit(values, path), repeats)


def _sha256_of(path: Path) -> None:
    with open(path, "rb") as handle:
        hashlib.file_digest(handle, "sha256")


def measure(count: int, repeats: int, work: Path) -> dict[str, Any]:
    """Median seconds of the build and verify figures (see the module docstring) and their ratios.

    ``work`` is a folder for the arrays, the database and the limit's file (all removed at the
    end). A ratio is baseline time / our time: 1.0 means as fast as the baseline.
    """
    folder = Path(tempfile.mkdtemp(prefix="build-bench-", dir=work))
    try:
        images, labels = make_arrays(folder, count, SHAPE)
        db = folder / "db"

        def build() -> None:
            shutil.rmtree(db, ignore_errors=True)
            subprocess.run([*DATUMDB, "convert-arrays", str(images), str(labels), str(db)], check=True,
                           stdout=subprocess.DEVNULL)  # fmt: skip

        build_s = median_time(build, repeats)
        startup_s = median_time(
            lambda: subprocess.run([*DATUMDB, "--help"], check=True, stdout=subprocess.DEVNULL), repeats
        )
        limit_s = _limit_time(db, folder / "limit.bin", repeats)
        verify_s = median_time(lambda: verify_database(db), repeats)
        sha256_s = median_time(lambda: _sha256_of(db / "data.mdb"), repeats)
        report = verify_database(db)
        if not report["ok"]:
            raise RuntimeError(f"the benchmark database does not verify: {report['problems']}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "count": count,
        "repeats": repeats,
        "shape": "x".join(map(str, SHAPE)),
        "build_s": build_s,
        "startup_s": startup_s,
        "limit_s": limit_s,
        "build_vs_limit": limit_s / build_s,
        "verify_s": verify_s,
        "sha256_s": sha256_s,
        "verify_vs_sha256": sha256_s / verify_s,
    }


def profile(count: int, work: Path, top: int = 15) -> dict[str, str]:
    """cProfile (sorted by own time, the ``top`` entries) of convert-arrays and verify in this process.

    Threads are not profiled: the digest and sha256 hashing done in worker threads shows up as
    the main thread waiting (``acquire`` of a lock), which is the part not overlapped.
    """
    folder = Path(tempfile.mkdtemp(prefix="build-profile-", dir=work))
    try:
        images, labels = make_arrays(folder, count, SHAPE)
        db = folder / "db"
        convert_arrays(images, labels, db, progress=False)  # warm-up
        shutil.rmtree(db)
        results = {}
        for name, call in (
            ("convert-arrays", lambda: convert_arrays(images, labels, db, progress=False)),
            ("verify", lambda: verify_database(db)),
        ):
            profiler = cProfile.Profile()
            profiler.runcall(call)
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
            results[name] = text.getvalue()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.build", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000, help="samples (3x32x32 uint8)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per figure (median reported)")
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="folder for the data")
    parser.add_argument("--profile", action="store_true", help="also print cProfile of build and verify")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.count, args.repeats, args.tmp), indent=2))
    if args.profile:
        for name, text in profile(args.count, args.tmp).items():
            print(f"\n# {name}\n{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
