"""The pipeline steps end to end through ``datumdb.cli.main``: plan -> shards -> assemble -> verify, mean, report."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from conftest import live_processes_in_group, read_lmdb_items, wait_until

from datumdb import DatabaseWriter, DatumReader
from datumdb.cli import main
from datumdb.codec import decode, encode_sample
from datumdb.errors import DatumDBError, InputError
from datumdb.manifest import read_manifest
from datumdb.pipeline.config import load_config
from datumdb.pipeline.fingerprint import mean_record, verify_record
from datumdb.pipeline.plan import deal_parts, make_plan, read_part, read_plan, write_plan
from datumdb.pipeline.splits import SPLITS
from datumdb.shardset import read_shard_index
from datumdb.synthetic import generate

pytestmark = pytest.mark.integration

COUNT, SHAPE, CLASSES, SEED = 60, (3, 6, 6), 3, 3
FRACTIONS = (0.6, 0.2, 0.2)


def _params(folder: Path, *, parts: int = 3, encoding: str = "none", sample: int = 5, **extra: Any) -> Path:
    params: dict[str, Any] = {
        "dataset": {"source": "synthetic", "count": COUNT, "shape": list(SHAPE), "classes": CLASSES},
        "seed": SEED,
        "partition": {"shards": list(range(parts))},
        "split": dict(zip(SPLITS, FRACTIONS, strict=True)),
        "encoding": encoding,
        "build": {"batch_size": 7, "map_size": 1 << 20, "shard_size": 4},
        "verify": {"sample": sample},
    }
    for key, value in extra.items():
        params[key] = {**params[key], **value} if isinstance(params.get(key), dict) else value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _shards(params: Path, root: Path, jobs: int = 1) -> Path:
    """The DVC way: every part in one command, each split indexed."""
    assert main(["--no-progress", "pipeline", "shards", "--params", str(params), str(root / "shards"),
                 "--jobs", str(jobs)]) == 0  # fmt: skip
    return root / "shards"


def _by_parts(params: Path, root: Path) -> Path:
    """The Snakemake way: a plan written to files, one command per part, then one per split."""
    config = load_config(params)
    plan = make_plan(config, {})
    write_plan(plan, root / "plan")
    for part in range(config.partition.count):
        assert main(["--no-progress", "pipeline", "shards", "--params", str(params), "--part",
                     str(root / "plan" / f"part-{part}.json"), str(root / "shards")]) == 0  # fmt: skip
    for split in SPLITS:
        assert main(["--no-progress", "pipeline", "index", "--params", str(params), "--split", split, "--split-plan",
                     str(root / "plan" / f"{split}.json"), str(root / "shards" / split)]) == 0  # fmt: skip
        assert main(["--no-progress", "pipeline", "assemble", "--params", str(params), "--split", split,
                     str(root / "shards" / split), str(root / "lmdb" / split)]) == 0  # fmt: skip
    return root / "shards"


def _assemble(params: Path, root: Path) -> Path:
    for split in SPLITS:
        assert main(["--no-progress", "pipeline", "assemble", "--params", str(params), "--split", split,
                     str(root / "shards" / split), str(root / "lmdb" / split)]) == 0  # fmt: skip
    return root / "lmdb"


def _verify_argv(params: Path, shards: Path, split: str, out: Path) -> list[str]:
    return [
        "--no-progress", "pipeline", "verify", "--params", str(params), "--split", split, str(shards / split),
        "--train-db", str(shards / "train"), "--details", str(out / f"{split}.json"),
        "--metrics", str(out / "metrics" / f"{split}.json"), "--histogram", str(out / f"{split}_labels.csv"),
        "--sheet", str(out / f"{split}_samples.png"),
    ]  # fmt: skip


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _inodes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_ino for p in folder.rglob("data.mdb")}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(params, root with shards/ and lmdb/) of one build, read only: tests that change it copy it."""
    root = tmp_path_factory.mktemp("built")
    params = _params(root, sample=100)
    _shards(params, root)
    _assemble(params, root)
    return params, root


# ----------------------------------------------------------------------------- shards and assembly


@pytest.mark.parametrize("jobs", [1, 2])
def test_parts_then_assemble_equal_the_one_command_build(tmp_path: Path, jobs: int) -> None:
    """Snakemake's jobs (a part each, then a split each) and DVC's one stage write the same bytes."""
    params = _params(tmp_path / "p")
    a = _by_parts(params, tmp_path / "a")
    b = _shards(params, tmp_path / "b", jobs=jobs)
    _assemble(params, tmp_path / "b")
    assert _files(a) == _files(b)
    assert _files(tmp_path / "a" / "lmdb") == _files(tmp_path / "b" / "lmdb")
    assert sum(len(read_shard_index(a / split)["shards"]) for split in SPLITS) > 6  # really sharded


