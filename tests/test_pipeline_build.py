"""The pipeline steps end to end through ``datumdb.cli.main``: records -> build -> verify, mean, report."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from conftest import read_lmdb_items

from datumdb import DatabaseWriter, DatumReader
from datumdb.cli import main
from datumdb.codec import decode, encode_sample
from datumdb.manifest import read_manifest
from datumdb.pipeline.config import load_config
from datumdb.pipeline.fingerprint import build_fingerprints, input_digest, mean_record, verify_record
from datumdb.pipeline.outputs import stale_records
from datumdb.pipeline.splits import SPLITS, assign_splits
from datumdb.synthetic import generate

pytestmark = pytest.mark.integration

COUNT, SHAPE, CLASSES, SEED = 40, (3, 6, 6), 3, 3
FRACTIONS = (0.6, 0.2, 0.2)  # 24, 8, 8 records


def _params(folder: Path, *, shards: int = 3, encoding: str = "none", sample: int = 5, **extra: Any) -> Path:
    params: dict[str, Any] = {
        "dataset": {"source": "synthetic", "count": COUNT, "shape": list(SHAPE), "classes": CLASSES},
        "seed": SEED,
        "partition": {"shards": list(range(shards))},
        "split": dict(zip(SPLITS, FRACTIONS, strict=True)),
        "encoding": encoding,
        "build": {"batch_size": 7, "map_size": 1 << 20},
        "verify": {"sample": sample},
    }
    for key, value in extra.items():
        params[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _records_then_build(params: Path, out: Path) -> Path:
    shards = load_config(params).partition.count
    for shard in range(shards):
        assert main(["--no-progress", "pipeline", "records", "--params", str(params), "--shard", str(shard),
                     str(out / "records")]) == 0  # fmt: skip
    for split in SPLITS:
        assert main(["--no-progress", "pipeline", "build", "--params", str(params), "--split", split,
                     str(out / "records"), str(out / "lmdb" / split)]) == 0  # fmt: skip
    return out / "lmdb"


def _build_all(params: Path, databases: Path, jobs: int = 1) -> Path:
    argv = ["--no-progress", "pipeline", "build-all", "--params", str(params), str(databases), "--jobs", str(jobs)]
    assert main(argv) == 0
    assert sorted(p.name for p in databases.iterdir()) == sorted(SPLITS)  # the private records folder is gone
    return databases


def _verify_argv(params: Path, lmdb: Path, split: str, out: Path) -> list[str]:
    return [
        "--no-progress", "pipeline", "verify", "--params", str(params), "--split", split, str(lmdb / split),
        "--train-db", str(lmdb / "train"), "--details", str(out / f"{split}.json"),
        "--metrics", str(out / "metrics" / f"{split}.json"), "--histogram", str(out / f"{split}_labels.csv"),
        "--sheet", str(out / f"{split}_samples.png"),
    ]  # fmt: skip


def _same_databases(a: Path, b: Path) -> None:
    for split in SPLITS:
        for name in ("data.mdb", "datumdb.json"):
            assert (a / split / name).read_bytes() == (b / split / name).read_bytes(), f"{split}/{name}"


def _keys(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _keys(item)
    elif isinstance(value, list):
        for item in value:
            yield from _keys(item)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(params, databases) of one build-all, read only: tests that change it work on a copy."""
    root = tmp_path_factory.mktemp("built")
    params = _params(root, sample=100)
    return params, _build_all(params, root / "lmdb")


# ----------------------------------------------------------------------------- build


@pytest.mark.parametrize("jobs", [1, 2])
def test_records_and_build_equal_build_all(tmp_path: Path, jobs: int) -> None:
    params = _params(tmp_path / "p")
    steps = _records_then_build(params, tmp_path / "steps")
    _same_databases(steps, _build_all(params, tmp_path / "all", jobs=jobs))
    for split in SPLITS:
        assert sorted(p.name for p in (steps / split).iterdir()) == ["data.mdb", "datumdb.json"]


