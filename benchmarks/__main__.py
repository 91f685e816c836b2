"""datumdb benchmarks: every figure a ratio against a baseline measured in the same run.

    make bench                      # full: 100k CIFAR-sized samples, 2 GB memory run, pipeline
    python -m benchmarks --quick    # smoke run: small sizes, same code paths

Times are medians of ``--repeats`` runs after one untimed warm-up run, so the page cache is warm
(stated in the table); the machine is whatever runs it, and other load on it moves both sides of
each ratio alike. Results: a Markdown table on stdout and JSON in ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
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

from benchmarks.common import BIN, DATUMDB, ROOT, Table, make_arrays, median_time, peak_rss_mb
from datumdb import DatumReader
from datumdb.codec import encode_array
from datumdb.proto.datum_pb2 import Datum
from datumdb.verify import verify_database

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


def write_limit(payload: list[bytes], path: Path) -> None:
    """The hardware's limit for this build: the same serialized bytes, one sequential file, fsync."""
    with open(path, "wb") as handle:
        for value in payload:
            handle.write(value)
        handle.flush()
        os.fsync(handle.fileno())


# ----------------------------------------------------------------------------- the suite


def run(args: argparse.Namespace) -> dict[str, Any]:
    count = 10_000 if args.quick else 100_000
    repeats = 3 if args.quick else args.repeats
    table = Table()
    work = Path(tempfile.mkdtemp(prefix="datumdb-bench-", dir=args.tmp))
    try:
        images_path, labels_path = make_arrays(work, count, (3, 32, 32))
        images = np.load(images_path, mmap_mode="r")
        labels = np.load(labels_path)
        db = work / "db"

        # -- build
        ours = median_time(lambda: build_ours(images_path, labels_path, db), repeats)
        subset = min(count, 2000 if args.quick else 5000)
        seed = median_time(lambda: build_seed_way(images[:subset], labels[:subset], work / "seed"), 1) * count / subset
        h5 = median_time(lambda: build_h5py(np.asarray(images), labels, work / "x.h5"), repeats)
        serialized = [encode_array(images[i], int(labels[i])) for i in range(count)]
        limit = median_time(lambda: write_limit(serialized, work / "limit.bin"), repeats)
        rate = f"{count / ours:,.0f} rec/s"
        table.add(
            "build: convert-arrays vs the seed's way",
            f"{ours:.2f} s ({rate})",
            f"{seed:.1f} s (txn per sample; {subset} timed, scaled)",
            seed / ours,
            30,
        )
        table.add("build: convert-arrays vs h5py", f"{ours:.2f} s", f"{h5:.2f} s (h5py write)", h5 / ours, None)
        table.add("build: convert-arrays vs the limit", f"{ours:.2f} s", f"{limit:.2f} s (same bytes, write+fsync)",
                  limit / ours, 0.8)  # fmt: skip

        # -- random single reads
        rng = np.random.default_rng(1)
        picks = rng.integers(0, count, 20_000)
        reader = DatumReader(db)

        def ours_single() -> None:
            for i in picks:
                array, _label = reader[int(i)]
                np.array(array)  # a CHW array the caller owns, like the baselines' copies

        def memmap_single() -> None:
            for i in picks:
                np.array(images[i]), int(labels[i])

        with h5py.File(work / "x.h5", "r") as handle:
            h5_images, h5_labels = handle["X"], handle["y"]

            def h5_single() -> None:
                for i in picks[:2000]:
                    h5_images[int(i)], int(h5_labels[int(i)])

            h5_time = median_time(h5_single, repeats) * len(picks) / 2000
        ours_time = median_time(ours_single, repeats)
        memmap_time = median_time(memmap_single, repeats)
        per = 1e6 / len(picks)
        table.add("random single read vs memmap", f"{ours_time * per:.2f} µs",
                  f"{memmap_time * per:.2f} µs (np.load mmap)", memmap_time / ours_time, 0.9)  # fmt: skip
        table.add("random single read vs h5py", f"{ours_time * per:.2f} µs", f"{h5_time * per:.2f} µs (h5py)",
                  h5_time / ours_time, 3)  # fmt: skip

        # -- random batches of 256
        batches = [rng.integers(0, count, 256) for _ in range(200)]
        out = np.empty((256, 3, 32, 32), np.uint8)

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
        reader.close()

        # -- full verify
        ours_time = median_time(lambda: verify_database(db), repeats)

        def sha256_of_file() -> None:
            with open(db / "data.mdb", "rb") as handle:
                hashlib.file_digest(handle, "sha256")

        sha_time = median_time(sha256_of_file, repeats)
        table.add("full verify (decode + digests) vs sha256 of data.mdb", f"{ours_time:.2f} s", f"{sha_time:.2f} s",
                  sha_time / ours_time, 0.5)  # fmt: skip

        # -- memory of a build from a large .npy
        big_count = 20_000 if args.quick else 700_000  # 700k x 3072 B = 2.15 GB
        big = work / "big"
        big.mkdir()
        big_images, big_labels = make_arrays(big, big_count, (3, 32, 32), seed=2)
        rss = peak_rss_mb([*DATUMDB, "convert-arrays", str(big_images), str(big_labels), str(big / "db")])
        size_gb = big_images.stat().st_size / 1e9
        table.add(f"build memory from a {size_gb:.2f} GB .npy", f"{rss:.0f} MB peak RSS", "—", None, None,
                  note="target < 300 MB")  # fmt: skip
        table.rows[-1]["met"] = rss < 300
        shutil.rmtree(big)

        # -- JPEG workload: 3x256x256, encoded
        jpg_count = 300 if args.quick else 2000
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

        # -- PyTorch DataLoader
        torch_row(table, db, images_path, labels_path, quick=args.quick)

        # -- pipeline scaling
        pipeline_row(table, work, quick=args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"machine": machine(), "count": count, "repeats": repeats, "page_cache": "warm",
            "rows": table.rows, "markdown": table.markdown()}  # fmt: skip


