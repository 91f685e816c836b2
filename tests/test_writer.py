"""datumdb.writer: batched, growing, atomic, deterministic builds."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import pytest
from conftest import folder_state, leftovers, read_lmdb_items, resident_fraction
from hypothesis import example, given, settings
from hypothesis import strategies as st

from datumdb import DatabaseWriter, DatumReader
from datumdb.codec import datum_to_array, decode, encode_array, encode_image, encode_png_or_jpg
from datumdb.errors import DatabaseError, DatabaseExistsError, DatumError, UnsafeTargetError, WriteError
from datumdb.manifest import digest_items, read_manifest

pytestmark = pytest.mark.unit

# A build in a separate interpreter: argv = path count batch_size map_size seed delay overwrite.
BUILD_SCRIPT = """
import sys, time
import numpy as np
from datumdb import DatabaseWriter
path, count, batch, map_size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
delay, overwrite = float(sys.argv[6]), sys.argv[7] == "1"
rng = np.random.default_rng(seed)
with DatabaseWriter(path, batch_size=batch, map_size=map_size, overwrite=overwrite) as writer:
    for i in range(count):
        writer.add(rng.integers(0, 256, (3, 16, 16), dtype=np.uint8), int(rng.integers(-5, 5)))
        if delay:
            time.sleep(delay)
