"""ImageNet-scale rehearsal: a folder of JPEG photos of many sizes through ``snakemake --cores N``.

    python -m benchmarks.photos                    # 100 000 photos, 100 classes
    python -m benchmarks.photos --count 2000       # a smoke run
    python -m benchmarks.photos --orchestrator dvc # the same through ``dvc repro``

The photos are crops and scales of scikit-image's sample photos (public domain / CC0;
scikit-image is in the test lock, which ``make bench`` installs), saved as JPEG at varied
qualities in ImageNet's layout (``root/<class>/<name>.JPEG``, folder-per-class), so sizes and
compression vary as in a real collection. Two builds go through the whole workflow
(plan, shards, assemble, verify, mean, report) on a copy of this repository:

* ``encoding: original``, no resize: every file's bytes stored unchanged (the small-LMDB way);
* ``resize 256x256`` and ``encoding: none``: raw pixels, Caffe's usual training input.

For each: wall time and images per second, the peak RSS of every job (Snakemake's ``benchmark:``
files), the disk used by the inputs, the shard sets and all outputs, and the ratio to one
``datumdb convert-imageset`` of the same list with the same options (which writes one database,
not three, and verifies nothing). Then the next version: 1% new photos appended to the list and
one label fixed, rebuilt, and the bytes the second ``dvc push`` adds to a local remote.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from benchmarks.common import BIN, DATUMDB, ROOT, peak_rss_mb

PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field", "immunohistochemistry",
    "camera", "moon", "brick", "grass", "gravel", "coins",
)  # fmt: skip
PHOTO_SOURCE = "scikit-image sample photos (crops and scales): " + ", ".join(PHOTOS)
SIDES = (160, 800)  # the longer side of a photo, drawn uniformly (ImageNet's are mostly 300..500)
QUALITIES = (70, 96)  # JPEG quality, drawn uniformly
CLASSES = 100
CHUNK = 500  # photos per generation task


def _sources() -> list[np.ndarray]:
    """scikit-image's sample photos (in its wheel) as OpenCV images: BGR, or grey for the grey ones."""
    from skimage import data

    images = []
    for name in PHOTOS:
        image = np.asarray(getattr(data, name)())
        if image.ndim == 3:
            image = cv2.cvtColor(np.ascontiguousarray(image[:, :, :3]), cv2.COLOR_RGB2BGR)
        images.append(image.astype(np.uint8))
    return images


def _photo_path(index: int) -> tuple[str, int]:
    label = index % CLASSES
    return f"n{label:08d}/n{label:08d}_{index}.JPEG", label


def _make_chunk(root: str, start: int, stop: int, seed: int) -> None:
    cv2.setNumThreads(1)
    sources = _sources()
    for index in range(start, stop):
        rng = np.random.default_rng([seed, index])
        image = sources[int(rng.integers(len(sources)))]
        height, width = image.shape[:2]
        crop_h, crop_w = int(height * rng.uniform(0.4, 1.0)), int(width * rng.uniform(0.4, 1.0))
        top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
        crop = image[top : top + crop_h, left : left + crop_w]
        scale = rng.uniform(*SIDES) / max(crop_h, crop_w)
        size = (max(16, round(crop_w * scale)), max(16, round(crop_h * scale)))
        photo = cv2.resize(crop, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        ok, encoded = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(*QUALITIES))])
        assert ok
        (Path(root) / _photo_path(index)[0]).write_bytes(encoded.tobytes())


def make_photo_folder(root: Path, count: int, seed: int = 0) -> list[tuple[str, int]]:
    """``count`` JPEG photos of varied sizes in ImageNet's layout, ``root/n<class>/<name>.JPEG``
    (CLASSES classes), made in parallel; returns (path, label) of each, in index order."""
    for label in range(CLASSES):
        (root / f"n{label:08d}").mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        for future in [
            pool.submit(_make_chunk, str(root), s, min(s + CHUNK, count), seed) for s in range(0, count, CHUNK)
        ]:
            future.result()
    return [_photo_path(index) for index in range(count)]