def torch_row(table: Table, db: Path, images_path: Path, labels_path: Path, *, quick: bool) -> None:
    try:
        import torch
        from torch.utils.data import DataLoader, Dataset
    except ImportError:
        table.add("PyTorch DataLoader (2 workers)", "torch not installed", "—", None, None)
        return
    from datumdb.torch_dataset import DatumDataset

    class MemmapDataset(Dataset):
        def __init__(self) -> None:
            self.images = np.load(images_path, mmap_mode="r")
            self.labels = np.load(labels_path)

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            return torch.from_numpy(np.array(self.images[index])), int(self.labels[index])

    def epoch(dataset: Dataset) -> None:
        order = torch.Generator().manual_seed(0)
        loader = DataLoader(dataset, batch_size=256, shuffle=True, num_workers=2, generator=order)
        for _ in loader:
            pass

    ours = median_time(lambda: epoch(DatumDataset(db)), 1 if quick else 3)
    theirs = median_time(lambda: epoch(MemmapDataset()), 1 if quick else 3)
    table.add("PyTorch DataLoader epoch (2 workers, batch 256) vs memmap", f"{ours:.2f} s", f"{theirs:.2f} s",
              theirs / ours, None)  # fmt: skip


def pipeline_row(table: Table, work: Path, *, quick: bool) -> None:
    repo = work / "repo"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split("\0")  # fmt: skip
    for name in filter(None, listed):
        if (ROOT / name).is_file() and not name.startswith("tests/"):
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    params = (repo / "params.yaml").read_text()
    params = params.replace("count: 6000", f"count: {4000 if quick else 20000}")
    params = params.replace("encoding: none", "encoding: png")
    (repo / "params.yaml").write_text(params)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    def build(cores: int) -> None:  # every output removed: each run does all the work
        for folder in ("data", "reports", ".snakemake"):
            shutil.rmtree(repo / folder, ignore_errors=True)
        subprocess.run([str(BIN / "snakemake"), "--cores", str(cores), "--quiet", "all"], cwd=repo, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    one = median_time(lambda: build(1), 1)
    two = median_time(lambda: build(2), 1)
    table.add("pipeline, PNG encoding: snakemake --cores 2 vs --cores 1", f"{two:.1f} s", f"{one:.1f} s",
              one / two, 1.6)  # fmt: skip


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
    args = parser.parse_args(argv)
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    info = results["machine"]
    print(f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, Python {info['python']}, "
          f"LMDB {info['lmdb']}; page cache warm; medians of {results['repeats']} runs; "
          f"N={results['count']}\n")  # fmt: skip
    print(results["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
