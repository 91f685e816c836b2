"""convert-imageset on JPEG photos: how close to the decoding floor, how it scales, and vs Caffe.

    python -m benchmarks.imageset --count 3000 --repeats 3

Three figures for ``count`` JPEG files of varied sizes (sides 200..1000 px), each resized to
256x256 as ImageNet-style lists are:

* the floor: what one core must do per image anyway (OpenCV ``imread`` + bilinear resize +
  the same raw Datum serialization), in this process, OpenCV on one thread, no LMDB;
* ``datumdb convert-imageset --resize-height 256 --resize-width 256`` with ``--workers 1`` and
  with every usable core (the whole command, Python start-up included; ``startup_s`` says how
  much of it that is);
* Caffe's own ``convert_imageset`` with the same resize, when one is on ``PATH``.

The photos: scikit-image's sample photos where it is installed, otherwise synthetic ones with
the statistics of natural images (a 1/f amplitude spectrum, correlated colour, hard edges,
sensor noise: about 2.2 bits per pixel at JPEG quality 90, as photos), so the decoder does the
work it does on photos of that size. (The shared Caffe photo fixtures are at most 64 px, too
small to crop from.) Each benchmark image is a random crop of one, scaled: sizes and aspect
ratios vary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from datumdb.codec import encode_array, hwc_to_chw
from datumdb.imageset import usable_cores

__all__ = ["find_caffe", "make_images", "measure"]

ROOT = Path(__file__).resolve().parents[1]
DATUMDB = [str(Path(sys.executable).parent / "datumdb"), "--no-progress"]
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # RGB, 300..640 px, public domain / CC0
RESIZE = 256
SIDES = (200, 1000)  # the longer side of a benchmark image, drawn uniformly
JPEG_QUALITY = 90
CAFFE_NAMES = ("convert_imageset", "convert_imageset.bin")  # Debian's caffe-tools-*, a source build


def median_time(function: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` runs after one untimed warm-up (page cache, lazy state)."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synthetic_photo(rng: np.random.Generator, height: int = 1200, width: int = 1600) -> np.ndarray:
    """A BGR uint8 image with natural-image statistics: what JPEG and its decoder see in a photo."""
    fy = np.fft.fftfreq(height)[:, np.newaxis]
    fx = np.fft.rfftfreq(width)[np.newaxis, :]
    radius = np.hypot(fx, fy)
    radius[0, 0] = 1.0

    def field() -> np.ndarray:  # amplitude ~ 1/f: the spectrum of natural scenes
        spectrum = (rng.normal(size=radius.shape) + 1j * rng.normal(size=radius.shape)) / radius
        values = np.fft.irfft2(spectrum, s=(height, width))
        return (values - values.mean()) / values.std()

    luminance = field()
    image = np.stack([luminance + 0.4 * field() for _ in range(3)], axis=-1) * 38 + rng.uniform(70, 180, 3)
    for _ in range(40):  # objects: hard edges at every scale
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        size = int(rng.integers(8, min(height, width) // 4))
        overlay = image.copy()
        if rng.random() < 0.5:
            cv2.circle(overlay, centre, size, colour, -1, cv2.LINE_AA)
        else:
            corner = (centre[0] + size, centre[1] + int(size * rng.uniform(0.3, 2)))
            cv2.rectangle(overlay, centre, corner, colour, -1)
        alpha = rng.uniform(0.4, 0.9)
        image = alpha * overlay + (1 - alpha) * image
    image += rng.normal(0, 4, image.shape)  # sensor noise: what makes photos cost bits
    return np.clip(image, 0, 255).astype(np.uint8)


def _photos(rng: np.random.Generator) -> list[np.ndarray]:
    """scikit-image's sample photos where it is installed (they ship in its wheel), else synthetic ones."""
    try:
        from skimage import data
    except ImportError:
        return [synthetic_photo(rng) for _ in range(6)]
    return [np.ascontiguousarray(getattr(data, name)()[..., ::-1]) for name in SKIMAGE_PHOTOS]


def _photo_source() -> str:
    try:
        import skimage
    except ImportError:
        return "synthetic (1/f spectrum, edges, noise)"
    return f"scikit-image {skimage.__version__}: {', '.join(SKIMAGE_PHOTOS)}"


def make_images(folder: Path, count: int, seed: int = 0) -> tuple[Path, Path, int]:
    """``count`` JPEGs in ``folder/images`` and their list file; returns (root, list, total bytes)."""
    rng = np.random.default_rng(seed)
    photos = _photos(rng)
    root = folder / "images"
    root.mkdir(parents=True, exist_ok=True)
    lines, total = [], 0
    for index in range(count):
        photo = photos[index % len(photos)]
        height, width = photo.shape[:2]
        crop_h = int(height * rng.uniform(0.4, 1.0))
        crop_w = int(width * rng.uniform(0.4, 1.0))
        top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
        crop = photo[top : top + crop_h, left : left + crop_w]
        scale = rng.uniform(*SIDES) / max(crop_h, crop_w)
        size = (max(1, round(crop_w * scale)), max(1, round(crop_h * scale)))
        image = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
        name = f"{index % 10}/img_{index:06d}.jpg"
        (root / name).parent.mkdir(exist_ok=True)
        if not cv2.imwrite(str(root / name), image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
            raise OSError(f"cannot write {root / name}")
        total += (root / name).stat().st_size
        lines.append(f"{name} {index % 10}\n")
    list_file = folder / "list.txt"
    list_file.write_text("".join(lines))
    return root, list_file, total


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


def ours(root: Path, list_file: Path, db: Path, workers: int) -> None:
    shutil.rmtree(db, ignore_errors=True)
    resize = ["--resize-height", str(RESIZE), "--resize-width", str(RESIZE)]
    command = [*DATUMDB, "convert-imageset", *resize, "--workers", str(workers), f"{root}/", str(list_file), str(db)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def caffe(binary: str, root: Path, list_file: Path, db: Path) -> None:
    shutil.rmtree(db, ignore_errors=True)  # Caffe refuses an existing database folder
    command = [binary, f"--resize_height={RESIZE}", f"--resize_width={RESIZE}", f"{root}/", str(list_file), str(db)]
    env = {**os.environ, "GLOG_minloglevel": "2"}  # no line per 1000 images on stderr
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)


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
    caffe_s = median_time(lambda: caffe(binary, root, list_file, work / "dbc"), repeats) if binary else None
    return {
        "count": count,
        "repeats": repeats,
        "cores": cores,
        "photos": _photo_source(),
        "mean_jpeg_bytes": total_bytes / count,
        "floor_s": floor_s,
        "ours_1_s": one_s,
        "ours_n_s": all_s,
        "startup_s": startup_s,
        "caffe": binary,
        "caffe_s": caffe_s,
        "ratios": {
            # speed-up of the whole command on N cores over one core's unavoidable work (ideal: N)
            "ours_n_vs_floor": floor_s / all_s,
            "scaling_n_vs_1": one_s / all_s,
            "ours_1_vs_floor": floor_s / one_s,
            "ours_n_vs_caffe": caffe_s / all_s if caffe_s else None,
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
