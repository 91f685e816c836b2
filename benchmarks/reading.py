"""Reading benchmarks: single random reads and DataLoader epochs, each against memmap baselines.

Functions to wire into :mod:`benchmarks.__main__`; each returns medians (seconds) and the ratios
``baseline / ours`` (above 1: we are faster). Run alone for a quick look::

    python -m benchmarks.reading DB X.npy y.npy [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datumdb import DatumReader


def _medians(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median time of each function, the runs interleaved so that drifting load hits all alike."""
    for function in functions.values():
        function()  # warm-up: page cache, the maps' page tables, lazy state (the offset index)
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def single_reads(db: Path, images_npy: Path, picks: Sequence[int], repeats: int) -> dict[str, Any]:
    """Random single reads, each giving an array the caller owns (one copy), and its label.

    ours: ``reader[i]`` then ``np.array``; memmap: ``np.array(np.load(X, mmap_mode="r")[i])``;
    ndarray: the same through ``np.asarray`` of that memmap (a plain view of the map, without
    np.memmap's Python-level ``__getitem__``): the floor for a Python-level read.
    """
    picks = [int(i) for i in picks]
    images = np.load(images_npy, mmap_mode="r")
    plain = np.asarray(images)
    with DatumReader(db) as reader:
        reader.build_index()  # what a few epochs of single reads would do by themselves

        def ours() -> None:
            for i in picks:
                array, _label = reader[i]
                np.array(array)

        def memmap() -> None:
            for i in picks:
                np.array(images[i])

        def ndarray() -> None:
            for i in picks:
                np.array(plain[i])

        times = _medians({"ours": ours, "memmap": memmap, "ndarray": ndarray}, repeats)
    per_read = {f"{name}_us": value / len(picks) * 1e6 for name, value in times.items()}
    return {**per_read, "vs_memmap": times["memmap"] / times["ours"], "vs_ndarray": times["ndarray"] / times["ours"],
            "reads": len(picks), "repeats": repeats}  # fmt: skip


def dataloader_epochs(db: Path, images_npy: Path, labels_npy: Path, repeats: int, quick: bool) -> dict[str, Any]:
    """Shuffled epochs (batch 256) of DatumDataset vs a memmap Dataset and a plain-ndarray one.

    For 0 workers, and 2 workers persistent and not (``fork``, the Linux default: a new pair of
    workers each epoch unless persistent). Each figure is the median epoch time; a new
    DataLoader is made per epoch, as a training loop would, but a persistent one is reused.
    ``quick`` only runs fewer repeats.
    """
    import torch
    from torch.utils.data import DataLoader, Dataset

    from datumdb.torch_dataset import DatumDataset

    class MemmapDataset(Dataset):
        def __init__(self, plain: bool) -> None:
            images = np.load(images_npy, mmap_mode="r")
            self.images = np.asarray(images) if plain else images
            self.labels = np.load(labels_npy)

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            return torch.from_numpy(np.array(self.images[index])), int(self.labels[index])

    datasets = {"ours": DatumDataset(db), "memmap": MemmapDataset(False), "ndarray": MemmapDataset(True)}
    repeats = 1 if quick else repeats
    results: dict[str, Any] = {}

    def epoch(dataset: Dataset, workers: int, persistent: bool) -> Callable[[], None]:
        def make() -> DataLoader:
            return DataLoader(dataset, batch_size=256, shuffle=True, num_workers=workers,
                              persistent_workers=persistent, generator=torch.Generator().manual_seed(0))  # fmt: skip

        kept = make() if persistent else None  # a persistent loader keeps its workers across epochs

        def run() -> None:
            for _ in kept if kept is not None else make():
                pass

        return run

    for workers, persistent in ((0, False), (2, False), (2, True)):
        times = _medians({name: epoch(dataset, workers, persistent) for name, dataset in datasets.items()}, repeats)
        label = f"workers{workers}" + ("_persistent" if persistent else "")
        results[label] = {**{f"{name}_s": value for name, value in times.items()},
                          "vs_memmap": times["memmap"] / times["ours"],
                          "vs_ndarray": times["ndarray"] / times["ours"]}  # fmt: skip
    results["repeats"] = repeats
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reading", description=__doc__.splitlines()[0])
    parser.add_argument("db", type=Path)
    parser.add_argument("images", type=Path)
    parser.add_argument("labels", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    count = len(np.load(args.labels, mmap_mode="r"))
    picks = np.random.default_rng(1).integers(0, count, 20_000).tolist()
    results = {
        "single_reads": single_reads(args.db, args.images, picks, args.repeats),
        "dataloader_epochs": dataloader_epochs(args.db, args.images, args.labels, args.repeats, args.quick),
    }
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