def tree_bytes(*paths: Path) -> int:
    """Bytes of the regular files under ``paths`` (each inode once)."""
    seen, total = set(), 0
    for top in paths:
        for folder, _, names in os.walk(top):
            for name in names:
                try:
                    info = os.lstat(os.path.join(folder, name))
                except FileNotFoundError:  # a temp file removed while we walk
                    continue
                if (info.st_dev, info.st_ino) not in seen:
                    seen.add((info.st_dev, info.st_ino))
                    total += info.st_size
    return total


def copy_repo(target: Path) -> Path:
    """This repository's tracked and new files (not tests) under ``target``, as a place to build."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split("\0")  # fmt: skip
    for name in filter(None, listed):
        if (ROOT / name).is_file() and not name.startswith("tests/"):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    return target


def job_stats(repo: Path) -> dict[str, dict[str, float]]:
    """Per rule, from Snakemake's benchmark files: jobs, their summed and longest wall seconds,
    and the largest peak RSS (MB; it counts the pages of files a job has mapped and read)."""
    stats: dict[str, dict[str, float]] = {}
    for path in sorted((repo / "logs" / "benchmarks").glob("*/*.tsv")):
        with open(path) as handle:
            for row in csv.DictReader(handle, delimiter="\t"):
                rule = stats.setdefault(
                    path.parent.name, {"jobs": 0, "seconds": 0.0, "longest_s": 0.0, "max_rss_mb": 0}
                )
                rule["jobs"] += 1
                rule["seconds"] += float(row["s"])
                rule["longest_s"] = max(rule["longest_s"], float(row["s"]))
                if row.get("max_rss", "NA") not in ("NA", "-", ""):
                    rule["max_rss_mb"] = max(rule["max_rss_mb"], float(row["max_rss"]))
    return stats


def _build(repo: Path, cores: int, orchestrator: str) -> float:
    """Seconds of one ``snakemake --cores N`` or ``dvc repro`` (one stage at a time; its stages
    spread their splits and parts over the cores themselves)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    if orchestrator == "dvc":
        command = [str(BIN / "dvc"), "repro", "--quiet"]
    else:
        command = [str(BIN / "snakemake"), "--cores", str(cores), "--quiet", "all"]
    start = time.perf_counter()
    subprocess.run(command, cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _shard_files(repo: Path) -> dict[str, bytes]:
    """Each shard's manifest: a rebuilt shard has a new one (what it was built from, its digest).
    Not the data file's inode: DVC links the outputs it records to its cache, new or not."""
    manifests = (repo / "data" / "shards").glob("*/*/datumdb.json")
    return {str(path.relative_to(repo)): path.read_bytes() for path in manifests}


def _dvc(repo: Path, *args: str) -> None:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, check=True, capture_output=True)