def test_the_number_of_parts_does_not_change_the_shards(tmp_path: Path) -> None:
    a = _shards(_params(tmp_path / "p1", parts=1), tmp_path / "a")
    b = _shards(_params(tmp_path / "p4", parts=4), tmp_path / "b", jobs=2)
    assert _files(a) == _files(b)


def test_every_sample_is_stored_once_in_its_split_with_its_label(built: tuple[Path, Path]) -> None:
    _, root = built
    images, labels = generate(SEED, 0, COUNT, SHAPE, CLASSES)
    seen = {}
    for split in SPLITS:
        with DatumReader(root / "lmdb" / split) as reader:  # the assembled database: Caffe's keys, %08d
            assert list(reader.keys()) == [b"%08d" % i for i in range(len(reader))]
        with DatumReader(root / "shards" / split) as reader:
            for _key, datum in reader.datums():
                array = np.frombuffer(datum.data, np.uint8).reshape(SHAPE)
                matches = [i for i in range(COUNT) if np.array_equal(images[i], array)]
                assert len(matches) == 1 and labels[matches[0]] == datum.label
                assert matches[0] not in seen
                seen[matches[0]] = split
    assert sorted(seen) == list(range(COUNT))
    assert 20 <= sum(1 for s in seen.values() if s == "train") <= 50  # about 60%: a hash decides


def test_a_second_run_rebuilds_nothing_and_an_edit_only_its_shard(tmp_path: Path) -> None:
    """Relabelling one array sample rewrites the one shard holding it; every other shard keeps
    its file (the same inode: DVC sees the same file); appended samples land in the last shards."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (200, 1, 4, 4), dtype=np.uint8)
    labels = rng.integers(0, 5, 200)
    np.save(inputs / "X.npy", images)
    np.save(inputs / "y.npy", labels)
    params = _params(tmp_path / "p", dataset={"source": "arrays", "input_dir": str(inputs)})
    shards = _shards(params, tmp_path)
    before = _inodes(shards)
    _shards(params, tmp_path)
    assert _inodes(shards) == before  # nothing rebuilt
    labels[77] = (labels[77] + 1) % 5
    np.save(inputs / "y.npy", labels)
    _shards(params, tmp_path)
    after = _inodes(shards)
    assert len([name for name in after if after[name] != before.get(name)]) == 1
    np.save(inputs / "X.npy", np.concatenate([images, images[:4]]))
    np.save(inputs / "y.npy", np.concatenate([labels, labels[:4]]))
    _shards(params, tmp_path)
    changed = [name for name, inode in _inodes(shards).items() if after.get(name) != inode]
    assert 1 <= len(changed) <= 4, changed  # the splits' last shards (and perhaps a new one)
    assert sum(read_shard_index(shards / split)["count"] for split in SPLITS) == 204
    out = tmp_path / "reports"
    for split in SPLITS:
        assert main(_verify_argv(params, shards, split, out)) == 0


def test_a_shard_no_longer_planned_is_removed_but_never_a_folder_datumdb_did_not_write(
    tmp_path: Path, caffe_dir: Path
) -> None:
    params = _params(tmp_path / "p")
    shards = _shards(params, tmp_path)
    stray_ours = shards / "val" / "0123456789abcdef"
    shutil.copytree(next(p for p in (shards / "val").iterdir() if p.is_dir()), stray_ours)
    stray_caffe = shards / "val" / "fedcba9876543210"
    shutil.copytree(caffe_dir / "lmdb_png", stray_caffe)
    _shards(params, tmp_path)
    assert not stray_ours.exists()
    assert stray_caffe.is_dir() and (stray_caffe / "data.mdb").is_file()


def test_assemble_replaces_its_own_database_but_never_one_it_did_not_write(
    tmp_path: Path, caffe_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = _params(tmp_path / "p")
    _shards(params, tmp_path)
    lmdb = _assemble(params, tmp_path)
    first = (lmdb / "val" / "data.mdb").stat().st_ino
    _assemble(params, tmp_path)
    assert (lmdb / "val" / "data.mdb").stat().st_ino == first  # current: left as it is
    shutil.rmtree(lmdb / "val")
    shutil.copytree(caffe_dir / "lmdb_png", lmdb / "val")
    before = _files(lmdb / "val")
    capsys.readouterr()
    argv = ["--no-progress", "pipeline", "assemble", "--params", str(params), "--split", "val",
            str(tmp_path / "shards" / "val"), str(lmdb / "val")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did not write" in err, err
    assert _files(lmdb / "val") == before


def test_assemble_false_leaves_a_note_and_removes_only_its_own_database(tmp_path: Path) -> None:
    params = _params(tmp_path / "p")
    _shards(params, tmp_path)
    lmdb = _assemble(params, tmp_path)
    assert (lmdb / "train" / "data.mdb").is_file()
    params = _params(tmp_path / "p", build={"assemble": False})
    _assemble(params, tmp_path)
    for split in SPLITS:
        assert sorted(p.name for p in (lmdb / split).iterdir()) == ["NOT-ASSEMBLED.txt"]
    params = _params(tmp_path / "p", build={"assemble": True})
    _assemble(params, tmp_path)
    assert sorted(p.name for p in (lmdb / "train").iterdir()) == ["data.mdb", "datumdb.json"]


def test_a_part_plan_of_other_params_is_refused_by_the_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = _params(tmp_path / "p")
    config = load_config(params)
    write_plan(make_plan(config, {}), tmp_path / "plan")
    assert read_part(tmp_path / "plan" / "part-0.json")
    capsys.readouterr()
    argv = ["--no-progress", "pipeline", "index", "--params", str(params), "--split", "val",
            "--split-plan", str(tmp_path / "plan" / "val.json"), str(tmp_path / "shards" / "val")]  # fmt: skip
    assert main(argv) == 2  # no part has run: its shards are missing, named
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shard missing; build its part first" in err, err
    argv[argv.index("--split-plan") + 1] = str(tmp_path / "plan" / "test.json")  # another split's plan
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the plan of split 'test', not 'val'" in err, err


def test_the_plan_read_back_from_its_files_is_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Snakemake writes the plan at start-up; verify reads it instead of planning again."""
    config = load_config(_params(tmp_path / "p", parts=4))
    plan = make_plan(config, {})
    write_plan(plan, tmp_path / "plan")
    again = read_plan(tmp_path / "plan")
    assert again.parts == plan.parts == 4
    assert again.split_fingerprints == plan.split_fingerprints
    for split in SPLITS:
        assert [t.as_dict() for t in again.shards[split]] == [t.as_dict() for t in plan.shards[split]]
        assert [t.part for t in again.shards[split]] == [t.part for t in plan.shards[split]]
    # files of two plans (a part written for other params) are refused in one line
    other = make_plan(load_config(_params(tmp_path / "q", parts=4, seed=SEED + 1)), {})
    write_plan(other, tmp_path / "other")
    for part in (p for p in range(4) if other.part(p)):
        mixed = shutil.copytree(tmp_path / "plan", tmp_path / f"mixed-{part}")
        shutil.copy(tmp_path / "other" / f"part-{part}.json", mixed / f"part-{part}.json")
        with pytest.raises(InputError, match=r"(files of two plans)"):
            read_plan(mixed)


