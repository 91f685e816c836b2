"""convert-imageset on JPEG photos: how close to the decoding floor, how it scales, and vs Caffe.

    python -m benchmarks.imageset --count 3000 --repeats 3

Three figures for ``count`` JPEG files of varied sizes (sides 200..1000 px), each resized to
256x256 as ImageNet-style lists are:

* the floor: what one core must do per image anyway (OpenCV ``imread`` + bilinear resize +
  the same raw Datum serialization), in this process, OpenCV on one thread, no LMDB;
* ``datumdb convert-imageset --resize-height 256 --resize-width 256`` with ``--workers 1`` and
  with every usable core (the whole command, Python start-up included; ``startup_s`` says how
  much of it that is);
* Caffe's own ``convert_imageset`` with the same resize, and with ``--encoded`` (the files' own
  bytes, each still decoded once, as Caffe does), when one is on ``PATH``: the two commands in
  turn (A B A B ...), so a machine whose speed drifts (a shared one) slows both alike; the
  speed-up is the median of the pairs' ratios, and each side's user+sys CPU seconds are medians
  too. Without Caffe these figures are "not measured".

The photos are crops and scales of scikit-image's sample photos (:mod:`benchmarks.photos`):
sizes, aspect ratios and JPEG qualities vary, as in a real collection.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2

from benchmarks.common import DATUMDB, median_time
from benchmarks.photos import PHOTO_SOURCE, make_photo_folder
from datumdb.codec import encode_array, hwc_to_chw
from datumdb.decodepool import usable_cores

__all__ = ["find_caffe", "make_images", "measure"]

RESIZE = 256
CAFFE_NAMES = ("convert_imageset", "convert_imageset.bin")  # Debian's caffe-tools-*, a source build


def make_images(folder: Path, count: int, seed: int = 0) -> tuple[Path, Path, int]:
    """``count`` JPEG photos in ``folder/images`` and their list file; returns (root, list, total bytes)."""
    root = folder / "images"
    entries = make_photo_folder(root, count, seed)
    list_file = folder / "list.txt"
    list_file.write_text("".join(f"{path} {label}\n" for path, label in entries))
    return root, list_file, sum((root / path).stat().st_size for path, _ in entries)


def find_caffe() -> str | None:
    """Caffe's convert_imageset on PATH, or None."""
    for name in CAFFE_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def floor(root: Path, list_file: Path) -> None:
    """The per-image work no converter can skip, on one core: imread, resize, serialize."""
    for line in list_file.read_text().splitlines():
        path, _, label = line.rpartition(" ")
        image = cv2.resize(cv2.imread(str(root / path), cv2.IMREAD_COLOR), (RESIZE, RESIZE))
        encode_array(hwc_to_chw(image), int(label))


def ours(root: Path, list_file: Path, db: Path, workers: int | None, *, encoded: bool = False) -> None:
    shutil.rmtree(db, ignore_errors=True)
    flags = ["--encoded"] if encoded else ["--resize-height", str(RESIZE), "--resize-width", str(RESIZE)]
    if workers is not None:
        flags += ["--workers", str(workers)]
    command = [*DATUMDB, "convert-imageset", *flags, f"{root}/", str(list_file), str(db)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def caffe(binary: str, root: Path, list_file: Path, db: Path, *, encoded: bool = False) -> None:
    shutil.rmtree(db, ignore_errors=True)  # Caffe refuses an existing database folder
    flags = ["--encoded"] if encoded else [f"--resize_height={RESIZE}", f"--resize_width={RESIZE}"]
    command = [binary, *flags, f"{root}/", str(list_file), str(db)]
    env = {**os.environ, "GLOG_minloglevel": "2"}  # no line per 1000 images on stderr
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)


def _timed(function: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds of ``function`` and the user+sys CPU seconds of the processes it ran."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    function()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def paired(ours_run: Callable[[], object], theirs_run: Callable[[], object], repeats: int) -> dict[str, float]:
    """Ours and theirs in turn after one warm-up each: medians of wall and CPU seconds, and the
    median of the pairs' speed-ups (their wall / ours)."""
    ours_run()
    theirs_run()
    pairs = [(_timed(ours_run), _timed(theirs_run)) for _ in range(repeats)]
    return {
        "ours_s": statistics.median(o[0] for o, _ in pairs),
        "ours_cpu_s": statistics.median(o[1] for o, _ in pairs),
        "theirs_s": statistics.median(t[0] for _, t in pairs),
        "theirs_cpu_s": statistics.median(t[1] for _, t in pairs),
        "speedup": statistics.median(t[0] / o[0] for o, t in pairs),
    }


def measure(work: Path, count: int, repeats: int) -> dict[str, Any]:
    """Times (medians of ``repeats`` after a warm-up) and the ratios, for ``count`` JPEGs made in ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    root, list_file, total_bytes = make_images(work, count)
    cores = usable_cores()
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        floor_s = median_time(lambda: floor(root, list_file), repeats)
    finally:
        cv2.setNumThreads(threads)
    one_s = median_time(lambda: ours(root, list_file, work / "db1", 1), repeats)
    all_s = median_time(lambda: ours(root, list_file, work / "dbn", cores), repeats)
    lines = list_file.read_text().splitlines(keepends=True)
    (work / "one.txt").write_text(lines[0])
    startup_s = median_time(lambda: ours(root, work / "one.txt", work / "db0", 1), repeats)
    binary = find_caffe()
    vs_caffe = {}
    if binary:
        for case, encoded in (("resize", False), ("encoded", True)):
            vs_caffe[case] = paired(
                lambda encoded=encoded: ours(root, list_file, work / "dbn", None, encoded=encoded),
                lambda encoded=encoded: caffe(binary, root, list_file, work / "dbc", encoded=encoded),
                repeats,
            )
    caffe_s = vs_caffe["resize"]["theirs_s"] if vs_caffe else None
    return {
        "count": count,
        "repeats": repeats,
        "cores": cores,
        "photos": PHOTO_SOURCE,
        "mean_jpeg_bytes": total_bytes / count,
        "floor_s": floor_s,
        "ours_1_s": one_s,
        "ours_n_s": all_s,
        "startup_s": startup_s,
        "caffe": binary,
        "caffe_s": caffe_s,
        "vs_caffe": vs_caffe or "not measured (no convert_imageset on PATH)",
        "ratios": {
            # speed-up of the whole command on N cores over one core's unavoidable work (ideal: N)
            "ours_n_vs_floor": floor_s / all_s,
            "scaling_n_vs_1": one_s / all_s,
            "ours_1_vs_floor": floor_s / one_s,
            "ours_n_vs_caffe": vs_caffe["resize"]["speedup"] if vs_caffe else None,
            "ours_n_vs_caffe_encoded": vs_caffe["encoded"]["speedup"] if vs_caffe else None,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.imageset", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="folder for the images (default: a temporary one)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="datumdb-imageset-"))
    try:
        print(json.dumps(measure(work, args.count, args.repeats), indent=2))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