"""


def _build_in_subprocess(
    path: Path,
    *,
    count: int = 300,
    batch_size: int = 50,
    map_size: int = 256 * 1024,
    seed: int = 0,
    delay: float = 0.0,
    overwrite: bool = False,
    wait: bool = True,
) -> subprocess.Popen[bytes]:
    args = [str(a) for a in (path, count, batch_size, map_size, seed, delay, int(overwrite))]
    process = subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, *args])
    if wait:
        assert process.wait(timeout=120) == 0
    return process


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _images(count: int, shape=(3, 4, 5), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8)


def _write(path: Path, images: np.ndarray, labels=None, **options) -> DatabaseWriter:
    with DatabaseWriter(path, **options) as writer:
        for i, image in enumerate(images):
            writer.add(image, int(labels[i]) if labels is not None else i % 3)
    return writer


# --------------------------------------------------------------------------- basic contract


def test_default_keys_values_and_published_files(tmp_path: Path) -> None:
    images = _images(12)
    target = tmp_path / "db"
    writer = _write(target, images)
    assert writer.published
    assert sorted(p.name for p in target.iterdir()) == ["data.mdb", "datumdb.json"]
    items = read_lmdb_items(target)
    assert [k for k, _ in items] == [b"%08d" % i for i in range(12)]
    for i, (key, value) in enumerate(items):
        assert value == encode_array(images[i], i % 3)
        np.testing.assert_array_equal(datum_to_array(decode(value, key)), images[i])
    assert not (target / "lock.mdb").exists()
    assert leftovers(target) == []
    mode = target.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask  # not mkdtemp's private 0700


def test_manifest_fields(tmp_path: Path) -> None:
    images = _images(10)
    labels = [5, 5, -1, 0, 0, 0, 2**31 - 1, 5, 0, -1]
    target = tmp_path / "db"
    _write(target, images, labels, channel_order="RGB", metadata={"origin": "test"})
    manifest = read_manifest(target)
    items = read_lmdb_items(target)
    assert manifest["count"] == 10
    assert manifest["digest"] == digest_items(items)
    assert manifest["shapes"] == {"3x4x5": 10}
    assert manifest["dtype"] == "uint8"
    assert manifest["encoding"] == "none"
    assert manifest["channel_order"] == "RGB"
    assert manifest["label_histogram"] == {"-1": 2, "0": 4, "5": 3, str(2**31 - 1): 1}
    assert manifest["keys"] == {"first": "00000000", "last": "00000009"}
    assert manifest["payload_bytes"] == sum(len(v) for _, v in items)
    assert manifest["metadata"] == {"origin": "test"}
    versions = manifest["versions"]
    assert versions["lmdb"] == ".".join(map(str, lmdb.version()))
    assert versions["py-lmdb"] == lmdb.__version__
    assert "datumdb" in versions
    assert manifest["data_mdb"]["sha256"] == "sha256:" + _file_sha256(target / "data.mdb")


def test_float_and_encoded_manifests(tmp_path: Path) -> None:
    floats = np.random.default_rng(1).normal(size=(4, 2, 3, 3)).astype(np.float64)
    _write(tmp_path / "f", floats)
    manifest = read_manifest(tmp_path / "f")
    assert (manifest["dtype"], manifest["encoding"], manifest["shapes"]) == ("float32", "none", {"2x3x3": 4})
    with DatumReader(tmp_path / "f") as reader:
        np.testing.assert_array_equal(reader[2][0], floats[2].astype(np.float32))

    images = _images(3, (3, 6, 7))
    _write(tmp_path / "p", images, encoding="png")
    manifest = read_manifest(tmp_path / "p")
    assert (manifest["dtype"], manifest["encoding"], manifest["shapes"]) == ("uint8", "png", {"3x6x7": 3})
    for i, (_, value) in enumerate(read_lmdb_items(tmp_path / "p")):
        assert value == encode_image(encode_png_or_jpg(images[i], "png"), i % 3, shape=(3, 6, 7))


def test_explicit_keys_must_be_strictly_increasing(tmp_path: Path) -> None:
    with DatabaseWriter(tmp_path / "ok") as writer:
        assert writer.add(np.zeros((1, 2, 2), np.uint8), 0, key="a") == b"a"
        assert writer.add(np.zeros((1, 2, 2), np.uint8), 0, key=b"b") == b"b"
    assert [k for k, _ in read_lmdb_items(tmp_path / "ok")] == [b"a", b"b"]


@pytest.mark.parametrize(("keys", "bad"), [(["b", "a"], "a"), (["a", "b", "b"], "b"), (["img9", "img10"], "img10")])
def test_out_of_order_or_duplicate_key_raises_and_publishes_nothing(tmp_path: Path, keys, bad) -> None:
    target = tmp_path / "db"
    with pytest.raises(WriteError, match=f"key '{bad}'"), DatabaseWriter(target, batch_size=1) as writer:
        for key in keys:
            writer.add(np.zeros((1, 2, 2), np.uint8), 0, key=key)
    assert not target.exists()
    assert leftovers(target) == []


def test_key_longer_than_511_bytes_raises(tmp_path: Path) -> None:
    target = tmp_path / "db"
    with DatabaseWriter(tmp_path / "max") as writer:
        writer.add(np.zeros((1, 1, 1), np.uint8), 0, key=b"k" * 511)
    assert read_lmdb_items(tmp_path / "max")[0][0] == b"k" * 511
    with pytest.raises(WriteError, match="512 bytes"), DatabaseWriter(target) as writer:
        writer.add(np.zeros((1, 1, 1), np.uint8), 0, key=b"k" * 512)
    assert not target.exists() and leftovers(target) == []


def test_bad_keys_and_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        DatabaseWriter(tmp_path / "a", batch_size=0)
    with pytest.raises(ValueError, match="encoding"):
        DatabaseWriter(tmp_path / "a", encoding="gif")  # type: ignore[arg-type]
    with pytest.raises(WriteError, match="empty key"), DatabaseWriter(tmp_path / "b") as writer:
        writer.add(np.zeros((1, 1, 1), np.uint8), 0, key=b"")
    with pytest.raises(WriteError, match="key_width"), DatabaseWriter(tmp_path / "c", key_width=1) as writer:
        for _ in range(11):
            writer.add(np.zeros((1, 1, 1), np.uint8), 0)
    with pytest.raises(DatumError, match="label"), DatabaseWriter(tmp_path / "d") as writer:
        writer.add(np.zeros((1, 1, 1), np.uint8), 2**31)
    assert not any((tmp_path / n).exists() for n in "bcd")
    assert [p.name for p in tmp_path.iterdir()] == []


def test_writer_cannot_be_used_after_close(tmp_path: Path) -> None:
    writer = _write(tmp_path / "db", _images(2))
    with pytest.raises(WriteError, match="closed"):
        writer.add(np.zeros((3, 4, 5), np.uint8), 0)
    assert writer.close() == tmp_path / "db"  # closing twice is harmless


def test_add_serialized_checks_the_payload(tmp_path: Path) -> None:
    with pytest.raises(DatumError, match="does not match its payload"), DatabaseWriter(tmp_path / "db") as writer:
        writer.add_serialized(b"\x08\x03\x10\x02\x18\x02\x22\x01x\x28\x00\x38\x00")
    with pytest.raises(DatumError, match="'00000000'"), DatabaseWriter(tmp_path / "db") as writer:
        writer.add_serialized(b"\x22\xff")
    assert not (tmp_path / "db").exists()


# --------------------------------------------------------------------------- map growth


def test_map_grows_from_a_tiny_start_and_loses_nothing(tmp_path: Path) -> None:
    images = _images(300, (3, 32, 32), seed=3)
    target = tmp_path / "db"
    writer = _write(target, images, map_size=32 * 1024, batch_size=7)
    assert writer.grow_count > 0
    assert writer.map_size > 32 * 1024
    items = read_lmdb_items(target)
    assert len(items) == 300
    for i, (key, value) in enumerate(items):
        assert key == b"%08d" % i
        np.testing.assert_array_equal(datum_to_array(decode(value, key)), images[i])
    manifest = read_manifest(target)
    assert manifest["count"] == 300 and manifest["digest"] == digest_items(items)
    assert manifest["writer"]["map_size"] == writer.map_size


# --------------------------------------------------------------------------- existing targets


def test_existing_database_without_overwrite_fails_before_any_work(tmp_path: Path) -> None:
    target = tmp_path / "db"
    _write(target, _images(3))
    before = folder_state(target)
    with pytest.raises(DatabaseExistsError, match="overwrite"):
        DatabaseWriter(target)
    assert folder_state(target) == before
    assert leftovers(target) == []


def test_existing_file_as_target_fails(tmp_path: Path) -> None:
    target = tmp_path / "db"
    target.write_text("not a folder")
    with pytest.raises(DatabaseExistsError):
        DatabaseWriter(target, overwrite=True)
    assert target.read_text() == "not a folder"


def test_overwrite_replaces_the_database(tmp_path: Path) -> None:
    target = tmp_path / "db"
    _write(target, _images(3, seed=1))
    new = _images(5, seed=2)
    _write(target, new, overwrite=True)
    items = read_lmdb_items(target)
    assert len(items) == 5
    np.testing.assert_array_equal(datum_to_array(decode(items[4][1])), new[4])
    assert read_manifest(target)["count"] == 5
    assert leftovers(target) == []
    assert sorted(p.name for p in target.iterdir()) == ["data.mdb", "datumdb.json"]


@pytest.mark.skipif(sys.platform != "linux", reason="mincore and posix_fadvise as Linux has them")
def test_a_rebuild_lets_the_kernel_drop_the_cached_pages_of_the_version_it_replaces(tmp_path: Path) -> None:
    """Their pages serve the new version's writes (on a VM, fresh memory cost more than writing)."""
    target = tmp_path / "db"
    with DatabaseWriter(target) as writer:
        for i in range(300):
            writer.add(np.full((3, 64, 64), i % 251, np.uint8), 0)
    old = target / "data.mdb"
    old.read_bytes()  # all of it in the cache
    assert resident_fraction(old) == 1.0
    with DatabaseWriter(target, overwrite=True) as writer:
        assert resident_fraction(old) < 0.1  # dropped before the first record
        assert (target / "data.mdb").samefile(old)  # still the published version, untouched
        writer.add(np.zeros((1, 2, 2), np.uint8), 1)
    assert [decode(v).label for _, v in read_lmdb_items(target)] == [1]