def test_parts_are_runs_of_about_the_same_number_of_samples(tmp_path: Path) -> None:
    """A run waits for its largest part: the parts hold about the same samples, every split mixed in."""
    config = load_config(_params(tmp_path / "p", parts=4, dataset={"count": 2000}))
    plan = make_plan(config, {})
    sizes = [sum(len(task.members) for task in plan.part(p)) for p in range(4)]
    largest_shard = max(len(task.members) for split in SPLITS for task in plan.shards[split])
    assert sum(sizes) == 2000 and max(sizes) - min(sizes) <= 2 * largest_shard, sizes
    for part in range(4):
        assert {task.split for task in plan.part(part)} == set(SPLITS)


def test_a_change_of_size_moves_only_shards_at_the_cuts_to_the_next_part() -> None:
    """Parts stay put under edits: shards added or grown elsewhere move only shards next to a cut,
    each to the part beside its own; a relabel (same sizes) moves none."""
    rng = np.random.default_rng(0)
    shards = [((f"{int(rng.integers(1 << 62)):016x}", "train"), int(rng.integers(16, 128))) for _ in range(400)]
    before = deal_parts(shards, 8)
    assert deal_parts(shards, 8) == before
    sizes = [sum(size for key, size in shards if before[key] == p) for p in range(8)]
    assert max(sizes) - min(sizes) <= 2 * 128, sizes
    added = [((f"{int(rng.integers(1 << 62)):016x}", "val"), 64) for _ in range(4)]
    after = deal_parts(shards + added, 8)
    moved = [key for key, _ in shards if after[key] != before[key]]
    assert len(moved) < len(shards) // 10, moved
    assert all(abs(after[key] - before[key]) == 1 for key in moved)
    assert sorted(set(after.values())) == list(range(8))