def test_the_number_of_shards_does_not_change_the_databases(tmp_path: Path) -> None:
    one = _build_all(_params(tmp_path / "one", shards=1), tmp_path / "one" / "lmdb")
    five = _records_then_build(_params(tmp_path / "five", shards=5), tmp_path / "five")
    _same_databases(one, five)  # data.mdb and the whole manifest
    manifest = read_manifest(one / "train")
    assert not {"shards", "partition", "shard"} & set(_keys(manifest))


@pytest.mark.parametrize("encoding", ["none", "png", "jpg"])
def test_pipeline_databases_equal_what_the_library_writer_makes(tmp_path: Path, encoding: str) -> None:
    lmdb = _build_all(_params(tmp_path / "p", encoding=encoding), tmp_path / "lmdb", jobs=2)
    images, labels = generate(SEED, 0, COUNT, SHAPE, CLASSES)
    assignment = assign_splits(COUNT, SEED, FRACTIONS)
    for number, split in enumerate(SPLITS):
        direct = tmp_path / "direct" / split
        metadata = {"source": "synthetic", "split": split}
        with DatabaseWriter(
            direct, batch_size=7, map_size=1 << 20, encoding=encoding, channel_order="BGR", metadata=metadata
        ) as writer:
            for index in np.flatnonzero(assignment == number):
                writer.add(images[index], int(labels[index]))
        assert (direct / "data.mdb").read_bytes() == (lmdb / split / "data.mdb").read_bytes()
        ours, theirs = read_manifest(lmdb / split), read_manifest(direct)
        assert ours["encoding"] == encoding and ours["count"] == int(np.count_nonzero(assignment == number))
        assert ours["metadata"].pop("pipeline")["split"] == split
        ours.pop("checksum"), theirs.pop("checksum")  # a checksum over the rest, metadata included
        assert ours == theirs