def test_empty_target_folder_is_accepted(tmp_path: Path) -> None:
    target = tmp_path / "db"
    target.mkdir()  # Snakemake creates output folders before the job runs
    _write(target, _images(4))
    assert read_manifest(target)["count"] == 4
    assert sorted(p.name for p in target.iterdir()) == ["data.mdb", "datumdb.json"]


def test_exception_inside_the_block_publishes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "db"
    with pytest.raises(RuntimeError, match="boom"), DatabaseWriter(target, batch_size=2) as writer:
        for image in _images(9):
            writer.add(image, 0)
        raise RuntimeError("boom")
    assert not target.exists()
    assert leftovers(target) == []


def test_exception_during_rebuild_leaves_previous_version_intact(tmp_path: Path) -> None:
    target = tmp_path / "db"
    _write(target, _images(6, seed=1))
    before = folder_state(target)
    with pytest.raises(RuntimeError, match="boom"), DatabaseWriter(target, overwrite=True, batch_size=2) as writer:
        for image in _images(9, seed=2):
            writer.add(image, 1)
        raise RuntimeError("boom")
    assert folder_state(target) == before
    assert leftovers(target) == []


def test_partial_folder_lives_beside_the_target_during_the_build(tmp_path: Path) -> None:
    target = tmp_path / "db"
    with DatabaseWriter(target) as writer:
        writer.add(np.zeros((1, 2, 2), np.uint8), 0)
        names = leftovers(target)
        host = socket.gethostname().split(".")[0].replace("-", "_")
        assert len(names) == 1 and names[0].startswith(f".db.partial-{host}-{os.getpid()}-")
        assert not target.exists()
        assert not (tmp_path / names[0] / "lock.mdb").exists()
    assert leftovers(target) == []


# --------------------------------------------------------------------------- determinism


def test_same_inputs_and_options_give_identical_bytes_across_processes(tmp_path: Path, record_property) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _build_in_subprocess(a, batch_size=50, map_size=64 * 1024)
    _build_in_subprocess(b, batch_size=50, map_size=64 * 1024)
    _build_in_subprocess(c, batch_size=7, map_size=64 * 1024)
    assert _file_sha256(a / "data.mdb") == _file_sha256(b / "data.mdb")
    assert (a / "datumdb.json").read_bytes() == (b / "datumdb.json").read_bytes()
    # Another batch size: the content (and its digest) is the same; the file bytes may differ.
    assert read_manifest(c)["digest"] == read_manifest(a)["digest"]
    record_property("batch_size_changes_data_mdb", _file_sha256(a / "data.mdb") != _file_sha256(c / "data.mdb"))


# --------------------------------------------------------------------------- interruption


def _kill_mid_build(target: Path, **options) -> None:
    build = _build_in_subprocess(target, count=1500, batch_size=3, delay=0.003, wait=False, **options)
    try:
        deadline = time.monotonic() + 60
        while not any(n.startswith(f".{target.name}.partial-") for n in leftovers(target)):
            assert build.poll() is None, "the build ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(0.3)  # let it commit a few batches
        assert build.poll() is None, "the build ended before it could be interrupted"
    finally:
        build.send_signal(signal.SIGKILL)
        assert build.wait(timeout=30) == -signal.SIGKILL
    assert any(n.startswith(f".{target.name}.partial-") and f"-{build.pid}-" in n for n in leftovers(target))


def test_sigkill_mid_build_publishes_nothing_and_rerun_completes(tmp_path: Path) -> None:
    reference, target = tmp_path / "reference", tmp_path / "db"
    _build_in_subprocess(reference, count=1500, batch_size=3, seed=1)
    _build_in_subprocess(tmp_path / "reference2", count=1500, batch_size=3, seed=2)

    _kill_mid_build(target, seed=1)  # first build: the target must stay absent
    assert not target.exists()
    _build_in_subprocess(target, count=1500, batch_size=3, seed=1)
    assert read_manifest(target)["digest"] == read_manifest(reference)["digest"]
    assert _file_sha256(target / "data.mdb") == _file_sha256(reference / "data.mdb")
    assert leftovers(target) == [], "the rerun must remove the killed build's folder"

    before = folder_state(target)  # rebuild with other data: the old version must survive the kill
    _kill_mid_build(target, seed=2, overwrite=True)
    assert folder_state(target) == before
    _build_in_subprocess(target, count=1500, batch_size=3, seed=2, overwrite=True)
    assert read_manifest(target)["digest"] == read_manifest(tmp_path / "reference2")["digest"]
    assert leftovers(target) == []
    assert json.loads((target / "datumdb.json").read_text())["count"] == 1500


