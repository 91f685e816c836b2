"""datumdb benchmarks: every figure a ratio against a baseline measured in the same run.

    make bench                             # everything: the table of every target, met or not
    python -m benchmarks --quick           # smoke run: small sizes, same code paths
    python -m benchmarks --only reads      # some sections: build reads loader memory jpeg imageset
                                           #   pipeline scale
    python -m benchmarks.photos            # the ImageNet-scale rehearsal (100 000 photos; long)

Times are medians of ``--repeats`` runs after one untimed warm-up run, so the page cache is warm
(stated in the table); the machine is whatever runs it, and other load on it moves both sides of
each ratio alike. Results: a Markdown table on stdout and JSON in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import h5py
import lmdb
import numpy as np

from benchmarks.build import measure as measure_build
from benchmarks.common import BIN, DATUMDB, ROOT, Table, make_arrays, median_time, peak_rss_mb
from benchmarks.imageset import measure as measure_imageset
from benchmarks.photos import copy_repo, make_photo_folder, rehearse
from benchmarks.reading import dataloader_epochs, single_reads
from benchmarks.scale import curve, flatness
from benchmarks.scale import markdown as scale_markdown
from benchmarks.shards import measure as measure_shards
from datumdb import DatumReader
from datumdb.decodepool import usable_cores
from datumdb.proto.datum_pb2 import Datum

# ----------------------------------------------------------------------------- workloads


def build_ours(images: Path, labels: Path, db: Path, *extra: str) -> None:
    shutil.rmtree(db, ignore_errors=True)
    subprocess.run([*DATUMDB, "convert-arrays", str(images), str(labels), str(db), *extra], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip


def build_seed_way(images: np.ndarray, labels: np.ndarray, db: Path) -> None:
    """The seed tutorial: a protobuf Datum and a write transaction per sample, str keys."""
    shutil.rmtree(db, ignore_errors=True)
    env = lmdb.open(str(db), map_size=images.nbytes * 10 + (1 << 20))
    for i in range(len(images)):
        datum = Datum()
        datum.channels, datum.height, datum.width = images.shape[1:]
        datum.data = images[i].tobytes()
        datum.label = int(labels[i])
        str_id = f"{i:08}"
        with env.begin(write=True) as txn:
            txn.put(str_id.encode("ascii"), datum.SerializeToString())
    env.close()


def build_h5py(images: np.ndarray, labels: np.ndarray, path: Path) -> None:
    with h5py.File(path, "w") as handle:
        handle.create_dataset("X", data=images)
        handle.create_dataset("y", data=labels)


SECTIONS = ("build", "reads", "loader", "memory", "jpeg", "imageset", "pipeline", "versions", "scale", "shards")


def run(args: argparse.Namespace) -> dict[str, Any]:
    count = 10_000 if args.quick else 100_000
    repeats = 3 if args.quick else args.repeats
    cores = usable_cores()
    table = Table()
    wanted = set(args.only or SECTIONS)
    extra: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="datumdb-bench-", dir=args.tmp))
    try:
        images_path, labels_path = make_arrays(work, count, (3, 32, 32))
        images = np.load(images_path, mmap_mode="r")
        labels = np.load(labels_path)
        db = work / "db"
        build_ours(images_path, labels_path, db)

        if "build" in wanted:
            build_rows(table, images, labels, work, count, repeats, quick=args.quick)
        if "reads" in wanted:
            read_rows(table, db, images_path, images, labels, work, count, repeats)
        if "loader" in wanted:
            loader_rows(table, db, images_path, labels_path, repeats, quick=args.quick)
        if "memory" in wanted:
            memory_row(table, work, quick=args.quick)
        if "jpeg" in wanted:
            jpeg_rows(table, work, repeats, quick=args.quick)
        if "imageset" in wanted:
            extra["imageset"] = imageset_rows(table, work / "imageset", cores, repeats, quick=args.quick)
        if "pipeline" in wanted:
            pipeline_row(table, work, cores, quick=args.quick)
        if "versions" in wanted:
            extra["versions"] = version_rows(table, work / "versions", cores, quick=args.quick)
        if "scale" in wanted:
            extra["scale"] = scale_rows(table, work, quick=args.quick)
        if "shards" in wanted:
            extra["shards"] = shard_rows(table, work / "shards", repeats, quick=args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"machine": machine(), "count": count, "repeats": repeats, "page_cache": "warm",
            "rows": table.rows, "markdown": table.markdown(), **extra}  # fmt: skip


def build_rows(
    table: Table, images: np.ndarray, labels: np.ndarray, work: Path, count: int, repeats: int, *, quick: bool
) -> None:
    figures = measure_build(count, repeats, work)
    ours = figures["build_s"]
    subset = min(count, 2000 if quick else 5000)
    seed = median_time(lambda: build_seed_way(images[:subset], labels[:subset], work / "seed"), 1) * count / subset
    h5 = median_time(lambda: build_h5py(np.asarray(images), labels, work / "x.h5"), repeats)
    rate = f"{count / ours:,.0f} rec/s"
    table.add("build: convert-arrays vs the seed's way", f"{ours:.2f} s ({rate})",
              f"{seed:.1f} s (txn per sample; {subset} timed, scaled)", seed / ours, 30)  # fmt: skip
    table.add("build: convert-arrays vs the limit", f"{ours:.2f} s (incl. {figures['startup_s']:.2f} s start-up)",
              f"{figures['limit_s']:.2f} s (same bytes, write+fsync)", figures["build_vs_limit"], 0.8)  # fmt: skip
    table.add("build: convert-arrays vs h5py", f"{ours:.2f} s", f"{h5:.2f} s (h5py write)", h5 / ours, None)
    table.add("full verify (decode + digests) vs sha256 of data.mdb", f"{figures['verify_s']:.2f} s",
              f"{figures['sha256_s']:.2f} s", figures["verify_vs_sha256"], 0.8)  # fmt: skip


def read_rows(
    table: Table, db: Path, images_path: Path, images: np.ndarray, labels: np.ndarray, work: Path, count: int,
    repeats: int,
) -> None:  # fmt: skip
    rng = np.random.default_rng(1)
    picks = rng.integers(0, count, 20_000).tolist()
    single = single_reads(db, images_path, picks, repeats)
    table.add("random single read vs memmap", f"{single['ours_us']:.2f} µs",
              f"{single['memmap_us']:.2f} µs (np.load mmap, copy)", single["vs_memmap"], 0.9)  # fmt: skip
    table.add("random single read vs a plain ndarray view of the map", f"{single['ours_us']:.2f} µs",
              f"{single['ndarray_us']:.2f} µs (np.asarray of the memmap, copy)", single["vs_ndarray"], 0.8)  # fmt: skip
    build_h5py(np.asarray(images[:count]), labels, work / "x.h5")
    with h5py.File(work / "x.h5", "r") as handle:
        h5_images, h5_labels = handle["X"], handle["y"]

        def h5_single() -> None:
            for i in picks[:2000]:
                h5_images[i], int(h5_labels[i])

        h5_us = median_time(h5_single, repeats) / 2000 * 1e6
    table.add("random single read vs h5py", f"{single['ours_us']:.2f} µs", f"{h5_us:.2f} µs (h5py)",
              h5_us / single["ours_us"], 3)  # fmt: skip

    batches = [rng.integers(0, count, 256) for _ in range(200)]
    out = np.empty((256, 3, 32, 32), np.uint8)
    with DatumReader(db) as reader:

        def ours_batch() -> None:
            for batch in batches:
                reader.read_batch(batch, out=out)

        def memmap_batch() -> None:
            for batch in batches:
                images[batch], labels[batch]

        ours_time = median_time(ours_batch, repeats)
        memmap_time = median_time(memmap_batch, repeats)
    table.add("random batch of 256 vs memmap gather", f"{ours_time / len(batches) * 1e3:.2f} ms",
              f"{memmap_time / len(batches) * 1e3:.2f} ms", memmap_time / ours_time, 0.5)  # fmt: skip


def loader_rows(table: Table, db: Path, images_path: Path, labels_path: Path, repeats: int, *, quick: bool) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        table.add("PyTorch DataLoader epoch", "torch not installed", "—", None, None)
        return
    epochs = dataloader_epochs(db, images_path, labels_path, repeats, quick)
    for label, target in (("workers2", 1.0), ("workers2_persistent", None), ("workers0", None)):
        row = epochs[label]
        setting = {"workers2": "2 workers, new each epoch", "workers2_persistent": "2 persistent workers",
                   "workers0": "in the main process"}[label]  # fmt: skip
        baseline = f"{row['memmap_s']:.2f} s (plain ndarray {row['ndarray_s']:.2f} s)"
        what = f"PyTorch DataLoader epoch ({setting}, batch 256, shuffled) vs memmap"
        table.add(what, f"{row['ours_s']:.2f} s", baseline, row["vs_memmap"], target)


def memory_row(table: Table, work: Path, *, quick: bool) -> None:
    big_count = 20_000 if quick else 700_000  # 700k x 3072 B = 2.15 GB
    big = work / "big"
    big.mkdir()
    big_images, big_labels = make_arrays(big, big_count, (3, 32, 32), seed=2)
    rss = peak_rss_mb([*DATUMDB, "convert-arrays", str(big_images), str(big_labels), str(big / "db")])
    size_gb = big_images.stat().st_size / 1e9
    table.add(f"build memory from a {size_gb:.2f} GB .npy", f"{rss:.0f} MB peak RSS", "—", None, None,
              note="target < 300 MB")  # fmt: skip
    table.rows[-1]["met"] = rss < 300
    shutil.rmtree(big)


def jpeg_rows(table: Table, work: Path, repeats: int, *, quick: bool) -> None:
    jpg_count = 300 if quick else 2000
    jpg = work / "jpg"
    jpg.mkdir()
    jpg_images, jpg_labels = make_arrays(jpg, jpg_count, (3, 256, 256), seed=3)
    jpg_time = median_time(lambda: build_ours(jpg_images, jpg_labels, jpg / "db", "--encode", "jpg"), 1)
    with DatumReader(jpg / "db") as jpg_reader:
        jpg_read = median_time(lambda: [jpg_reader[int(i)] for i in range(0, jpg_count, 4)], repeats)
    raw = np.load(jpg_images, mmap_mode="r")
    raw_read = median_time(lambda: [np.array(raw[i]) for i in range(0, jpg_count, 4)], repeats)
    table.add("3x256x256 JPEG: build", f"{jpg_count / jpg_time:,.0f} img/s", "—", None, None)
    table.add("3x256x256 JPEG: read+decode vs memmap of raw", f"{jpg_read / (jpg_count / 4) * 1e3:.2f} ms",
              f"{raw_read / (jpg_count / 4) * 1e3:.3f} ms", raw_read / jpg_read, None)  # fmt: skip
    shutil.rmtree(jpg)


def imageset_rows(table: Table, work: Path, cores: int, repeats: int, *, quick: bool) -> dict[str, Any]:
    count = 300 if quick else 3000
    figures = measure_imageset(work, count, 1 if quick else min(repeats, 3))
    ratios = figures["ratios"]
    per_image = 1e3 / count
    what = f"convert-imageset, {count} JPEG photos, resize 256"
    table.add(f"{what}: {cores} cores vs 1", f"{figures['ours_n_s'] * per_image:.2f} ms/img",
              f"{figures['ours_1_s'] * per_image:.2f} ms/img", ratios["scaling_n_vs_1"], 0.9 * cores)  # fmt: skip
    table.add(f"{what}: {cores} cores vs the one-core decoding floor", f"{figures['ours_n_s'] * per_image:.2f} ms/img",
              f"{figures['floor_s'] * per_image:.2f} ms/img (imread+resize+serialize)", ratios["ours_n_vs_floor"],
              None)  # fmt: skip
    if isinstance(figures["vs_caffe"], dict):
        for case, pair in figures["vs_caffe"].items():
            label = f"convert-imageset, {count} JPEG photos, {'resize 256' if case == 'resize' else '--encoded'}"
            table.add(f"{label}: {cores} cores vs Caffe's convert_imageset (pairs in turn, median)",
                      f"{pair['ours_s'] * per_image:.2f} ms/img, {pair['ours_cpu_s']:.2f} CPU-s",
                      f"{pair['theirs_s'] * per_image:.2f} ms/img, {pair['theirs_cpu_s']:.2f} CPU-s",
                      pair["speedup"], 0.9 * cores)  # fmt: skip
    else:
        table.add(f"{what}: vs Caffe's convert_imageset", "—", "not measured (no convert_imageset on PATH)", None,
                  0.9 * cores)  # fmt: skip
        table.rows[-1]["met"] = None
    return figures


def pipeline_row(table: Table, work: Path, cores: int, *, quick: bool) -> None:
    repo = copy_repo(work / "repo")
    params = (repo / "params.yaml").read_text()
    params = params.replace("count: 6000", f"count: {4000 if quick else 20000}")
    params = params.replace("encoding: none", "encoding: png")
    (repo / "params.yaml").write_text(params)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    def build(jobs: int) -> None:  # every output removed: each run does all the work
        for folder in ("data", "reports", ".snakemake", "logs"):
            shutil.rmtree(repo / folder, ignore_errors=True)
        subprocess.run([str(BIN / "snakemake"), "--cores", str(jobs), "--quiet", "all"], cwd=repo, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    one = median_time(lambda: build(1), 1)
    many = median_time(lambda: build(cores), 1)
    table.add(f"pipeline, PNG encoding: snakemake --cores {cores} vs --cores 1", f"{many:.1f} s", f"{one:.1f} s",
              one / many, 0.9 * cores)  # fmt: skip


def version_rows(table: Table, work: Path, cores: int, *, quick: bool) -> list[dict[str, Any]]:
    """Issue 18's three numbers, on varied JPEG photos (20 000; 2 000 with --quick), original bytes:
    the whole workflow against one bare convert-imageset of the same list, then a 1% change (photos
    appended, one label fixed) rebuilt against the full run, and what its `dvc push` adds; through
    Snakemake, then through DVC."""
    count = 2_000 if quick else 20_000
    photos = work / "inputs" / "photos"
    make_photo_folder(photos, count)
    rows = []
    for orchestrator in ("snakemake", "dvc"):  # DVC runs a stage at a time; Snakemake fills the cores with jobs
        if rows:  # the change added photos: start again from the same folder
            shutil.rmtree(photos)
            make_photo_folder(photos, count)
        rows.append(rehearse(work, photos, name="original", encoding="original", resize=0, cores=cores,
                             shards=cores, change=True, orchestrator=orchestrator))  # fmt: skip
    for row in rows:
        command = "dvc repro" if row["orchestrator"] == "dvc" else f"snakemake --cores {cores}"
        table.add(f"pipeline ({command}, {count:,} photos, {row['name']}) vs one convert-imageset",
                  f"{row['seconds']:.1f} s", f"{row['single_convert_imageset_seconds']:.1f} s",
                  row["pipeline_vs_single"], 0.8)  # fmt: skip
        table.add(f"{command}: 1% change ({row['change_added_photos']} photos appended, one label fixed): "
                  "rebuild vs full run",
                  f"{row['change_seconds']:.1f} s", f"{row['seconds']:.1f} s", 1 / row["change_vs_full"], 2.0,
                  note="rebuild <= 0.5x the full run")  # fmt: skip
        added = row["change_remote_added_bytes"] / max(row["remote_bytes"], 1)
        table.add(f"{command}: 1% change: bytes the second dvc push adds to the remote", f"{added:.1%}",
                  "100% (whole files)", None, None, note="<= 5%")  # fmt: skip
        table.rows[-1]["met"] = added <= 0.05
    return rows


def scale_rows(table: Table, work: Path, *, quick: bool) -> dict[str, Any]:
    rows = curve(work, quick=quick)
    flat = flatness(rows)
    last, before = f"{rows[-1]['records']:,}", f"{rows[-2]['records']:,}" if len(rows) > 1 else "—"
    table.add(f"scale: build cost per record, {last} vs {before} records", f"{flat['build_growth']:.2f}x", "—",
              None, None, note="flat: <= 1.25x")  # fmt: skip
    table.rows[-1]["met"] = flat["build_growth"] <= 1.25
    table.add(f"scale: verify cost per record, {last} vs {before} records", f"{flat['verify_growth']:.2f}x", "—",
              None, None, note="flat: <= 1.25x")  # fmt: skip
    table.rows[-1]["met"] = flat["verify_growth"] <= 1.25
    table.add(f"scale: peak anonymous memory of build and verify, up to {last} records",
              f"{flat['peak_anonymous_mb']:.0f} MB", f"(RSS with mapped file pages: {flat['peak_rss_mb']:.0f} MB)",
              None, None, note="bounded: < 300 MB")  # fmt: skip
    table.rows[-1]["met"] = flat["peak_anonymous_mb"] < 300
    return {"rows": rows, "flatness": flat, "markdown": scale_markdown(rows)}


def shard_rows(table: Table, work: Path, repeats: int, *, quick: bool) -> dict[str, Any]:
    figures = measure_shards(work, repeats, quick=quick)
    rate = figures["shard_bytes"] / 2**20 / figures["ours_s"]
    what = f"assemble {figures['records']} records from shards vs copying their values"
    ours = f"{figures['ours_s']:.2f} s ({rate:,.0f} MiB/s)"
    baseline = f"{figures['copy_s']:.2f} s (read + write + fsync)"
    table.add(what, ours, baseline, figures["copy_s"] / figures["ours_s"], 0.8)
    return figures


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory, 1), "python": platform.python_version(),
            "lmdb": ".".join(map(str, lmdb.version())), "numpy": np.__version__, "h5py": h5py.__version__,
            "platform": platform.platform()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every code path")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per figure (median reported)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "results.json")
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the temporary data (default: system temp)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections (default: all)")
    args = parser.parse_args(argv)
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    info = results["machine"]
    print(f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, Python {info['python']}, "
          f"LMDB {info['lmdb']}; page cache warm; medians of {results['repeats']} runs; "
          f"N={results['count']}\n")  # fmt: skip
    print(results["markdown"])
    if "scale" in results:
        print("\nScale curve (3x32x32 records; build = convert-arrays, verify = datumdb verify; each a command):\n")
        print(results["scale"]["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