def test_a_record_file_made_with_other_params_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = _params(tmp_path / "old", shards=2)
    new = _params(tmp_path / "new", shards=2, seed=SEED + 1)
    for shard in ("0", "1"):
        assert main(["pipeline", "records", "--params", str(old), "--shard", shard, str(tmp_path / "rec")]) == 0
    capsys.readouterr()
    db = tmp_path / "lmdb" / "val"
    assert main(["pipeline", "build", "--params", str(new), "--split", "val", str(tmp_path / "rec"), str(db)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "rec" / "0" / "val.rec") in err and "stale intermediate" in err
    assert not db.exists()
    # A record file of another split under the right name is refused too.
    shutil.copy(tmp_path / "rec" / "1" / "train.rec", tmp_path / "rec" / "1" / "val.rec")
    assert main(["pipeline", "build", "--params", str(old), "--split", "val", str(tmp_path / "rec"), str(db)]) == 2
    assert str(tmp_path / "rec" / "1" / "val.rec") in capsys.readouterr().err
    assert not db.exists()


def test_stale_records_lists_the_shards_whose_record_files_a_build_refuses(tmp_path: Path) -> None:
    """The Snakefile reruns these shards' records jobs (a killed run leaves temp() files behind)."""
    old, rec = _params(tmp_path / "old", shards=2), tmp_path / "rec"
    assert stale_records(load_config(old), rec) == {}  # nothing made yet: nothing stale
    for shard in ("0", "1"):
        assert main(["--no-progress", "pipeline", "records", "--params", str(old), "--shard", shard, str(rec)]) == 0
    assert stale_records(load_config(old), rec) == {}
    for changed in (_params(tmp_path / "seed", shards=2, seed=SEED + 1), _params(tmp_path / "more", shards=3)):
        found = stale_records(load_config(changed), rec)
        assert set(found) == {0, 1} and "made with other params" in found[0]
        db = tmp_path / "refused" / "val"  # and the build agrees: it refuses them
        assert main(["pipeline", "build", "--params", str(changed), "--split", "val", str(rec), str(db)]) == 2
    assert main(["pipeline", "build", "--params", str(old), "--split", "val", str(rec), str(tmp_path / "db")]) == 0
    shutil.copy(rec / "1" / "train.rec", rec / "1" / "val.rec")  # another split's file under the name
    assert set(stale_records(load_config(old), rec)) == {1}
    (rec / "0" / "test.rec").write_bytes((rec / "0" / "test.rec").read_bytes()[:-3])  # cut short
    found = stale_records(load_config(old), rec)
    assert set(found) == {0, 1} and "truncated" in found[0]


def test_a_missing_record_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = _params(tmp_path, shards=2)
    assert main(["pipeline", "records", "--params", str(params), "--shard", "0", str(tmp_path / "rec")]) == 0
    db = tmp_path / "lmdb" / "test"
    assert main(["pipeline", "build", "--params", str(params), "--split", "test", str(tmp_path / "rec"), str(db)]) == 2
    assert re.search(r"rec/1/test\.rec: record file not found", capsys.readouterr().err)
    assert not db.exists()


@pytest.mark.parametrize("step", ["build", "build-all"])
def test_build_replaces_its_own_database_but_never_one_it_did_not_write(
    tmp_path: Path, caffe_dir: Path, step: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pipeline build` replaced a Caffe-made LMDB at its output without being asked. It replaces
    a database datumdb wrote (its previous build: the orchestrators rebuild without --overwrite)
    and refuses any other in one line, leaving it byte for byte."""
    params = _params(tmp_path / "p", shards=1)
    lmdb, records = tmp_path / "lmdb", str(tmp_path / "rec")
    assert main(["--no-progress", "pipeline", "records", "--params", str(params), "--shard", "0", records]) == 0
    build = {
        "build": ["pipeline", "build", "--params", str(params), "--split", "val", records, str(lmdb / "val")],
        "build-all": ["pipeline", "build-all", "--params", str(params), str(lmdb)],
    }[step]
    assert main(["--no-progress", *build]) == 0
    first = (lmdb / "val" / "data.mdb").stat()
    assert main(["--no-progress", *build]) == 0  # its own previous build: replaced
    assert (lmdb / "val" / "data.mdb").stat().st_ino != first.st_ino
    for name in ("data.mdb", "datumdb.json"):  # Snakemake removes the declared outputs before a rerun
        (lmdb / "val" / name).unlink()
    (lmdb / "val" / "lock.mdb").write_bytes(bytes(8192))  # left by a reader that took LMDB's lock
    assert main(["--no-progress", *build]) == 0  # no data there: nothing to lose
    assert read_manifest(lmdb / "val")["count"] == 8
    shutil.rmtree(lmdb / "val")
    shutil.copytree(caffe_dir / "lmdb_png", lmdb / "val")  # Caffe's: data.mdb, no manifest
    (lmdb / "val" / "lock.mdb").write_bytes(bytes(8192))  # as a Caffe or LMDB reader leaves it
    before = {p.name: p.read_bytes() for p in (lmdb / "val").iterdir()}
    train = (lmdb / "train" / "data.mdb").stat().st_ino if step == "build-all" else None
    capsys.readouterr()
    assert main(["--no-progress", *build]) == 2
    if train is not None:  # refused before any work: the other splits were not rebuilt either
        assert (lmdb / "train" / "data.mdb").stat().st_ino == train
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{lmdb / 'val'}: holds a database datumdb did not write" in err, err
    assert {p.name: p.read_bytes() for p in (lmdb / "val").iterdir()} == before
    assert [p.name for p in lmdb.iterdir() if p.name.startswith(".")] == []  # no build folder left
    (lmdb / "val" / "datumdb.json").write_text("{}")  # a manifest datumdb did not write either
    assert main(["--no-progress", *build]) == 2
    assert {p.name: p.read_bytes() for p in (lmdb / "val").iterdir() if p.name != "datumdb.json"} == before


# ----------------------------------------------------------------------------- verify


@pytest.mark.parametrize("encoding", ["none", "png", "jpg"])
def test_verify_passes_and_writes_its_four_outputs(tmp_path: Path, encoding: str) -> None:
    params = _params(tmp_path / "p", encoding=encoding, sample=6)
    lmdb = _build_all(params, tmp_path / "lmdb")
    out = tmp_path / "reports"
    config = load_config(params)
    for split in SPLITS:
        assert main(_verify_argv(params, lmdb, split, out)) == 0
        details = json.loads((out / f"{split}.json").read_text())
        assert details["ok"] and details["encoding"] == encoding and details["sampled"] == 6
        builds = build_fingerprints(config, input_digest(config))
        assert details["pipeline"]["fingerprint"] == verify_record(config, split, builds)["fingerprint"]
        assert details["ncm_accuracy"] > 0.8 > details["chance_accuracy"] == round(1 / CLASSES, 6)
        metrics = json.loads((out / "metrics" / f"{split}.json").read_text())
        assert set(metrics) == {"count", "ncm_accuracy", "chance_accuracy", "digest"}
        assert metrics["count"] == details["count"] == read_manifest(lmdb / split)["count"]
        assert re.fullmatch(r"[0-9a-f]{12}", metrics["digest"])
        assert details["digest"] == "sha256:" + metrics["digest"] + details["digest"][19:]
        assert (metrics["ncm_accuracy"], metrics["chance_accuracy"]) == (
            details["ncm_accuracy"],
            details["chance_accuracy"],
        )
        histogram = (out / f"{split}_labels.csv").read_text().splitlines()
        assert histogram[0] == "label,count"
        assert {k: int(v) for k, v in (line.split(",") for line in histogram[1:])} == details["label_histogram"]
        sheet = cv2.imread(str(out / f"{split}_samples.png"))
        assert sheet is not None and sheet.ndim == 3 and sheet.std() > 10
    assert json.loads((out / "val.json").read_text())["count"] == 8


def _rewrite(db: Path, change: Any) -> None:
    """Write ``db`` again, every record through ``change(key, value) -> value``: a self-consistent manifest."""
    items = read_lmdb_items(db)
    manifest = read_manifest(db)
    with DatabaseWriter(
        db,
        overwrite=True,
        batch_size=7,
        map_size=1 << 20,
        channel_order=manifest["channel_order"],
        metadata=manifest["metadata"],
    ) as writer:
        for key, value in items:
            writer.add_serialized(change(key, value), key)


def _outputs(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file()) if out.exists() else []


def test_verify_fails_and_writes_nothing_on_a_wrong_label(
    tmp_path: Path, built: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    params, lmdb = built
    copy = shutil.copytree(lmdb, tmp_path / "lmdb")
    victim = read_lmdb_items(copy / "val")[2][0]

    def relabel(key: bytes, value: bytes) -> bytes:
        if key != victim:
            return value
        datum = decode(value, key)
        return encode_sample(np.frombuffer(datum.data, np.uint8).reshape(SHAPE), (datum.label + 1) % CLASSES, "none")

    _rewrite(copy / "val", relabel)
    assert main(["verify", "--in-process", str(copy / "val")]) == 0  # self-consistent: only the source can tell
    capsys.readouterr()
    out = tmp_path / "reports"
    assert main(_verify_argv(params, copy, "val", out)) == 1
    err = capsys.readouterr().err
    assert f"record {victim.decode()} has label" in err and "no report written" in err
    assert _outputs(out) == []


def test_verify_fails_and_writes_nothing_on_a_damaged_record(
    tmp_path: Path, built: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    params, lmdb = built
    copy = shutil.copytree(lmdb, tmp_path / "lmdb")
    data = copy / "val" / "data.mdb"
    raw = bytearray(data.read_bytes())
    with DatumReader(copy / "val") as reader:
        value = reader.value(reader.key(3))
    position = raw.find(value)
    assert position >= 0
    raw[position + len(value) // 2] ^= 0xFF  # one pixel of one record
    data.write_bytes(bytes(raw))
    out = tmp_path / "reports"
    assert main(_verify_argv(params, copy, "val", out)) == 1
    assert "FAILED" in capsys.readouterr().err
    assert _outputs(out) == []


def test_verify_fails_on_a_database_of_another_split(tmp_path: Path, built: tuple[Path, Path]) -> None:
    params, lmdb = built
    out = tmp_path / "reports"
    argv = _verify_argv(params, lmdb, "val", out)
    argv[argv.index(str(lmdb / "val"))] = str(lmdb / "test")
    assert main(argv) == 1
    assert _outputs(out) == []


# ----------------------------------------------------------------------------- mean and report


def test_pipeline_mean_equals_compute_mean(tmp_path: Path, built: tuple[Path, Path]) -> None:
    params, lmdb = built
    a, b = tmp_path / "pipeline", tmp_path / "cli"
    argv = ["--no-progress", "pipeline", "mean", "--params", str(params), str(lmdb / "train")]
    argv += ["--binaryproto", str(a / "m.binaryproto"), "--npy", str(a / "m.npy"), "--json", str(a / "m.json")]
    assert main(argv) == 0
    argv = ["--no-progress", "compute-mean", str(lmdb / "train"), str(b / "m.binaryproto")]
    assert main([*argv, "--npy", str(b / "m.npy"), "--json", str(b / "m.json")]) == 0
    assert (a / "m.binaryproto").read_bytes() == (b / "m.binaryproto").read_bytes()
    assert (a / "m.npy").read_bytes() == (b / "m.npy").read_bytes()
    ours, theirs = json.loads((a / "m.json").read_text()), json.loads((b / "m.json").read_text())
    config = load_config(params)
    train = build_fingerprints(config, input_digest(config))["train"]
    assert ours.pop("pipeline")["fingerprint"] == mean_record(train)["fingerprint"]
    assert ours == theirs and ours["shape"] == list(SHAPE)


def test_report_exit_code_follows_the_verify_reports(
    tmp_path: Path, built: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    params, lmdb = built
    out = tmp_path / "reports"
    for split in SPLITS:
        assert main(_verify_argv(params, lmdb, split, out)) == 0
    mean = tmp_path / "mean"
    argv = ["pipeline", "mean", "--params", str(params), str(lmdb / "train"), "--binaryproto", str(mean / "m.bp")]
    assert main([*argv, "--npy", str(mean / "m.npy"), "--json", str(mean / "m.json")]) == 0
    details = [str(out / f"{split}.json") for split in SPLITS]
    report = ["pipeline", "report", "--params", str(params), *details, "--mean", str(mean / "m.json")]
    capsys.readouterr()
    assert main([*report, "--output", str(out / "summary.md")]) == 0
    text = (out / "summary.md").read_text()
    assert capsys.readouterr().out == text
    assert "| val | 8 | 3x6x6 | none |" in text and "| train | 24 |" in text and "| NO |" not in text
    val = json.loads((out / "val.json").read_text())
    (out / "val.json").write_text(json.dumps({**val, "ok": False}))
    assert main([*report, "--output", str(out / "summary2.md")]) == 1
    assert "| val | 8 | 3x6x6 | none |" in (out / "summary2.md").read_text()
    assert "| NO |" in (out / "summary2.md").read_text()
    (out / "test.json").unlink()
    assert main([*report, "--output", str(out / "summary3.md")]) == 2
    assert "test.json: not found" in capsys.readouterr().err


def _with(argv: list[str], option: str, value: Path) -> list[str]:
    """``argv`` with ``option``'s value replaced by ``value``."""
    at = argv.index(option) + 1
    return [*argv[:at], str(value), *argv[at + 1 :]]


def test_pipeline_steps_refuse_outputs_that_collide_or_lie_in_their_inputs(
    tmp_path: Path, built: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The file outputs of mean, verify and report: one name twice, or one inside an input
    database (or over an input report), is one line and exit 2 before any work."""
    params, lmdb = built
    before = {p: p.read_bytes() for p in lmdb.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    for split in SPLITS:
        assert main(_verify_argv(params, lmdb, split, out)) == 0
    mean = ["pipeline", "mean", "--params", str(params), str(lmdb / "train"), "--binaryproto", str(out / "m.bp")]
    mean += ["--npy", str(out / "m.npy"), "--json", str(out / "m.json")]
    assert main(mean) == 0
    reports = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    details = [str(out / f"{split}.json") for split in SPLITS]
    report = ["pipeline", "report", "--params", str(params), *details, "--mean", str(out / "m.json")]
    verify = _verify_argv(params, lmdb, "val", out)
    cases = [
        ("named twice", _with(mean, "--json", out / "m.npy")),
        ("lies inside the input", _with(mean, "--binaryproto", lmdb / "train" / "data.mdb")),
        ("is the input", [*report, "--output", str(out / "val.json")]),
        ("named twice", _with(verify, "--metrics", out / "val.json")),
        ("lies inside the input", _with(verify, "--sheet", lmdb / "train" / "sheet.png")),
    ]
    for message, argv in cases:
        capsys.readouterr()
        assert main(["--no-progress", *argv]) == 2, message
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert {p: p.read_bytes() for p in lmdb.rglob("*") if p.is_file()} == before
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == reports


# ----------------------------------------------------------------------------- float arrays


def test_float_arrays_become_float_datums_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 40)
    images = (labels[:, None, None, None] * 3.0 + rng.normal(0, 0.5, (40, 2, 3, 3))).astype(np.float32)
    inputs = tmp_path / "in"
    inputs.mkdir()
    np.save(inputs / "X.npy", images)
    np.save(inputs / "y.npy", labels)
    dataset = {"source": "arrays", "input_dir": str(inputs)}
    params = _params(tmp_path / "p", shards=2, dataset=dataset)
    lmdb = _build_all(params, tmp_path / "lmdb", jobs=2)
    assignment = assign_splits(40, SEED, FRACTIONS)
    with DatumReader(lmdb / "val") as reader:
        for (key, datum), index in zip(reader.datums(), np.flatnonzero(assignment == 1), strict=True):
            assert datum.data == b"" and datum.label == labels[index]
            assert np.array_equal(np.asarray(datum.float_data, np.float32).reshape(2, 3, 3), images[index]), key
    assert read_manifest(lmdb / "val")["dtype"] == "float32"
    out = tmp_path / "reports"
    assert main(_verify_argv(params, lmdb, "val", out)) == 0
    details = json.loads((out / "val.json").read_text())
    assert (details["dtype"], details["shape"], details["count"]) == ("float32", [2, 3, 3], 8)
    assert details["ncm_accuracy"] > 0.9
    capsys.readouterr()
    png = _params(tmp_path / "png", shards=2, dataset=dataset, encoding="png")
    assert main(["pipeline", "build-all", "--params", str(png), str(tmp_path / "png" / "lmdb"), "--jobs", "1"]) == 2
    assert "needs uint8 images" in capsys.readouterr().err
    assert not any((tmp_path / "png" / "lmdb" / split).exists() for split in SPLITS)


def test_build_all_removes_only_the_record_folders_of_dead_builds_of_this_host(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    host = socket.gethostname().split(".")[0].replace("-", "_") or "host"
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)  # a process that has ended
    lmdb = tmp_path / "lmdb"
    folders = {
        "dead": lmdb / f".records-{host}-{dead}-abc",
        "alive": lmdb / f".records-{host}-{os.getpid()}-abc",
        "other host": lmdb / f".records-elsewhere-{dead}-abc",
        "foreign file": lmdb / f".records-{host}-{dead}-def",
    }
    for folder in folders.values():
        (folder / "0").mkdir(parents=True)
        (folder / "0" / "train.rec").write_bytes(b"records")
    (folders["foreign file"] / "notes.txt").write_text("not datumdb's")
    params = _params(tmp_path / "p")
    assert main(["--no-progress", "pipeline", "build-all", "--params", str(params), str(lmdb), "--jobs", "1"]) == 0
    assert {name for name, folder in folders.items() if folder.exists()} == {"alive", "other host", "foreign file"}
    assert sorted(p.name for p in lmdb.iterdir() if p.name.startswith(".records-")) == sorted(
        folders[name].name for name in ("alive", "other host", "foreign file")
    )
