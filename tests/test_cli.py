"""datumdb.cli: every subcommand's help, exit codes and messages, inspect and export."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import leftovers

from datumdb import DatabaseWriter, DatumReader
from datumdb.cli import build_parser, main
from datumdb.manifest import read_manifest

CORE_COMMANDS = {"convert-imageset", "convert-arrays", "compute-mean", "verify", "digest", "inspect", "export"}


def _subcommands() -> list[str]:
    parser = build_parser()
    (subparsers,) = (a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(subparsers.choices)


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "db"
    rng = np.random.default_rng(3)
    with DatabaseWriter(path) as writer:
        for i in range(7):
            writer.add(rng.integers(0, 256, (3, 4, 4), dtype=np.uint8), i % 2)
    return path


def test_core_subcommands_exist() -> None:
    assert set(_subcommands()) >= CORE_COMMANDS


@pytest.mark.parametrize("command", [None, *_subcommands()])
def test_help_works_for_every_subcommand(command: str | None, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"] if command else ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: datumdb")
    if command:
        assert command in out


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("datumdb ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required"),
        (["frobnicate"], "invalid choice"),
        (["verify"], "required"),
        (["convert-arrays", "x.npy", "y.npy", "db", "--batch-size", "0"], "must be >= 1"),
        (["convert-arrays", "x.npy", "y.npy", "db", "--layout", "whc"], "invalid choice"),
        (["convert-imageset", "r", "l", "db", "--resize-height", "-1"], "must be >= 0"),
        (["convert-imageset", "r", "l", "db", "--encode-type", "gif"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_input_exits_2_with_a_message_naming_the_problem(tmp_path: Path, db: Path, caffe_dir: Path, capsys) -> None:
    cases = [
        (["inspect", str(tmp_path / "absent")], "inspect", "no data.mdb"),
        (["digest", str(tmp_path / "absent")], "digest", "no data.mdb"),
        (["export", str(tmp_path / "absent"), str(tmp_path / "o.npz")], "export", "no data.mdb"),
        (["compute-mean", str(tmp_path / "absent"), str(tmp_path / "m.bp")], "compute-mean", "no data.mdb"),
        (["export", str(caffe_dir / "lmdb_png"), str(tmp_path / "o.npz")], "export", "batch is"),
        (["convert-arrays", str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), str(tmp_path / "n")], "convert-arrays",
         "images file not found"),
        (["convert-imageset", str(tmp_path), str(tmp_path / "list.txt"), str(tmp_path / "n")], "convert-imageset",
         "list file not found"),
    ]  # fmt: skip
    for argv, command, message in cases:
        capsys.readouterr()
        assert main(["--no-progress", *argv]) == 2, argv
        captured = capsys.readouterr()
        assert captured.err.startswith(f"datumdb {command}: error: "), captured.err
        assert message in captured.err
        assert "Traceback" not in captured.err
    assert not (tmp_path / "o.npz").exists()
    assert not (tmp_path / "n").exists()


def test_export_of_an_empty_database_is_an_error(tmp_path: Path, capsys) -> None:
    with DatabaseWriter(tmp_path / "empty"):
        pass
    capsys.readouterr()
    assert main(["--no-progress", "export", str(tmp_path / "empty"), str(tmp_path / "o.npz")]) == 2
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "o.npz").exists()
    assert main(["inspect", str(tmp_path / "empty")]) == 0
    assert "0 records" in capsys.readouterr().out


def test_existing_target_needs_overwrite(tmp_path: Path, caffe_dir: Path, capsys) -> None:
    root, list_file, out = str(caffe_dir / "images"), str(caffe_dir / "list.txt"), str(tmp_path / "db")
    assert main(["--no-progress", "convert-imageset", root, list_file, out, "--gray"]) == 0
    first = read_manifest(tmp_path / "db")["digest"]
    capsys.readouterr()
    assert main(["--no-progress", "convert-imageset", root, list_file, out]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert read_manifest(tmp_path / "db")["digest"] == first
    assert main(["--no-progress", "convert-imageset", root, list_file, out, "--overwrite"]) == 0
    assert read_manifest(tmp_path / "db")["digest"] != first
    assert read_manifest(tmp_path / "db")["channel_order"] == "BGR"


def test_inspect(db: Path, caffe_dir: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["inspect", "--json", "--records", "3", str(db)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["count"] == 7 and len(summary["records"]) == 3
    assert summary["manifest"] == read_manifest(db)
    assert summary["records"][1] == {
        "key": "00000001",
        "bytes": 60,  # 08 03 10 04 18 04, 22 30 + 48 bytes, 28 01, 38 00
        "channels": 3,
        "height": 4,
        "width": 4,
        "label": 1,
        "encoded": False,
        "data_bytes": 48,
        "float_data": 0,
    }
    assert main(["inspect", str(db)]) == 0
    text = capsys.readouterr().out
    assert "7 records" in text and read_manifest(db)["digest"] in text and "key=00000004" in text
    assert main(["inspect", "--json", str(caffe_dir / "lmdb_png")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["manifest"] is None and summary["count"] == 12
    assert summary["records"][0]["key"] == "00000000_class0/img_00.png" and summary["records"][0]["encoded"]


def test_inspect_does_not_call_a_damaged_manifest_missing(db: Path, tmp_path: Path, capsys) -> None:
    """A datumdb.json that exists but fails its checksum is damaged, not absent: inspect must not
    tell the user the database was not written by datumdb."""
    copy = tmp_path / "copy"
    shutil.copytree(db, copy)
    manifest = copy / "datumdb.json"
    manifest.write_text(manifest.read_text().replace('"count": 7', '"count": 8'))
    capsys.readouterr()
    assert main(["inspect", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "7 records" in out
    assert "not written by datumdb" not in out, out


@pytest.mark.parametrize("source", ["built", "lmdb_raw", "lmdb_gray", "lmdb_jpg"])
def test_export_matches_the_reader(db: Path, caffe_dir: Path, tmp_path: Path, source: str, capsys) -> None:
    path = db if source == "built" else caffe_dir / source
    out = tmp_path / "out.npz"
    assert main(["--no-progress", "export", str(path), str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    with np.load(out, allow_pickle=False) as npz:
        images, labels, keys = npz["images"], npz["labels"], npz["keys"]
    with DatumReader(path) as reader:
        assert keys.tolist() == list(reader.keys())
        assert len(images) == len(labels) == len(reader)
        for i, (array, label) in enumerate(reader):
            np.testing.assert_array_equal(images[i], array)
            assert labels[i] == label
    assert images.dtype == np.uint8


def test_compute_mean_prints_channel_means(caffe_dir: Path, tmp_path: Path, expected, capsys) -> None:
    capsys.readouterr()
    assert main(["--no-progress", "compute-mean", str(caffe_dir / "lmdb_raw"), str(tmp_path / "a" / "m.bp")]) == 0
    lines = capsys.readouterr().out.splitlines()
    means = expected["mean_raw"]["per_channel_mean"]
    assert lines == [f"mean_value channel [{c}]: {m:.6f}" for c, m in enumerate(means)]


def test_sigterm_interrupts_a_build_and_publishes_nothing(tmp_path: Path) -> None:
    np.save(tmp_path / "X.npy", np.zeros((150_000, 1, 4, 4), np.uint8))
    np.save(tmp_path / "y.npy", np.zeros(150_000, np.int64))
    target = tmp_path / "db"
    command = [sys.executable, "-m", "datumdb.cli", "--no-progress", "convert-arrays"]
    build = subprocess.Popen(
        [*command, str(tmp_path / "X.npy"), str(tmp_path / "y.npy"), str(target), "--batch-size", "1"],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not leftovers(target):
        assert build.poll() is None, "the build ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    time.sleep(0.05)
    build.send_signal(signal.SIGTERM)
    _, err = build.communicate(timeout=60)
    assert build.returncode == 130, err
    assert "interrupted; nothing was published" in err
    assert not target.exists()
    assert leftovers(target) == []