# ----------------------------------------------------------------------------- verify


@pytest.mark.parametrize("encoding", ["none", "png", "jpg"])
def test_verify_passes_and_writes_its_four_outputs(tmp_path: Path, encoding: str) -> None:
    params = _params(tmp_path / "p", encoding=encoding, sample=6)
    shards = _shards(params, tmp_path)
    out = tmp_path / "reports"
    config = load_config(params)
    plan = make_plan(config, {})
    for split in SPLITS:
        assert main(_verify_argv(params, shards, split, out)) == 0
        details = json.loads((out / f"{split}.json").read_text())
        assert details["ok"] and details["encoding"] == encoding and details["sampled"] == 6
        assert (
            details["pipeline"]["fingerprint"] == verify_record(config, split, plan.split_fingerprints)["fingerprint"]
        )
        assert details["ncm_accuracy"] > 0.8 > details["chance_accuracy"] == round(1 / CLASSES, 6)
        metrics = json.loads((out / "metrics" / f"{split}.json").read_text())
        assert set(metrics) == {"count", "ncm_accuracy", "chance_accuracy", "digest"}
        assert metrics["count"] == details["count"] == read_shard_index(shards / split)["count"]
        assert re.fullmatch(r"[0-9a-f]{12}", metrics["digest"])
        histogram = (out / f"{split}_labels.csv").read_text().splitlines()
        assert histogram[0] == "label,count"
        assert {k: int(v) for k, v in (line.split(",") for line in histogram[1:])} == details["label_histogram"]
        sheet = cv2.imread(str(out / f"{split}_samples.png"))
        assert sheet is not None and sheet.ndim == 3 and sheet.std() > 10


def test_verify_given_the_plan_files_writes_what_it_writes_planning_again(
    tmp_path: Path, built: tuple[Path, Path]
) -> None:
    params, root = built
    write_plan(make_plan(load_config(params), {}), tmp_path / "plan")
    planned, again = tmp_path / "planned", tmp_path / "again"
    for split in SPLITS:
        assert main(_verify_argv(params, root / "shards", split, again)) == 0
        assert main([*_verify_argv(params, root / "shards", split, planned), "--plan", str(tmp_path / "plan")]) == 0
    assert _files(planned) == _files(again) and len(_files(planned)) == 4 * len(SPLITS)
    wrong = _verify_argv(params, root / "shards", "val", tmp_path / "wrong")  # the test split's set as val's
    wrong[wrong.index(str(root / "shards" / "val"))] = str(root / "shards" / "test")
    assert main([*wrong, "--plan", str(tmp_path / "plan")]) == 1
    assert _outputs(tmp_path / "wrong") == []


def _rewrite(db: Path, change: Any) -> None:
    """Write ``db`` again, every record through ``change(key, value) -> value``: a self-consistent manifest."""
    items = read_lmdb_items(db)
    manifest = read_manifest(db)
    with DatabaseWriter(
        db, overwrite=True, batch_size=7, map_size=1 << 20, channel_order=manifest["channel_order"],
        metadata=manifest["metadata"],
    ) as writer:  # fmt: skip
        for key, value in items:
            writer.add_serialized(change(key, value), key)


def _outputs(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file()) if out.exists() else []