def test_empty_database_in_new_parent_folders(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "db"
    with DatabaseWriter(target):
        pass
    assert sorted(p.name for p in target.iterdir()) == ["data.mdb", "datumdb.json"]
    assert read_lmdb_items(target) == []
    manifest = read_manifest(target)
    assert (manifest["count"], manifest["digest"], manifest["dtype"]) == (0, digest_items([]), None)
    with DatumReader(target) as reader:
        assert len(reader) == 0 and list(reader) == [] and reader.keys() == ()


def test_non_contiguous_and_big_endian_inputs(tmp_path: Path) -> None:
    base = np.arange(2 * 6 * 8, dtype=np.uint8).reshape(2, 6, 8)
    floats = np.linspace(-3, 3, 2 * 3 * 4).reshape(2, 3, 4).astype(">f8")
    with DatabaseWriter(tmp_path / "db") as writer:
        writer.add(base[:, ::2, 1::3], 0)  # strided view
        writer.add(base.transpose(0, 2, 1), 1)
        writer.add(floats, 2)
    with DatumReader(tmp_path / "db") as reader:
        np.testing.assert_array_equal(reader[0][0], base[:, ::2, 1::3])
        np.testing.assert_array_equal(reader[1][0], base.transpose(0, 2, 1))
        np.testing.assert_array_equal(reader[2][0], floats.astype(np.float32))
    assert read_manifest(tmp_path / "db")["dtype"] == "mixed"


@pytest.mark.parametrize(("shape", "dtype"), [((3, 0, 4), np.uint8), ((0, 2, 2), np.float32), ((5, 0), np.uint8)])
def test_empty_images_are_refused(tmp_path: Path, shape: tuple[int, ...], dtype) -> None:
    """A Datum with no pixels cannot be read back (datum_to_array and verify reject it), so the
    writer must refuse it instead of publishing a database its own verify fails."""
    target = tmp_path / "db"
    with pytest.raises(DatumError), DatabaseWriter(target) as writer:
        writer.add(np.ones((1, 2, 2), np.uint8), 0)
        writer.add(np.zeros(shape, dtype), 0)
    assert not target.exists() and leftovers(target) == []


# --------------------------------------------------------------------------- ownership of the target


def _tree(folder: Path) -> dict[str, bytes | None]:
    """relative path -> bytes (None for folders) of everything under ``folder``."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize(
    ("setup", "named"),
    [
        (lambda d: (d / "notes.txt").write_text("mine"), ["'notes.txt'"]),
        (lambda d: (d / "sub").mkdir(), ["'sub/'"]),
        (lambda d: ((d / "data.mdb").write_bytes(b"x"), (d / "keep.py").write_text("")), ["'keep.py'"]),
        (lambda d: (d / "data.mdb").mkdir(), ["'data.mdb/'"]),
        (lambda d: (d / "datumdb.json").symlink_to(d.parent / "elsewhere.json"), ["'datumdb.json'"]),
        (lambda d: [(d / f"f{i}").write_text("") for i in range(8)], ["'f0'", "'f4'", "and 3 more"]),
    ],
)
@pytest.mark.parametrize("overwrite", [True, False])
def test_a_folder_holding_anything_else_is_never_replaced(tmp_path: Path, setup, named, overwrite: bool) -> None:
    (tmp_path / "elsewhere.json").write_text("{}")
    target = tmp_path / "data"
    target.mkdir()
    setup(target)
    before = _tree(tmp_path)
    with pytest.raises(UnsafeTargetError) as info:
        _write(target, _images(3), overwrite=overwrite)
    for name in named:
        assert name in str(info.value)
    assert str(target) in str(info.value)
    assert isinstance(info.value, DatabaseExistsError)
    assert _tree(tmp_path) == before  # nothing removed, nothing left behind


def test_a_file_appearing_during_the_build_stops_the_publish(tmp_path: Path) -> None:
    target = tmp_path / "db"
    _write(target, _images(3, seed=1))
    with pytest.raises(UnsafeTargetError, match=r"'late\.txt'"), DatabaseWriter(target, overwrite=True) as writer:
        writer.add(_images(1)[0], 0)
        (target / "late.txt").write_text("a user's file")
    assert (target / "late.txt").read_text() == "a user's file"
    assert read_manifest(target)["count"] == 3 and leftovers(target) == []


@pytest.mark.parametrize("name", [".", "..", "cwd", "cwd-parent", "cwd-relative-parent"])
def test_dot_dotdot_and_the_working_directory_are_refused(tmp_path: Path, monkeypatch, name: str) -> None:
    work = tmp_path / "project" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    target = {
        ".": Path("."),
        "..": Path(".."),
        "cwd": work,  # an absolute path to the working folder
        "cwd-parent": tmp_path / "project",
        "cwd-relative-parent": Path("../../project"),
    }[name]
    before = _tree(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(UnsafeTargetError, match=r"working directory|not a database folder name"):
            _write(target, _images(2), overwrite=overwrite)
    assert _tree(tmp_path) == before


def test_symlink_and_file_targets_are_refused_even_with_overwrite(tmp_path: Path) -> None:
    real = tmp_path / "real"
    _write(real, _images(2))
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    before = _tree(tmp_path)
    with pytest.raises(UnsafeTargetError, match="symlink"):
        _write(link, _images(3), overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UnsafeTargetError, match="not a database folder"):
        _write(tmp_path / "file", _images(3), overwrite=True)
    assert _tree(tmp_path) == {**before, "file": b"x"}


def test_a_database_folder_with_lock_mdb_can_be_replaced(tmp_path: Path) -> None:
    target = tmp_path / "db"
    _write(target, _images(2))
    (target / "lock.mdb").write_bytes(b"\0" * 64)  # what Caffe or a locking reader leaves
    _write(target, _images(4), overwrite=True)
    assert read_manifest(target)["count"] == 4
    assert sorted(p.name for p in target.iterdir()) == ["data.mdb", "datumdb.json"]


@pytest.mark.parametrize(
    "argv",
    [
        ["{work}/project/data"],  # the case: notes.txt and a sub-folder in the target
        ["{work}"],  # the folder holding the inputs (and the working directory), absolute
        ["."],
        [".."],
        ["{work}/inputs-here"],  # a folder holding the inputs themselves
    ],
)
def test_cli_overwrite_refuses_folders_it_did_not_make(tmp_path: Path, monkeypatch, capsys, argv) -> None:
    from datumdb.cli import main

    work = tmp_path / "work"
    (work / "project" / "data" / "sub").mkdir(parents=True)
    (work / "project" / "data" / "notes.txt").write_text("notes")
    (work / "inputs-here").mkdir()
    np.save(work / "X.npy", _images(4))
    np.save(work / "y.npy", np.arange(4))
    np.save(work / "inputs-here" / "X.npy", _images(4))
    monkeypatch.chdir(work)
    target = argv[0].format(work=work)
    images = "inputs-here/X.npy" if "inputs-here" in target else "X.npy"
    before = _tree(tmp_path)
    capsys.readouterr()
    assert main(["--no-progress", "convert-arrays", images, "y.npy", target, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "error:" in err
    assert _tree(tmp_path) == before
    if "data" in target:
        assert "'notes.txt'" in err and "'sub/'" in err
    if "inputs-here" in target:
        assert "'X.npy'" in err


def test_empty_existing_folder_is_published_into_through_the_cli(tmp_path: Path, capsys) -> None:
    from datumdb.cli import main

    np.save(tmp_path / "X.npy", _images(4))
    np.save(tmp_path / "y.npy", np.arange(4))
    (tmp_path / "db").mkdir()  # what Snakemake does before the job
    assert main(["--no-progress", "convert-arrays", str(tmp_path / "X.npy"), str(tmp_path / "y.npy"),
                 str(tmp_path / "db")]) == 0  # fmt: skip
    assert read_manifest(tmp_path / "db")["count"] == 4


def test_stale_build_folders_are_removed_only_when_dead_and_only_datumdb_files(tmp_path: Path) -> None:
    host = socket.gethostname().split(".")[0].replace("-", "_")
    dead = _dead_pid()
    stale = tmp_path / f".db.partial-{host}-{dead}-abc"
    stale.mkdir()
    (stale / "data.mdb").write_bytes(b"x")
    adopted = tmp_path / f".db.partial-{host}-{dead}-def"  # a user put a file in it: not only ours any more
    adopted.mkdir()
    (adopted / "data.mdb").write_bytes(b"x")
    (adopted / "mine.txt").write_text("keep")
    alive = tmp_path / f".db.partial-{host}-{os.getpid()}-ghi"
    alive.mkdir()
    other_host = tmp_path / f".db.partial-otherhost-{dead}-jkl"
    other_host.mkdir()
    unrelated = tmp_path / f".dbx.partial-{host}-{dead}-mno"  # another target's folder
    unrelated.mkdir()
    _write(tmp_path / "db", _images(2))
    assert not stale.exists()
    assert (adopted / "mine.txt").read_text() == "keep" and (adopted / "data.mdb").exists()
    assert alive.exists() and other_host.exists() and unrelated.exists()


def test_a_previous_version_left_aside_by_a_killed_publish_is_restored_never_deleted(tmp_path: Path) -> None:
    host = socket.gethostname().split(".")[0].replace("-", "_")
    target = tmp_path / "db"
    _write(target, _images(3, seed=1))
    before = folder_state(target)
    aside = tmp_path / f".db.old-{host}-{_dead_pid()}-x"
    target.rename(aside)  # what a kill -9 between the fallback's two renames leaves
    broken = tmp_path / f".db.old-{host}-{_dead_pid()}-y"  # a removal cut short: no manifest
    broken.mkdir()
    (broken / "data.mdb").write_bytes(b"x")
    live = tmp_path / f".db.old-{host}-{os.getpid()}-z"  # a live publish: not ours to touch
    live.mkdir()
    with pytest.raises(DatabaseExistsError, match="overwrite"):
        DatabaseWriter(target)  # the previous version is back, and needs overwrite like any other
    assert folder_state(target) == before and not aside.exists()
    assert not broken.exists() and live.exists()  # an incomplete aside copy is removed, not restored

    target.rename(aside)
    target.mkdir()  # Snakemake creates the empty output folder before rerunning the job
    _write(target, _images(5, seed=2), overwrite=True)  # restored first: never deleted as stale
    assert read_manifest(target)["count"] == 5
    assert leftovers(target) == [live.name]

    target.rename(aside)  # a non-empty folder of someone else's is never replaced by a restore
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    with pytest.raises(UnsafeTargetError, match=r"'mine\.txt'"):
        DatabaseWriter(target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["mine.txt"] and aside.is_dir()


# --------------------------------------------------------------------------- add_batch

BATCH_LABELS = [0, 9, 127, 128, 300, 16384, 2**31 - 1, -1, -(2**31)]  # varints of 1, 2, 3, 5 and 10 bytes


def _one_by_one(path: Path, images: np.ndarray, labels: list[int], **options) -> DatabaseWriter:
    with DatabaseWriter(path, **options) as writer:
        for image, label in zip(images, labels, strict=True):
            writer.add(image, label)
    return writer


def _in_batches(path: Path, images: np.ndarray, labels: list[int], cuts: list[int], **options) -> DatabaseWriter:
    with DatabaseWriter(path, **options) as writer:
        bounds = [0, *sorted(c % (len(images) + 1) for c in cuts), len(images)]
        for start, stop in itertools.pairwise(bounds):
            writer.add_batch(images[start:stop], np.array(labels[start:stop], dtype=np.int64))
    return writer


def _same_database(a: Path, b: Path) -> None:
    assert (a / "data.mdb").read_bytes() == (b / "data.mdb").read_bytes()
    assert (a / "datumdb.json").read_bytes() == (b / "datumdb.json").read_bytes()  # digests, chunk digests, counts


@settings(max_examples=15)
@given(
    count=st.integers(1, 2600),
    shape=st.sampled_from([(3, 4, 5), (1, 7, 3), (2, 1, 1)]),
    gray=st.booleans(),
    labels=st.one_of(
        st.just("small"), st.just("mixed"), st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=20)
    ),
    batch_size=st.integers(1, 1500),
    cuts=st.lists(st.integers(0, 3000), max_size=4),
    map_size=st.sampled_from([1 << 14, 1 << 20, 64 << 20]),
)
@example(count=2600, shape=(3, 4, 5), gray=False, labels="mixed", batch_size=1000, cuts=[1023, 2049], map_size=1 << 14)
@example(count=2049, shape=(1, 7, 3), gray=True, labels="small", batch_size=333, cuts=[1024], map_size=1 << 14)
@example(count=3000, shape=(2, 1, 1), gray=False, labels=[-1, 5, 2**31 - 1], batch_size=7, cuts=[], map_size=1 << 20)
def test_add_batch_writes_the_bytes_and_manifest_of_add_one_by_one(
    tmp_path_factory, count, shape, gray, labels, batch_size, cuts, map_size
) -> None:
    """Labels of every varint length, in any order; batch sizes that do not divide the count;
    chunks cut anywhere (digest chunks straddled); a map that must grow many times."""
    tmp = tmp_path_factory.mktemp("batch")
    images = np.random.default_rng(count).integers(0, 256, (count, *((1, *shape[1:]) if gray else shape)), np.uint8)
    if gray:
        images = images[:, 0]  # (N, H, W): gray images, as (H, W) ones to add()
    if labels == "small":
        labels = [i % 10 for i in range(count)]
    elif labels == "mixed":
        labels = [BATCH_LABELS[i * 7 % len(BATCH_LABELS)] for i in range(count)]
    else:
        labels = [labels[i % len(labels)] for i in range(count)]
    options = {"batch_size": batch_size, "map_size": map_size}
    one = _one_by_one(tmp / "one", images, labels, **options)
    bulk = _in_batches(tmp / "bulk", images, labels, cuts, **options)
    _same_database(tmp / "one", tmp / "bulk")
    assert (bulk.commit_count, bulk.grow_count) == (one.commit_count, one.grow_count)


def test_add_batch_follows_and_precedes_add_and_counts_records(tmp_path: Path) -> None:
    images = _images(2100, (3, 6, 6), seed=4)
    labels = [int(x) for x in np.random.default_rng(4).integers(-200, 200, 2100)]
    _one_by_one(tmp_path / "one", images, labels, batch_size=100)
    with DatabaseWriter(tmp_path / "mixed", batch_size=100) as writer:
        writer.add(images[0], labels[0])
        writer.add_batch(images[1:1500], labels[1:1500])  # a list of ints works too
        assert len(writer) == 1500 and writer.next_key() == b"00001500"
        writer.add(images[1500], labels[1500])
        writer.add_batch(images[1501:], np.array(labels[1501:], dtype=np.int32))
        writer.add_batch(images[:0], [])
    _same_database(tmp_path / "one", tmp_path / "mixed")


@pytest.mark.parametrize(
    ("images", "labels", "options"),
    [
        (_images(30, (3, 4, 4)).astype(np.float32) / 7, list(range(30)), {}),  # float_data
        (_images(30, (3, 4, 4)), list(range(30)), {"encoding": "png"}),  # encoded
        (_images(30, (3, 4, 4)).astype(">u2"), list(range(30)), {}),  # big-endian ints
        (_images(30, (3, 4, 4)), list(range(30)), {"key_width": 12}),
    ],
    ids=["float", "png", "big-endian", "key-width"],
)
def test_add_batch_of_anything_else_equals_add_one_by_one(tmp_path: Path, images, labels, options) -> None:
    _one_by_one(tmp_path / "one", images, labels, **options)
    _in_batches(tmp_path / "bulk", images, labels, [7, 19], **options)
    _same_database(tmp_path / "one", tmp_path / "bulk")


@pytest.mark.parametrize(
    ("labels", "error", "message", "key"),
    [
        ([0, 1, 2**31, 3], DatumError, "outside the int32 range", "00000002"),
        ([0, -(2**31) - 1, 2, 3], DatumError, "outside the int32 range", "00000001"),
        ([0, 1, 2, 2**64 - 1], DatumError, "outside the int32 range", "00000003"),
        ([0, 1.5, 2, 3], DatumError, "must be an integer", "00000001"),
        ([True, False, True, False], DatumError, "must be an integer", "00000000"),
    ],
)
def test_add_batch_refuses_bad_labels_as_add_does_and_publishes_nothing(tmp_path: Path, labels, error, message, key):
    target = tmp_path / "db"
    with pytest.raises(error, match=message) as caught, DatabaseWriter(target) as writer:
        writer.add_batch(_images(4), labels)  # as add() gets them: a list
    assert key in str(caught.value)
    assert not target.exists() and not leftovers(target)


def test_add_batch_checks_keys_and_arguments_as_add_does(tmp_path: Path) -> None:
    with pytest.raises(WriteError, match="not greater than the previous key"), DatabaseWriter(tmp_path / "a") as writer:
        writer.add(_images(1)[0], 0, key="zzz")
        writer.add_batch(_images(3), [0, 1, 2])
    with (
        pytest.raises(WriteError, match="more than key_width=1 digits"),
        DatabaseWriter(tmp_path / "b", key_width=1) as w,
    ):
        w.add_batch(_images(12), list(range(12)))
    for images, labels in [(_images(3), [0, 1]), (_images(3), [[0], [1], [2]]), (np.uint8(3), [0])]:
        with pytest.raises(WriteError, match="one label per image"), DatabaseWriter(tmp_path / "c") as writer:
            writer.add_batch(images, labels)
    with pytest.raises(DatumError, match="must be"), DatabaseWriter(tmp_path / "d") as writer:
        writer.add_batch(np.zeros((2, 2, 2, 2, 2), np.uint8), [0, 1])  # 4-D samples: add() refuses each
    writer = DatabaseWriter(tmp_path / "e")
    writer.close()
    with pytest.raises(WriteError, match="closed"):
        writer.add_batch(_images(1), [0])
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_a_failed_commit_in_add_batch_publishes_nothing_and_stops_the_hashing_thread(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr("datumdb.writer.MAX_MAP_SIZE", 1 << 16)  # a runaway build: growth is refused
    target = tmp_path / "db"
    with (
        pytest.raises(DatabaseError, match="map size would exceed"),
        DatabaseWriter(target, map_size=1 << 14) as writer,
    ):
        writer.add_batch(_images(3000), [0] * 3000)
    assert not target.exists() and not leftovers(target)
    assert not any(thread.name.startswith("datumdb-digest") for thread in threading.enumerate())


def test_an_interrupt_lost_on_its_way_up_still_stops_the_build(tmp_path: Path) -> None:
    """The CLI's signal handler notes the interrupt before raising KeyboardInterrupt; NumPy can
    drop that exception (it swallows what its Python helpers raise), so the writer checks the
    note before committing and before publishing, and a stopped build publishes nothing."""
    from datumdb.writer import clear_interrupt, note_interrupt

    target = tmp_path / "db"
    writer = DatabaseWriter(target, batch_size=2)
    try:
        writer.add(np.zeros((1, 2, 2), np.uint8), 0)
        note_interrupt()  # as if a KeyboardInterrupt had been raised and lost
        with pytest.raises(KeyboardInterrupt):
            writer.close()
    finally:
        clear_interrupt()
    assert not target.exists() and leftovers(target) == []
    with DatabaseWriter(target) as again:  # a cleared note stops nothing
        again.add(np.zeros((1, 2, 2), np.uint8), 0)
    assert (target / "data.mdb").is_file()


def test_add_described_writes_the_bytes_and_manifest_of_add_serialized(tmp_path: Path) -> None:
    """convert-imageset's workers say what each record holds (label, shape, encoding) and hand
    over a view of it; the writer must make what parsing each record would have made."""
    rng = np.random.default_rng(11)
    records = []
    for i in range(40):
        image = rng.integers(0, 256, (3, 40 + i % 3, 40), dtype=np.uint8)  # 40 of them outgrow 64 KiB
        if i % 4 == 3:
            records.append((encode_image(encode_png_or_jpg(image, "png"), i % 5), image.shape, "png"))
        else:
            records.append((encode_array(image, i % 5), image.shape, "none"))
    with DatabaseWriter(tmp_path / "parsed", batch_size=7, map_size=1 << 16) as writer:
        for i, (value, shape, _) in enumerate(records):
            writer.add_serialized(value, b"%08d" % i, shape=shape)
    with DatabaseWriter(tmp_path / "described", batch_size=7, map_size=1 << 16) as writer:
        for i, (value, shape, encoding) in enumerate(records):
            view = memoryview(bytearray(value))  # a view, as of the shared ring
            writer.add_described(b"%08d" % i, view, label=i % 5, shape=shape, encoding=encoding)
    assert (tmp_path / "described" / "data.mdb").read_bytes() == (tmp_path / "parsed" / "data.mdb").read_bytes()
    assert read_manifest(tmp_path / "described") == read_manifest(tmp_path / "parsed")
    assert read_manifest(tmp_path / "described")["writer"]["map_size"] > 1 << 16  # it grew, replaying views


def test_add_copied_many_writes_the_bytes_and_manifest_of_add_copied_one_by_one(tmp_path: Path) -> None:
    """The assembly hands over a batch of views at a time; the database must be the one that
    copying each record on its own makes, whatever the chunks and the batch boundaries."""
    rng = np.random.default_rng(12)
    records = [
        (b"%08d" % i, encode_array(rng.integers(0, 256, (3, 30 + i % 4, 40), dtype=np.uint8), i % 3)) for i in range(61)
    ]
    with DatabaseWriter(tmp_path / "one", batch_size=7, map_size=1 << 16) as writer:
        for key, value in records:
            writer.add_copied(key, value)
    with DatabaseWriter(tmp_path / "many", batch_size=7, map_size=1 << 16) as writer:
        writer.add_copied(*records[0])  # mixed with add_copied, chunks across batch boundaries
        for start, stop in [(1, 4), (4, 4), (4, 20), (20, 21), (21, 61)]:
            writer.add_copied_many([(key, memoryview(bytearray(value))) for key, value in records[start:stop]])
    assert (tmp_path / "many" / "data.mdb").read_bytes() == (tmp_path / "one" / "data.mdb").read_bytes()
    assert read_manifest(tmp_path / "many") == read_manifest(tmp_path / "one")
    assert read_manifest(tmp_path / "many")["writer"]["map_size"] > 1 << 16  # it grew, replaying views


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ([b"b", b"a"], "key 'a' is not greater than the previous key 'b'"),
        ([b"a", b"c", b"b"], "key 'b' is not greater than the previous key 'c'"),
        ([b"a", b""], "empty key"),
        ([b"a", b"k" * 512], "512 bytes"),
        ([b"a", "b"], "keys must be bytes, got str"),
    ],
)
def test_add_copied_many_checks_every_key_as_add_copied_does(tmp_path: Path, keys, message) -> None:
    target = tmp_path / "db"
    value = encode_array(np.zeros((1, 2, 2), np.uint8), 0)
    with pytest.raises(WriteError, match=message), DatabaseWriter(target, batch_size=2) as writer:
        writer.add_copied(b"0", value)
        writer.add_copied_many([(key, value) for key in keys])
    assert not target.exists() and leftovers(target) == []


def test_a_durable_build_starts_its_writeback_after_each_commit_and_writes_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The final fsync would otherwise write the whole file with nothing else running."""
    import datumdb.writer as writer_module

    started: list[Path] = []
    real_start = writer_module._Writeback.start

    def start(self: Any) -> None:
        started.append(self._path)
        real_start(self)

    monkeypatch.setattr(writer_module._Writeback, "start", start)
    images = np.random.default_rng(0).integers(0, 256, (10, 3, 16, 16), dtype=np.uint8)
    fds = len(os.listdir("/proc/self/fd"))
    for name, durable in (("durable", True), ("not-durable", False)):
        with DatabaseWriter(tmp_path / name, batch_size=3, durable=durable) as writer:
            for index, image in enumerate(images):
                writer.add(image, index % 4)
    assert len(started) == 4 and all(path.name == "data.mdb" for path in started)  # the durable build's commits
    assert (tmp_path / "durable" / "data.mdb").read_bytes() == (tmp_path / "not-durable" / "data.mdb").read_bytes()
    assert len(os.listdir("/proc/self/fd")) == fds  # its descriptor closed with the build
    missing = writer_module._Writeback(tmp_path / "nowhere" / "data.mdb")
    missing.start()  # a file it cannot open: nothing to do, no error (the final fsync does it all)
    missing.close()


@pytest.mark.parametrize("size", [0, 1, (1 << 20) + 3, (5 << 19) + 3])
def test_file_sha256_is_the_sha256_of_the_bytes(tmp_path: Path, size: int, monkeypatch) -> None:
    from datumdb import manifest
    from datumdb.manifest import file_sha256

    monkeypatch.setattr(manifest, "_HASH_WINDOW", 1 << 20)  # the larger sizes span several windows

    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == "sha256:" + hashlib.sha256(data).hexdigest()


_PEAK_RSS_WHILE_HASHING = """
import sys
from datumdb.manifest import file_sha256

def peak_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

before = peak_kib()
file_sha256(sys.argv[1])
print(peak_kib() - before)
"""


def test_hashing_a_file_maps_a_window_at_a_time(tmp_path: Path) -> None:
    """The resident set grows by about one window while a 320 MiB file is hashed, not by the file."""
    import subprocess
    import sys

    from datumdb.manifest import _HASH_WINDOW

    path = tmp_path / "big"
    with open(path, "wb") as handle:
        for _ in range(5):
            handle.write(os.urandom(64 << 20))
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS_WHILE_HASHING, str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) * 1024 < 2 * _HASH_WINDOW < path.stat().st_size
