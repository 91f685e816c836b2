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
    assert main([command, "--help"] if command else ["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: datumdb")
    if command:
        assert command in out


def test_version(capsys) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("datumdb ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "datumdb: error: the following arguments are required: COMMAND"),
        (["frobnicate"], "datumdb: error: argument COMMAND: invalid choice"),
        (["verify"], "datumdb verify: error: the following arguments are required: DB"),
        (["convert-arrays", "x.npy", "y.npy", "db", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
        (
            ["convert-arrays", "x.npy", "y.npy", "db", "--batch-size", "2147483648"],
            "--batch-size: must be <= 2147483647",
        ),
        (["convert-arrays", "x.npy", "y.npy", "db", "--map-size", "1e9"], "--map-size: expected an integer, got '1e9'"),
        (
            ["convert-arrays", "x.npy", "y.npy", "db", "--map-size", str(2**44 + 1)],
            "--map-size: must be <= 17592186044416",
        ),
        (["convert-arrays", "x.npy", "y.npy", "db", "--layout", "whc"], "argument --layout: invalid choice"),
        (["convert-arrays", "x\0.npy", "y.npy", "db"], "argument IMAGES.npy: a path cannot contain a NUL byte"),
        (["convert-imageset", "r", "l", "db", "--resize-height", "-1"], "--resize-height: must be >= 0"),
        (["convert-imageset", "r", "l", "db", "--resize-width", str(10**9)], "--resize-width: must be <= 65535"),
        (["convert-imageset", "r", "l", "db", "--resize-width", "9" * 5000], "--resize-width: expected an integer"),
        (["convert-imageset", "r", "l", "db", "--resize-height", "9000", "--resize-width", "9000"], "pixels per image"),
        (["convert-imageset", "r", "l", "db", "--seed", "-1"], "argument --seed: must be >= 0"),
        (["convert-imageset", "r", "l", "db", "--seed", str(2**32)], "argument --seed: must be <= 4294967295"),
        (["convert-imageset", "r", "l", "db", "--workers", "0"], "argument --workers: must be >= 1"),
        (["convert-imageset", "r", "l", "db", "--encode-type", "gif"], "argument --encode-type: invalid choice"),
        (["convert-imageset", "", "l", "db"], "argument ROOT/: empty path"),
        (["inspect", "db", "--records", "-1"], "argument --records: must be >= 0"),
        (["verify", "db", "--timeout", "nan"], "argument --timeout: must be a number of seconds"),
        (["verify", "db", "--timeout", "inf"], "argument --timeout: must be a number of seconds"),
        (["verify", "db", "--timeout", "0"], "argument --timeout: must be a number of seconds"),
        (["verify", "db", "--timeout", "soon"], "argument --timeout: expected a number of seconds"),
    ],
)
def test_usage_errors_exit_2_with_one_line(argv: list[str], message: str, capsys) -> None:
    """main() returns 2 (no SystemExit escapes) and prints one line naming the option."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.endswith(" --help')\n"), err
    command = argv[0] if argv and argv[0] != "frobnicate" else None
    assert err.startswith(f"datumdb {command}: error: " if command else "datumdb: error: ")


def test_option_limits_are_inclusive(tmp_path: Path, caffe_dir: Path, capsys) -> None:
    """The documented maxima themselves are accepted (here up to the point the input is read)."""
    argv = ["--no-progress", "convert-imageset", str(tmp_path / "absent"), "l", str(tmp_path / "db")]
    argv += ["--seed", str(2**32 - 1), "--shuffle", "--resize-height", "65535", "--workers", "256"]
    argv += ["--batch-size", str(2**31 - 1), "--map-size", str(2**44)]
    assert main(argv) == 2
    assert "ROOT folder not found" in capsys.readouterr().err
    root, list_file = str(caffe_dir / "images"), str(caffe_dir / "list.txt")
    argv = ["--no-progress", "convert-imageset", root, list_file, str(tmp_path / "db"), "--shuffle"]
    assert main([*argv, "--seed", str(2**32 - 1), "--resize-height", "8192", "--resize-width", "1"]) == 0


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
    assert "interrupted (a database is only ever published whole)" in err
    assert not target.exists()
    assert leftovers(target) == []


def test_python_dash_m_datumdb_is_the_same_command_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "datumdb", "--version"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0 and result.stdout.startswith("datumdb ")
    bad = subprocess.run(
        [sys.executable, "-m", "datumdb", "verify", str(tmp_path / "none")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.startswith("datumdb verify: error: ") and "Traceback" not in bad.stderr


@pytest.mark.parametrize("verb", ["compute-mean", "export"])
def test_outputs_that_exist_are_replaced_only_with_overwrite(tmp_path: Path, verb: str, capsys) -> None:
    db = tmp_path / "db"
    with DatabaseWriter(db) as writer:
        for label in range(3):
            writer.add(np.full((1, 2, 2), label, np.uint8), label)
    output = tmp_path / ("mean.binaryproto" if verb == "compute-mean" else "all.npz")
    output.write_bytes(b"the user's own file")
    capsys.readouterr()
    assert main(["--no-progress", verb, str(db), str(output)]) == 2
    err = capsys.readouterr().err
    assert f"{output}: exists; pass --overwrite to replace it" in err and err.count("\n") == 1
    assert output.read_bytes() == b"the user's own file"
    assert main(["--no-progress", verb, str(db), str(output), "--overwrite"]) == 0
    assert output.read_bytes() != b"the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["db", output.name])  # no temporary left