def _copy_set(root: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the shard sets, and one shard of val in it."""
    copy = shutil.copytree(root / "shards", tmp_path / "shards")
    shard = copy / "val" / read_shard_index(copy / "val")["shards"][0]["name"]
    return copy, shard


def _copy_with_a_wrong_label(root: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the shard sets whose first val shard has its first record's label changed (the
    database stays self-consistent: only the source can tell); the copy and that shard."""
    copy, shard = _copy_set(root, tmp_path)
    victim = read_lmdb_items(shard)[0][0]

    def relabel(key: bytes, value: bytes) -> bytes:
        if key != victim:
            return value
        datum = decode(value, key)
        return encode_sample(np.frombuffer(datum.data, np.uint8).reshape(SHAPE), (datum.label + 1) % CLASSES, "none")

    _rewrite(shard, relabel)
    return copy, shard


def test_verify_fails_and_writes_nothing_on_a_wrong_label(
    tmp_path: Path, built: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    params, root = built
    copy, shard = _copy_with_a_wrong_label(root, tmp_path)
    assert main(["verify", "--in-process", str(shard)]) == 0  # self-consistent: only the source can tell
    capsys.readouterr()
    out = tmp_path / "reports"
    assert main(_verify_argv(params, copy, "val", out)) == 1
    err = capsys.readouterr().err
    assert "label" in err and "no report written" in err, err
    assert _outputs(out) == []


def test_verify_fails_on_a_shard_set_of_another_split(tmp_path: Path, built: tuple[Path, Path]) -> None:
    params, root = built
    out = tmp_path / "reports"
    argv = _verify_argv(params, root / "shards", "val", out)
    argv[argv.index(str(root / "shards" / "val"))] = str(root / "shards" / "test")
    assert main(argv) == 1
    assert _outputs(out) == []


def test_datumdb_verify_checks_a_shard_set_and_its_params(
    tmp_path: Path, built: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    params, root = built
    assert main(["verify", "--in-process", str(root / "shards" / "val"), "--params", str(params)]) == 0
    assert main(["verify", "--in-process", str(root / "lmdb" / "val"), "--params", str(params)]) == 0
    other = _params(tmp_path / "p", encoding="png")
    capsys.readouterr()
    assert main(["verify", "--in-process", str(root / "lmdb" / "val"), "--params", str(other)]) == 1
    assert "made from another version of the shard set" in capsys.readouterr().err
    assert main(["verify", "--in-process", str(root / "shards" / "val"), "--params", str(other)]) == 1
    assert "encoding" in capsys.readouterr().err


# ----------------------------------------------------------------------------- mean and report


def test_pipeline_mean_of_the_shards_equals_compute_mean_of_the_assembled_database(
    tmp_path: Path, built: tuple[Path, Path]
) -> None:
    params, root = built
    a, b = tmp_path / "pipeline", tmp_path / "cli"
    argv = ["--no-progress", "pipeline", "mean", "--params", str(params), str(root / "shards" / "train")]
    argv += ["--binaryproto", str(a / "m.binaryproto"), "--npy", str(a / "m.npy"), "--json", str(a / "m.json")]
    assert main(argv) == 0
    argv = ["--no-progress", "compute-mean", str(root / "lmdb" / "train"), str(b / "m.binaryproto")]
    assert main([*argv, "--npy", str(b / "m.npy"), "--json", str(b / "m.json")]) == 0
    assert (a / "m.binaryproto").read_bytes() == (b / "m.binaryproto").read_bytes()
    assert (a / "m.npy").read_bytes() == (b / "m.npy").read_bytes()
    ours, theirs = json.loads((a / "m.json").read_text()), json.loads((b / "m.json").read_text())
    train = make_plan(load_config(params), {}).split_fingerprints["train"]
    assert ours.pop("pipeline")["fingerprint"] == mean_record(train)["fingerprint"]
    assert ours == theirs and ours["shape"] == list(SHAPE)


def test_report_exit_code_follows_the_verify_reports(
    tmp_path: Path, built: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    params, root = built
    shards = root / "shards"
    out = tmp_path / "reports"
    for split in SPLITS:
        assert main(_verify_argv(params, shards, split, out)) == 0
    mean = tmp_path / "mean"
    argv = ["pipeline", "mean", "--params", str(params), str(shards / "train"), "--binaryproto", str(mean / "m.bp")]
    assert main([*argv, "--npy", str(mean / "m.npy"), "--json", str(mean / "m.json")]) == 0
    details = [str(out / f"{split}.json") for split in SPLITS]
    report = ["pipeline", "report", "--params", str(params), *details, "--mean", str(mean / "m.json")]
    capsys.readouterr()
    assert main([*report, "--output", str(out / "summary.md")]) == 0
    text = (out / "summary.md").read_text()
    assert capsys.readouterr().out == text
    val = json.loads((out / "val.json").read_text())
    assert f"| val | {val['count']} | 3x6x6 | none |" in text and "| NO |" not in text
    (out / "val.json").write_text(json.dumps({**val, "ok": False}))
    assert main([*report, "--output", str(out / "summary2.md")]) == 1
    assert "| NO |" in (out / "summary2.md").read_text()
    (out / "test.json").unlink()
    assert main([*report, "--output", str(out / "summary3.md")]) == 2
    assert "test.json: not found" in capsys.readouterr().err


def _with(argv: list[str], option: str, value: Path) -> list[str]:
    at = argv.index(option) + 1
    return [*argv[:at], str(value), *argv[at + 1 :]]


def test_pipeline_steps_refuse_outputs_that_collide_or_lie_in_their_inputs(
    tmp_path: Path, built: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    params, root = built
    shards = root / "shards"
    before = _files(shards)
    out = tmp_path / "out"
    for split in SPLITS:
        assert main(_verify_argv(params, shards, split, out)) == 0
    mean = ["pipeline", "mean", "--params", str(params), str(shards / "train"), "--binaryproto", str(out / "m.bp")]
    mean += ["--npy", str(out / "m.npy"), "--json", str(out / "m.json")]
    assert main(mean) == 0
    reports = _files(out)
    details = [str(out / f"{split}.json") for split in SPLITS]
    report = ["pipeline", "report", "--params", str(params), *details, "--mean", str(out / "m.json")]
    verify = _verify_argv(params, shards, "val", out)
    cases = [
        ("named twice", _with(mean, "--json", out / "m.npy")),
        ("lies inside the input", _with(mean, "--binaryproto", shards / "train" / "shards.json")),
        ("is the input", [*report, "--output", str(out / "val.json")]),
        ("named twice", _with(verify, "--metrics", out / "val.json")),
        ("lies inside the input", _with(verify, "--sheet", shards / "train" / "sheet.png")),
    ]
    for message, argv in cases:
        capsys.readouterr()
        assert main(["--no-progress", *argv]) == 2, message
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert _files(shards) == before
        assert _files(out) == reports


# ----------------------------------------------------------------------------- float arrays


def test_float_arrays_become_float_datums_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 60)
    images = (labels[:, None, None, None] * 3.0 + rng.normal(0, 0.5, (60, 2, 3, 3))).astype(np.float32)
    inputs = tmp_path / "in"
    inputs.mkdir()
    np.save(inputs / "X.npy", images)
    np.save(inputs / "y.npy", labels)
    dataset = {"source": "arrays", "input_dir": str(inputs)}
    params = _params(tmp_path / "p", parts=2, dataset=dataset)
    shards = _shards(params, tmp_path, jobs=2)
    with DatumReader(shards / "val") as reader:
        for _key, datum in reader.datums():
            assert datum.data == b""
            array = np.asarray(datum.float_data, np.float32).reshape(2, 3, 3)
            index = next(i for i in range(60) if np.array_equal(images[i], array))
            assert datum.label == labels[index]
    out = tmp_path / "reports"
    assert main(_verify_argv(params, shards, "val", out)) == 0
    details = json.loads((out / "val.json").read_text())
    assert (details["dtype"], details["shape"]) == ("float32", [2, 3, 3])
    assert details["ncm_accuracy"] > 0.9
    capsys.readouterr()
    png = _params(tmp_path / "png", parts=2, dataset=dataset, encoding="png")
    assert main(["pipeline", "shards", "--params", str(png), str(tmp_path / "png" / "shards"), "--jobs", "1"]) == 2
    assert "needs uint8 images" in capsys.readouterr().err


def test_the_classifier_compares_large_images_at_a_small_side(tmp_path) -> None:
    """Verify's nearest-class-mean check on 3x96x96 records: features of NCM_SIDE x NCM_SIDE
    (area-reduced), which still tell the classes apart; images of that side or smaller are
    compared as they are."""
    from datumdb.pipeline.check import NCM_SIDE, _features, nearest_class_mean

    rng = np.random.default_rng(0)
    tints = rng.integers(0, 256, (4, 3, 1, 1))
    for name, side in (("large", 3 * NCM_SIDE), ("small", NCM_SIDE)):
        labels = np.arange(40) % 4
        noise = rng.integers(-40, 40, (40, 3, side, side))
        images = np.clip(tints[labels] + noise, 0, 255).astype(np.uint8)
        with DatabaseWriter(tmp_path / name) as db:
            db.add_batch(images, labels)
        with DatumReader(tmp_path / name) as reader:
            key, datum = next(iter(reader.datums()))
            features = _features(datum, key, False, "unchanged")
            assert features.shape == (3 * NCM_SIDE * NCM_SIDE,)
            if side == NCM_SIDE:
                assert np.array_equal(features, images[0].astype(np.float64).reshape(-1))
            else:
                small = cv2.resize(images[0].transpose(1, 2, 0), (NCM_SIDE, NCM_SIDE), interpolation=cv2.INTER_AREA)
                assert np.array_equal(features, small.astype(np.float64).reshape(-1))
        result = nearest_class_mean(tmp_path / name, tmp_path / name)
        assert result["accuracy"] == 1.0 and result["evaluated"] == 40 and result["classes"] == 4


def test_the_train_class_means_are_kept_for_the_next_verify_job(tmp_path, monkeypatch) -> None:
    """The first nearest_class_mean keeps the train means in the cache file; the next (another
    split's verify job) reads them without opening train; another train content, other options
    or a damaged file compute them again, and every answer is the one computed afresh."""
    from datumdb.pipeline import check

    rng = np.random.default_rng(1)
    for name, count in (("train", 60), ("val", 20), ("train2", 64)):
        labels = np.arange(count) % 3
        images = np.clip(rng.integers(0, 256, (3, 3, 1, 1))[labels] + rng.integers(-30, 30, (count, 3, 8, 8)), 0, 255)
        with DatabaseWriter(tmp_path / name) as db:
            db.add_batch(images.astype(np.uint8), labels)
    cache = tmp_path / ".datumdb" / "class-means.npz"
    fresh = check.nearest_class_mean(tmp_path / "train", tmp_path / "val")
    assert check.nearest_class_mean(tmp_path / "train", tmp_path / "val", cache=cache) == fresh and cache.is_file()
    computed = []
    real = check._class_means
    monkeypatch.setattr(check, "_class_means", lambda *args: computed.append(args) or real(*args))
    assert check.nearest_class_mean(tmp_path / "train", tmp_path / "val", cache=cache) == fresh
    assert computed == []  # read from the cache: train not opened
    other = check.nearest_class_mean(tmp_path / "train2", tmp_path / "val", cache=cache)
    assert len(computed) == 1 and other == check.nearest_class_mean(tmp_path / "train2", tmp_path / "val")
    check.nearest_class_mean(tmp_path / "train2", tmp_path / "val", cache=cache, seed=5)
    assert len(computed) == 3  # another seed: another key (and the uncached call above)
    cache.write_bytes(cache.read_bytes()[:100])  # damaged: computed again, never an error
    assert check.nearest_class_mean(tmp_path / "train", tmp_path / "val", cache=cache) == fresh
    assert len(computed) == 4


# ----------------------------------------------------------------- every split in one command (DVC)


def test_assemble_of_every_split_in_processes_equals_a_command_per_split(
    tmp_path: Path, built: tuple[Path, Path]
) -> None:
    """DVC's one assemble stage (the splits in parallel processes) writes the bytes of Snakemake's
    job per split, and a second run leaves every current database as it is."""
    params, root = built
    shards = shutil.copytree(root / "shards", tmp_path / "shards")
    argv = ["--no-progress", "pipeline", "assemble", "--params", str(params), str(shards), str(tmp_path / "lmdb")]
    assert main([*argv, "--jobs", "3"]) == 0
    assert _files(tmp_path / "lmdb") == _files(root / "lmdb") and len(_files(root / "lmdb")) == 2 * len(SPLITS)
    inodes = _inodes(tmp_path / "lmdb")
    assert main([*argv, "--jobs", "2"]) == 0
    assert _inodes(tmp_path / "lmdb") == inodes


def _reports_per_split(params: Path, shards: Path, out: Path) -> dict[str, bytes]:
    """Each split's four reports by a command per split, named as dvc.yaml names them."""
    for split in SPLITS:
        assert main(_verify_argv(params, shards, split, out)) == 0
    renamed = {}
    for split in SPLITS:
        for written, listed in (
            (f"{split}.json", f"verify/{split}.json"),
            (f"metrics/{split}.json", f"metrics/{split}.json"),
            (f"{split}_labels.csv", f"verify/{split}_labels.csv"),
            (f"{split}_samples.png", f"verify/{split}_samples.png"),
        ):
            renamed[listed] = (out / written).read_bytes()
    return renamed


def test_verify_of_every_split_in_processes_writes_what_a_job_per_split_writes(
    tmp_path: Path, built: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """DVC's one verify stage: the plan made once, the splits in parallel processes, each split's
    reports where dvc.yaml lists them (under the working directory), byte for byte Snakemake's."""
    params, root = built
    expected = _reports_per_split(params, root / "shards", tmp_path / "per-split")
    (tmp_path / "stage").mkdir()
    monkeypatch.chdir(tmp_path / "stage")
    capsys.readouterr()
    argv = ["--no-progress", "pipeline", "verify", "--params", str(params), str(root / "shards"), "--jobs", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines()] == [str(root / "shards" / split) for split in SPLITS]
    assert _files(tmp_path / "stage" / "reports") == expected


def test_verify_of_every_split_reports_the_failing_split_and_writes_the_others(
    tmp_path: Path, built: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    params, root = built
    copy, _ = _copy_with_a_wrong_label(root, tmp_path)
    (tmp_path / "stage").mkdir()
    monkeypatch.chdir(tmp_path / "stage")
    capsys.readouterr()
    assert main(["--no-progress", "pipeline", "verify", "--params", str(params), str(copy), "--jobs", "2"]) == 1
    captured = capsys.readouterr()
    assert f"{copy / 'val'}: FAILED" in captured.err and "label" in captured.err, captured.err
    assert "test: FAILED" not in captured.err and "train: FAILED" not in captured.err
    written = {str(p.relative_to(tmp_path / "stage")) for p in _outputs(tmp_path / "stage" / "reports")}
    assert written == {
        f"reports/{name}"
        for split in ("train", "test")
        for name in (f"verify/{split}.json", f"metrics/{split}.json", f"verify/{split}_labels.csv",
                     f"verify/{split}_samples.png")
    }  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--details", "d.json"], "--details needs --split"),
        (["--train-db", "t"], "--train-db needs --split"),
        (["--split", "val"], "--split val needs --train-db"),
    ],
)
def test_verify_options_of_one_split_and_of_every_split_are_not_mixed(
    tmp_path: Path, built: tuple[Path, Path], capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    params, root = built
    capsys.readouterr()
    argv = ["--no-progress", "pipeline", "verify", "--params", str(params), str(root / "shards"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def _double_or_refuse(value: int) -> int:
    if value < 0:
        raise InputError(f"refused {value}")
    if value == 13:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer would
    return 2 * value


def test_in_processes_keeps_the_order_of_the_calls_and_raises_a_calls_error() -> None:
    from datumdb.pipeline.processes import in_processes

    assert in_processes(_double_or_refuse, [(n,) for n in range(7)], jobs=3) == [2 * n for n in range(7)]
    assert in_processes(_double_or_refuse, [(5,)], jobs=4) == [10]  # one call: in this process
    assert in_processes(_double_or_refuse, [], jobs=2) == []
    with pytest.raises(InputError, match="refused -1"):
        in_processes(_double_or_refuse, [(1,), (-1,), (2,)], jobs=2)
    with pytest.raises(DatumDBError, match="a worker process died"):
        in_processes(_double_or_refuse, [(1,), (13,), (2,)], jobs=2)


_STOPPABLE_STEP = """
import signal, sys, time
from pathlib import Path
import numpy as np
from datumdb import DatabaseWriter
from datumdb.pipeline.processes import in_processes

root = Path(sys.argv[1])

def build(name):
    if name == "quick":
        return
    try:
        with DatabaseWriter(root / name) as writer:
            writer.add(np.zeros((1, 2, 2), np.uint8))
            (root / f"{name}.started").touch()
            time.sleep(120)
    finally:  # a clean-up that takes a while: nothing may cut it short
        time.sleep(0.5)
        (root / f"{name}.cleaned").touch()

def stop(signum, frame):
    raise KeyboardInterrupt

signal.signal(signal.SIGTERM, stop)  # as the CLI does (SIGINT too: a shell may have started us ignoring it)
signal.signal(signal.SIGINT, stop)
try:
    in_processes(build, [(name,) for name in sys.argv[2].split(",")], jobs=2)
except KeyboardInterrupt:
    sys.exit(130)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the parent-death signal is Linux's")
@pytest.mark.parametrize("how", ["SIGINT to the group", "SIGTERM", "SIGKILL"])
@pytest.mark.parametrize(
    ("calls", "running"),
    [
        ("a,b,c", ["a", "b"]),  # both workers busy: c must never start
        ("a,quick", ["a"]),  # one idle worker: its end (the pool then stops the others) must not cut a's clean-up
    ],
)
def test_a_stopped_step_stops_its_workers_and_leaves_no_build_folder(
    tmp_path: Path, how: str, calls: str, running: list[str]
) -> None:
    """Ctrl-C or SIGTERM of a step running calls in processes (DVC's stages) unwinds the calls in
    progress (their writers remove their build folders, their clean-up runs to its end), starts no
    other and returns at once; ``kill -9`` of the step takes its workers with it."""
    command = [sys.executable, "-c", _STOPPABLE_STEP, str(tmp_path), calls]
    with (tmp_path / "stderr").open("w+") as err, subprocess.Popen(command, stderr=err, start_new_session=True) as step:
        try:
            assert wait_until(lambda: all((tmp_path / f"{name}.started").exists() for name in running))
            if how == "SIGINT to the group":
                os.killpg(step.pid, signal.SIGINT)
            else:
                os.kill(step.pid, getattr(signal, how))
            code = step.wait(timeout=20)  # not the two minutes of the calls
            workers_gone = wait_until(lambda: live_processes_in_group(step.pid) == [], timeout=10)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(step.pid, signal.SIGKILL)
    stderr = (tmp_path / "stderr").read_text()
    assert workers_gone, "orphaned workers"
    assert not (tmp_path / "c.started").exists()
    if how == "SIGKILL":
        assert code == -signal.SIGKILL
        return
    assert (code, stderr) == (130, "")  # no worker's traceback either
    expected = sorted([*(f"{name}.started" for name in running), *(f"{name}.cleaned" for name in running), "stderr"])
    assert sorted(path.name for path in tmp_path.iterdir()) == expected
