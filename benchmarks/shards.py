"""Shard sets: assembling one Caffe database from a split's shards, against copying the same bytes.

The assembly copies every stored value into one new LMDB in the seeded shuffled order (nothing is
decoded). Its baseline is the plainest copy of the same values: read each one from its shard's
map in key order and write it to one file, then fsync, in the same process and page-cache state.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from benchmarks.common import median_time
from datumdb.codec import encode_sample
from datumdb.manifest import DATA_NAME
from datumdb.shardset import array_identities, assemble, plan_shards, write_shard, write_shard_index


def make_shard_set(folder: Path, count: int, shape: tuple[int, int, int], mean: int) -> list[Path]:
    """A train shard set of ``count`` random raw images; its shard folders."""
    plan = plan_shards(array_identities(count), 0, (0.98, 0.01, 0.01), mean)
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for shard in plan.shards["train"]:
        records = (
            (
                b"",
                encode_sample(rng.integers(0, 256, shape, dtype=np.uint8), m % 10, "none"),
                None,
                plan.order_hashes[m],
            )
            for m in shard.members.tolist()
        )
        write_shard(folder / shard.name, records, metadata={})
    write_shard_index(folder, "train", 0, [shard.name for shard in plan.shards["train"]])
    return [folder / shard.name for shard in plan.shards["train"]]


def copy_values(shards: list[Path], target: Path) -> None:
    with open(target, "wb") as out:
        for shard in shards:
            env = lmdb.open(os.fspath(shard), readonly=True, lock=False)
            with env.begin(buffers=True) as txn:
                for _, value in txn.cursor():
                    out.write(value)
            env.close()
        out.flush()
        os.fsync(out.fileno())


def measure(work: Path, repeats: int, *, quick: bool) -> dict[str, Any]:
    count = 2_000 if quick else 8_000
    shards = make_shard_set(work / "train", count, (3, 160, 160), 256)
    db = work / "assembled"

    def ours() -> None:
        shutil.rmtree(db, ignore_errors=True)
        assemble(work / "train", db)

    copy_s = median_time(lambda: copy_values(shards, work / "copy.bin"), repeats)
    ours_s = median_time(ours, repeats)
    size = sum((shard / DATA_NAME).stat().st_size for shard in shards)
    return {"records": count, "shard_bytes": size, "ours_s": ours_s, "copy_s": copy_s}
