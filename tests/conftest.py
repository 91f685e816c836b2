"""Shared fixtures of the core-library tests: the Caffe ground truth, LMDB dumps, hypothesis profiles."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb
import pytest
from hypothesis import HealthCheck, settings

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "caffe"
FIXTURE_LMDBS = ("lmdb_raw", "lmdb_png", "lmdb_jpg", "lmdb_gray")
# The convert_imageset flags of COMMANDS.txt, spelled the datumdb way.
FIXTURE_FLAGS: dict[str, list[str]] = {
    "lmdb_raw": ["--resize-height", "32", "--resize-width", "32"],
    "lmdb_png": ["--encoded", "--encode-type", "png"],
    "lmdb_jpg": ["--encoded", "--encode-type", "jpg", "--resize-height", "32", "--resize-width", "32"],
    "lmdb_gray": ["--gray", "--resize-height", "24", "--resize-width", "24"],
}

# Bounded example counts keep the suite fast; "ci" is also derandomized so CI runs are repeatable.
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=40,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def optional_import(name: str) -> Any:
    """Import an optional test dependency (torch: its own tier), at collection.

    Where it is missing the module's tests are skipped with the reason, so `pytest` works in the
    dataset environment; under CI (``CI`` set), which installs every tier (`make test`), a missing
    one is a collection error instead: a skip must never hide a feature CI did not test.
    """
    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{name} is not installed (the test tier `make test` installs it)", allow_module_level=True)


def read_lmdb_items(path: str | os.PathLike[str]) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of an LMDB in key order, read without creating lock.mdb."""
    env = lmdb.open(str(path), readonly=True, lock=False, subdir=True)
    try:
        with env.begin() as txn:
            return [(bytes(k), bytes(v)) for k, v in txn.cursor()]
    finally:
        env.close()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def folder_state(folder: Path) -> dict[str, tuple[str, int]]:
    """name -> (sha256, mtime_ns) of every file in a folder."""
    return {p.name: (sha256_hex(p.read_bytes()), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def resident_fraction(path: Path) -> float:
    """How much of ``path`` is in the page cache (Linux ``mincore`` over a map of it)."""
    import ctypes
    import mmap

    import numpy as np

    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    pages = (len(mapped) + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    flags = (ctypes.c_ubyte * pages)()
    address = np.frombuffer(mapped, np.uint8).ctypes.data
    assert ctypes.CDLL(None, use_errno=True).mincore(ctypes.c_void_p(address), len(mapped), flags) == 0
    resident = sum(flag & 1 for flag in flags) / pages
    mapped.close()
    return resident


def live_processes_in_group(group: int) -> list[int]:
    """Processes of a process group that are not zombies (Linux /proc)."""
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rpartition(")")[2].split()
        except OSError:  # it exited meanwhile
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            found.append(int(stat_file.parent.name))
    return found


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def leftovers(target: Path) -> list[str]:
    """Hidden build folders (``.NAME.partial-*``, ``.NAME.old-*``) beside a target."""
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


@pytest.fixture(scope="session")
def caffe_dir() -> Path:
    """tests/fixtures/caffe: read only, never written."""
    return FIXTURES


@pytest.fixture(scope="session")
def lmdb_items():
    """The helper that dumps an LMDB's (key, value) pairs (opened read-only, lock-free, then closed)."""
    return read_lmdb_items


@pytest.fixture(scope="session")
def expected() -> dict[str, dict[str, Any]]:
    """The ``*.expected.json`` ground truth, by fixture name (``lmdb_raw``, ``mean_gray``...)."""
    return {p.name.removesuffix(".expected.json"): json.loads(p.read_text()) for p in FIXTURES.glob("*.expected.json")}
