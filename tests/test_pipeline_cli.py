"""The pipeline's CLI steps end to end (generate -> serialize -> build -> verify -> report)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from datumdb import DatabaseWriter, DatumReader
from datumdb.cli import main
from datumdb.manifest import read_manifest
from datumdb.shards import SPLITS, assign_splits
from datumdb.synthetic import generate

COUNT, SHAPE, CLASSES, SEED = 90, (3, 8, 8), 3, 4
FRACTIONS = ("--train", "0.6", "--val", "0.2", "--test", "0.2")


def _build(root: Path, shards: int, encoding: str = "none") -> Path:
    ids = [str(i) for i in range(shards)]
    for shard in ids:
        argv = ["--no-progress", "generate-shard", "--source", "synthetic", "--count", str(COUNT), "--shape"]
        argv += [*map(str, SHAPE), "--classes", str(CLASSES), "--seed", str(SEED), "--shards", *ids]
        assert main([*argv, "--shard", shard, str(root / "shards" / shard)]) == 0
        argv = ["serialize-shard", str(root / "shards" / shard), str(root / "records" / shard), "--seed", str(SEED)]
        assert main([*argv, *FRACTIONS, "--encoding", encoding]) == 0
    for split in SPLITS:
        argv = ["build-split", str(root / "records"), str(root / "lmdb" / split), "--split", split, "--shards", *ids]
        assert main([*argv, "--batch-size", "7", "--map-size", "1048576"]) == 0
    return root


def _verify(root: Path, split: str, out: Path, shards: int = 2) -> int:
    argv = ["verify-split", str(root / "lmdb" / split), "--split", split, "--shard-dir", str(root / "shards")]
    argv += ["--shards", *map(str, range(shards)), "--train-db", str(root / "lmdb" / "train"), "--seed", str(SEED)]
    argv += [*FRACTIONS, "--sample", "10", "--metrics", str(out / f"{split}.json")]
    argv += ["--histogram", str(out / f"{split}.csv"), "--contact-sheet", str(out / f"{split}.png")]
    return main(argv)


def test_pipeline_splits_equal_what_the_library_writer_makes(tmp_path: Path) -> None:
    root = _build(tmp_path / "p", shards=3)
    images, labels = generate(SEED, 0, COUNT, SHAPE, CLASSES)
    assignment = assign_splits(COUNT, SEED, (0.6, 0.2, 0.2))
    for number, split in enumerate(SPLITS):
        manifest = read_manifest(root / "lmdb" / split)
        direct = tmp_path / "direct" / split
        with DatabaseWriter(
            direct, batch_size=7, map_size=1048576, channel_order="BGR", metadata=manifest["metadata"]
        ) as writer:
            for index in np.flatnonzero(assignment == number):
                writer.add(images[index], int(labels[index]))
        assert (direct / "data.mdb").read_bytes() == (root / "lmdb" / split / "data.mdb").read_bytes()
        assert (direct / "datumdb.json").read_bytes() == (root / "lmdb" / split / "datumdb.json").read_bytes()
        assert sorted(p.name for p in (root / "lmdb" / split).iterdir()) == ["data.mdb", "datumdb.json"]


def test_the_number_of_shards_does_not_change_the_databases(tmp_path: Path) -> None:
    two = _build(tmp_path / "two", shards=2)
    five = _build(tmp_path / "five", shards=5)
    for split in SPLITS:
        assert (two / "lmdb" / split / "data.mdb").read_bytes() == (five / "lmdb" / split / "data.mdb").read_bytes()


@pytest.mark.parametrize("encoding", ["none", "png", "jpg"])
def test_verify_split_passes_and_writes_its_reports(tmp_path: Path, encoding: str) -> None:
    root = _build(tmp_path / "p", shards=2, encoding=encoding)
    out = tmp_path / "reports"
    for split in SPLITS:
        assert _verify(root, split, out) == 0
    metrics = json.loads((out / "val.json").read_text())
    assert metrics["ok"] and metrics["count"] == 18 and metrics["sampled"] == 10 and metrics["encoding"] == encoding
    assert metrics["ncm_accuracy"] > 0.8 > metrics["chance_accuracy"]
    histogram = (out / "val.csv").read_text().splitlines()
    assert histogram[0] == "label,count" and sum(int(line.split(",")[1]) for line in histogram[1:]) == 18
    sheet = cv2.imread(str(out / "val.png"))
    assert sheet is not None and sheet.shape[2] == 3 and sheet.std() > 10
    assert main(["report", *(str(out / f"{s}.json") for s in SPLITS), "--mean", str(_mean(root, tmp_path)),
                 "--output", str(out / "summary.md")]) == 0  # fmt: skip
    assert "| val | 18 | 3x8x8 |" in (out / "summary.md").read_text()


def _mean(root: Path, tmp_path: Path) -> Path:
    out = tmp_path / "mean" / "mean.json"
    argv = ["compute-mean", str(root / "lmdb" / "train"), str(tmp_path / "mean" / "m.binaryproto")]
    assert main([*argv, "--npy", str(tmp_path / "mean" / "m.npy"), "--json", str(out)]) == 0
    return out


def test_verify_split_fails_on_a_label_that_does_not_match_the_raw_data(tmp_path: Path) -> None:
    root = _build(tmp_path / "p", shards=2)
    labels_path = root / "shards" / "1" / "labels.npy"
    labels = np.load(labels_path)
    labels[:] = (labels + 1) % CLASSES  # the database now disagrees with its source
    np.save(labels_path, labels)
    out = tmp_path / "reports"
    assert _verify(root, "train", out) == 1
    assert not out.exists()  # nothing written on failure


def test_verify_split_fails_on_a_damaged_database(tmp_path: Path) -> None:
    root = _build(tmp_path / "p", shards=2)
    data = root / "lmdb" / "val" / "data.mdb"
    raw = bytearray(data.read_bytes())
    with DatumReader(root / "lmdb" / "val") as reader:
        value = reader.value(reader.key(3))
    position = raw.find(value)
    raw[position + len(value) // 2] ^= 0xFF  # one pixel of one record
    data.write_bytes(bytes(raw))
    assert _verify(root, "val", tmp_path / "reports") == 1


def test_bad_inputs_exit_2_and_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate-shard", "--source", "arrays", "--input_dir", str(tmp_path / "in"), "--shards", "0", "--shard"]
    assert main([*argv, "0", str(tmp_path / "shard")]) == 2
    assert "X.npy: images file not found" in capsys.readouterr().err
    assert main(["generate-shard", "--shards", "0", "2", "--shard", "0", "--count", "5", str(tmp_path / "s")]) == 2
    assert "0, 1, ..., n-1" in capsys.readouterr().err
    root = _build(tmp_path / "p", shards=1)
    argv = ["serialize-shard", str(root / "shards" / "0"), str(tmp_path / "rec"), "--train", "0.7", "--val", "0.2"]
    assert main([*argv, "--test", "0.2"]) == 2
    assert "must sum to 1" in capsys.readouterr().err
    assert not (tmp_path / "shard").exists() and not (tmp_path / "s").exists() and not (tmp_path / "rec").exists()


def test_float_arrays_become_float_datums_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 40)
    images = (labels[:, None, None, None] * 3.0 + rng.normal(0, 0.5, (40, 2, 3, 3))).astype(np.float64)
    inputs = tmp_path / "in"
    inputs.mkdir()
    np.save(inputs / "X.npy", images)
    np.save(inputs / "y.npy", labels)
    root = tmp_path / "p"
    argv = ["generate-shard", "--source", "arrays", "--input_dir", str(inputs), "--shards", "0", "--shard", "0"]
    assert main([*argv, str(root / "shards" / "0")]) == 0
    assert main(["serialize-shard", str(root / "shards" / "0"), str(root / "records" / "0"), *FRACTIONS]) == 0
    for split in SPLITS:
        assert (
            main(["build-split", str(root / "records"), str(root / "lmdb" / split), "--split", split, "--shards", "0"])
            == 0
        )
    argv = ["verify-split", str(root / "lmdb" / "val"), "--split", "val", "--shard-dir", str(root / "shards")]
    argv += ["--shards", "0", "--train-db", str(root / "lmdb" / "train"), "--seed", "0", *FRACTIONS, "--sample", "8"]
    out = tmp_path / "r"
    argv += ["--metrics", str(out / "m.json"), "--histogram", str(out / "h.csv"), "--contact-sheet", str(out / "s.png")]
    assert main(argv) == 0
    metrics = json.loads((out / "m.json").read_text())
    assert (metrics["dtype"], metrics["shape"], metrics["count"]) == ("float32", [2, 3, 3], 8)
    assert metrics["ncm_accuracy"] > 0.9
    images[5, 0, 1, 1] = np.nan
    np.save(inputs / "X.npy", images)
    argv = ["generate-shard", "--source", "arrays", "--input_dir", str(inputs), "--shards", "0", "--shard", "0"]
    assert main([*argv, str(tmp_path / "bad")]) == 2
    assert "image 5 contains NaN" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
