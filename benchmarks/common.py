"""What every benchmark shares: medians, the results table, workloads, the CLI and peak RSS."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DATUMDB = [str(BIN / "datumdb"), "--no-progress"]


def median_time(function: Callable[[], object], repeats: int) -> float:
    function()  # warm-up: page cache and lazy state
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Table:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(
        self, what: str, ours: str, baseline: str, ratio: float | None, target: float | None, note: str = ""
    ) -> None:
        met = None if ratio is None or target is None else ratio >= target
        self.rows.append({"what": what, "ours": ours, "baseline": baseline, "ratio": ratio, "target": target,
                          "met": met, "note": note})  # fmt: skip
        print(f"  {what}: {ours} vs {baseline} -> {_ratio(ratio)} (target {_target(target)})", file=sys.stderr)

    def markdown(self) -> str:
        lines = ["| what | ours | baseline | ratio | target | met |", "|---|---|---|---|---|---|"]
        for row in self.rows:
            met = "—" if row["met"] is None else ("yes" if row["met"] else "**no**")
            target = row["note"] if row["target"] is None and row["note"] else _target(row["target"])
            lines.append(f"| {row['what']} | {row['ours']} | {row['baseline']} | {_ratio(row['ratio'])} | "
                         f"{target} | {met} |")  # fmt: skip
        return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _target(value: float | None) -> str:
    return "report" if value is None else f">= {value:g}x"


def make_arrays(folder: Path, count: int, shape: tuple[int, ...], seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    images = np.lib.format.open_memmap(folder / "X.npy", mode="w+", dtype=np.uint8, shape=(count, *shape))
    for start in range(0, count, 10_000):
        stop = min(count, start + 10_000)
        images[start:stop] = rng.integers(0, 256, (stop - start, *shape), dtype=np.uint8)
    images.flush()
    del images
    np.save(folder / "y.npy", rng.integers(0, 10, count).astype(np.int64))
    return folder / "X.npy", folder / "y.npy"


_LAUNCHER = (
    "import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
    "status, usage = os.wait4(p.pid, 0)[1:]; print(usage.ru_maxrss); sys.exit(os.waitstatus_to_exitcode(status))"
)


def peak_rss_mb(command: list[str]) -> float:
    """Peak RSS of ``command``, run from a small launcher process.

    Linux carries a forked child's high-water RSS across exec, and a fork shares (and counts)
    all of the parent's pages: measured straight from the benchmark process, which holds the
    benchmark arrays, any child would seem to use gigabytes.
    """
    result = subprocess.run([sys.executable, "-c", _LAUNCHER, *command], check=True, capture_output=True, text=True)
    return int(result.stdout) / 1024