def one_percent_change(photos: Path, listing: Path, seed: int = 1) -> int:
    """Append 1% new photos to the list (new files) and fix one label: a typical next version."""
    lines = listing.read_text().splitlines()
    count = len(lines)
    added = max(1, count // 100)
    _make_chunk(str(photos), count, count + added, seed)
    path, label = lines[len(lines) // 2].rsplit(" ", 1)
    lines[len(lines) // 2] = f"{path} {(int(label) + 1) % CLASSES}"
    lines += [f"{_photo_path(index)[0]} {_photo_path(index)[1]}" for index in range(count, count + added)]
    listing.write_text("\n".join(lines) + "\n")
    return added


def rehearse(
    work: Path,
    photos: Path,
    *,
    name: str,
    encoding: str,
    resize: int,
    cores: int,
    shards: int,
    change: bool,
    orchestrator: str = "snakemake",
) -> dict:
    """The whole workflow on the photos (list layout), one bare convert-imageset of the same list;
    with ``change``, then a 1% change (:func:`one_percent_change`) rebuilt, and what `dvc push`
    adds to a local remote."""
    repo = copy_repo(work / f"repo-{name}")
    listing = photos.parent / f"{name}.txt"
    listing.write_text("".join(f"{path} {label}\n" for path, label in _listed(photos)))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["dataset"].update(source="imageset", input_dir=str(photos.parent))
    params["dataset"]["imageset"].update(layout="list", root=photos.name, list_file=listing.name,
                                         resize_height=resize, resize_width=resize)  # fmt: skip
    params["encoding"] = encoding
    params["partition"]["shards"] = list(range(shards))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["init", "-q"], ["add", "-A"], ["-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "b"]):
        subprocess.run(["git", *command], cwd=repo, check=True, capture_output=True)
    remote = work / f"remote-{name}"
    _dvc(repo, "remote", "add", "-d", "-f", "bench", str(remote))
    seconds = _build(repo, cores, orchestrator)
    counts = {s: json.loads((repo / "reports" / "verify" / f"{s}.json").read_text())["count"] for s in
              ("train", "val", "test")}  # fmt: skip
    jobs = job_stats(repo)

    # The same list, the same options, one convert-imageset (one database, no verify).
    flags = ["--encoded"] if encoding == "original" else []
    if resize:
        flags += ["--resize-height", str(resize), "--resize-width", str(resize)]
    db = work / f"single-{name}"
    single_start = time.perf_counter()
    single_rss = peak_rss_mb([*DATUMDB, "convert-imageset", f"{photos}/", str(listing), str(db), *flags])
    single = time.perf_counter() - single_start
    result = {
        "name": name,
        "orchestrator": orchestrator,
        "images": sum(counts.values()),
        "seconds": seconds,
        "images_per_second": sum(counts.values()) / seconds,
        "jobs": jobs,
        "inputs_bytes": tree_bytes(photos),
        "shard_sets_bytes": tree_bytes(repo / "data" / "shards"),
        "outputs_bytes": tree_bytes(repo / "data" / "shards", repo / "data" / "lmdb", repo / "data" / "mean"),
        "single_convert_imageset_seconds": single,
        "single_convert_imageset_peak_rss_mb": single_rss,
        "single_database_bytes": tree_bytes(db),
        "pipeline_vs_single": single / seconds,
    }
    shutil.rmtree(db, ignore_errors=True)
    if change:
        _dvc(repo, "push", "-q")
        pushed = tree_bytes(remote)
        result["change_added_photos"] = one_percent_change(photos, listing)
        shutil.rmtree(repo / "logs" / "benchmarks", ignore_errors=True)  # the jobs of the change alone
        before = _shard_files(repo)
        result["change_seconds"] = _build(repo, cores, orchestrator)
        result["change_jobs"] = job_stats(repo)
        result["change_vs_full"] = result["change_seconds"] / seconds
        _dvc(repo, "push", "-q")
        result["remote_bytes"] = pushed
        result["change_remote_added_bytes"] = tree_bytes(remote) - pushed
        result["change_shards_built"] = sum(before.get(path) != state for path, state in _shard_files(repo).items())
    shutil.rmtree(repo, ignore_errors=True)
    shutil.rmtree(remote, ignore_errors=True)
    return result


def _listed(photos: Path) -> list[tuple[str, int]]:
    """The photos' (path, label), in the order make_photo_folder made them (by index)."""
    found = [p.relative_to(photos).as_posix() for p in photos.glob("*/*.JPEG")]
    found.sort(key=lambda path: int(path.rsplit("_", 1)[1].split(".")[0]))
    return [(path, int(path.split("/")[0][1:])) for path in found]


def markdown(rows: list[dict[str, Any]], cores: int, orchestrator: str = "snakemake") -> str:
    command = "dvc repro" if orchestrator == "dvc" else f"snakemake --cores {cores}"
    lines = [
        f"| build ({command}) | images | wall | images/s | peak RSS per job (MB) | inputs | "
        "shard sets | all outputs | one convert-imageset | pipeline vs it |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        peaks = ", ".join(f"{rule} {job['max_rss_mb']:.0f}" for rule, job in sorted(row["jobs"].items())) or "-"
        lines.append(
            f"| {row['name']} | {row['images']:,} | {row['seconds']:.1f} s | {row['images_per_second']:,.0f} | "
            f"{peaks} | {row['inputs_bytes'] / 1e9:.2f} GB | {row['shard_sets_bytes'] / 1e9:.2f} GB | "
            f"{row['outputs_bytes'] / 1e9:.2f} GB | {row['single_convert_imageset_seconds']:.1f} s, "
            f"{row['single_convert_imageset_peak_rss_mb']:.0f} MB | {row['pipeline_vs_single']:.2f}x |"
        )
    lines += ["", "| build | rule: jobs, summed wall seconds (longest job) |", "|---|---|"]
    for row in rows:
        for name, jobs in ((row["name"], row["jobs"]), (f"{row['name']}: 1% change", row.get("change_jobs"))):
            if jobs is not None:
                summary = ", ".join(
                    f"{rule}: {job['jobs']:.0f}, {job['seconds']:.1f} s ({job['longest_s']:.1f} s)"
                    for rule, job in sorted(jobs.items())
                )
                lines.append(f"| {name} | {summary} |")
    changed = [row for row in rows if "change_seconds" in row]
    if changed:
        lines += ["", "| 1% change (photos appended, one label fixed) | rebuild | vs full run | shards rebuilt | "
                  "added to the remote |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        for row in changed:
            added = row["change_remote_added_bytes"]
            lines.append(
                f"| {row['name']}: +{row['change_added_photos']} photos | {row['change_seconds']:.1f} s | "
                f"{row['change_vs_full']:.2f}x | {row['change_shards_built']} | {added / 1e6:.1f} MB "
                f"({added / max(row['remote_bytes'], 1):.1%} of {row['remote_bytes'] / 1e6:.0f} MB) |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.photos", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000, help="photos to make (default %(default)s)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="snakemake --cores")
    parser.add_argument("--orchestrator", choices=("snakemake", "dvc"), default="snakemake",
                        help="build with snakemake (job statistics) or dvc repro (default %(default)s)")  # fmt: skip
    parser.add_argument("--shards", type=int, default=4, help="partition.shards: the parts (jobs) of the plan")
    parser.add_argument("--no-change", action="store_true", help="skip the 1%% change and the DVC pushes")
    parser.add_argument("--only", choices=("original", "resize"), default=None, help="one of the two builds")
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the photos and builds")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "photos.json")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="datumdb-photos-", dir=args.tmp))
    try:
        photos = work / "inputs" / "photos"
        start = time.perf_counter()
        make_photo_folder(photos, args.count)
        made = time.perf_counter() - start
        rows = []
        if args.only in (None, "original"):
            rows.append(rehearse(work, photos, name="original", encoding="original", resize=0, cores=args.cores,
                                 shards=args.shards, change=not args.no_change,
                                 orchestrator=args.orchestrator))  # fmt: skip
        if args.only in (None, "resize"):
            if rows and not args.no_change:  # the change added photos: start again from the same folder
                shutil.rmtree(photos)
                make_photo_folder(photos, args.count)
            rows.append(rehearse(work, photos, name="resize256-none", encoding="none", resize=256,
                                 cores=args.cores, shards=args.shards, change=not args.no_change,
                                 orchestrator=args.orchestrator))  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = markdown(rows, args.cores, args.orchestrator)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"count": args.count, "made_in_s": made, "rows": rows}, indent=2) + "\n")
    print(f"{args.count:,} photos made in {made:.0f} s\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
