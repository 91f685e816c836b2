"""Hostile inputs at the command line (issue 11): manifests that are not files or not sane, forged
image headers in a database, exports too large to hold. Each must end in one clear line, never a
hang or a traceback."""

from __future__ import annotations

import json
import os
import resource
import stat
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import lmdb
import numpy as np
import pytest
from hostile_inputs import forged_jpeg, forged_png, jpeg_scan_bomb, tiff_bomb

from datumdb import DatabaseWriter, DatumReader
from datumdb.cli import main
from datumdb.codec import encode_image
from datumdb.errors import DatumError, UnsafeInputError, VerificationError
from datumdb.files import OUTPUT_MODE, replacing
from datumdb.limits import MAX_MANIFEST_BYTES, read_regular_file
from datumdb.manifest import MAX_MANIFEST_DEPTH, read_manifest, write_manifest

pytestmark = pytest.mark.unit


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "db"
    rng = np.random.default_rng(11)
    with DatabaseWriter(path) as writer:
        for i in range(5):
            writer.add(rng.integers(0, 256, (3, 4, 4), dtype=np.uint8), i)
    return path


def _main_with_timeout(argv: list[str], timeout: float = 60) -> int:
    """``main(argv)`` on a daemon thread: a hang (a FIFO opened for reading) fails instead of stalling."""
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(main(argv)), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"datumdb {' '.join(argv)} still running after {timeout} s"
    assert result, "main raised instead of returning an exit code"
    return result[0]


# --------------------------------------------------------------------------- manifests


def _replace_manifest(db: Path, kind: str) -> str:
    manifest = db / "datumdb.json"
    manifest.unlink()
    if kind == "fifo":
        os.mkfifo(manifest)
        return "is a FIFO (named pipe), not a regular file"
    if kind == "device":
        manifest.symlink_to("/dev/zero")
        return "is a character device, not a regular file"
    if kind == "folder":
        manifest.mkdir()
        return "is a folder, not a regular file"
    with open(manifest, "wb") as handle:  # sparse: no 64 MiB written
        handle.truncate(MAX_MANIFEST_BYTES + 1)
    return f"is {MAX_MANIFEST_BYTES + 1} bytes, over the bound of {MAX_MANIFEST_BYTES} bytes"


@pytest.mark.parametrize("kind", ["fifo", "device", "folder", "too large"])
def test_inspect_of_a_manifest_that_is_not_a_small_regular_file(db: Path, kind: str, capsys) -> None:
    message = _replace_manifest(db, kind)
    capsys.readouterr()
    assert _main_with_timeout(["inspect", str(db)]) == 0
    out = capsys.readouterr().out
    assert "5 records" in out
    assert f"manifest damaged: {db / 'datumdb.json'}: manifest {message}" in out
    with pytest.raises(VerificationError, match=r"datumdb\.json: manifest "):
        read_manifest(db)
    assert _main_with_timeout(["verify", "--in-process", str(db)]) == 1
    assert message in capsys.readouterr().err


def _rewrite(db: Path, change) -> None:
    """Change the manifest and give it a valid checksum again: only the content checks can refuse it."""
    manifest = json.loads((db / "datumdb.json").read_text())
    change(manifest)
    write_manifest(db, manifest)


HOSTILE_FIELDS = {
    "count as text": (lambda m: m.update(count="5"), "field 'count' is not a non-negative integer"),
    "negative count": (lambda m: m.update(count=-1), "field 'count' is not a non-negative integer"),
    "huge count": (lambda m: m.update(count=10**4000), "field 'count' is not a non-negative integer"),
    "shapes a list": (lambda m: m.update(shapes=[1, 2]), "field 'shapes' is not an object"),
    "data_mdb a list": (lambda m: m.update(data_mdb=[]), "field 'data_mdb' is not an object"),
    "chunk size zero": (
        lambda m: m["chunk_digests"].update(records_per_chunk=0),
        "field 'chunk_digests' is not an object with records_per_chunk > 0",
    ),
    "metadata a list": (lambda m: m.update(metadata=[]), "field 'metadata' is not an object"),
    "deep inside metadata": (
        lambda m: m.update(metadata={"x": json.loads("[" * 100 + "]" * 100)}),
        f"nested more than {MAX_MANIFEST_DEPTH} levels deep",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_FIELDS))
def test_hostile_manifest_fields_are_a_clear_error(db: Path, case: str, capsys) -> None:
    change, message = HOSTILE_FIELDS[case]
    _rewrite(db, change)
    with pytest.raises(VerificationError, match=r"datumdb\.json: ") as info:
        read_manifest(db)
    assert message in str(info.value)
    assert main(["inspect", str(db)]) == 0
    assert f"manifest damaged: {db / 'datumdb.json'}: " in capsys.readouterr().out
    assert main(["verify", "--in-process", str(db)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 200_000 + "]" * 200_000, "not valid JSON"),  # deeper than Python's recursion limit
        ('{"format": "datumdb-manifest/1", "count": ' + "9" * 5000 + "}", "not valid JSON"),
        ('{"format": "datumdb-manifest/1", "count": NaN}', "not valid JSON"),
        ("\xff\xfe", "not valid JSON"),
        ("[1, 2]", "not a datumdb-manifest/1 manifest"),
    ],
    ids=["deep nesting", "5000-digit number", "NaN", "not UTF-8", "a list"],
)
def test_hostile_manifest_text_is_a_clear_error(db: Path, text: str, message: str) -> None:
    (db / "datumdb.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(VerificationError, match=message):
        read_manifest(db)


def test_a_sane_manifest_still_reads(db: Path) -> None:
    manifest = read_manifest(db)
    assert manifest["count"] == 5 and manifest["shapes"] == {"3x4x4": 5}


# --------------------------------------------------------------------------- forged image headers


@pytest.fixture(params=["jpeg", "png"])
def forged_db(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A database (as another tool would write it: no manifest) whose second record is a forged
    60000 x 60000 image: 18 bytes of header claiming 10 GB of pixels."""
    forged = forged_jpeg() if request.param == "jpeg" else forged_png()
    good = encode_image(forged_png(8, 8), 0)  # a real 8x8 PNG: the forge before forging
    path = tmp_path / "forged"
    path.mkdir()
    with lmdb.open(str(path), map_size=1 << 20) as env, env.begin(write=True) as txn:
        txn.put(b"00000000", good)
        txn.put(b"00000001", encode_image(forged, 1))
        txn.put(b"00000002", good)
    (path / "lock.mdb").unlink()
    return path


def _one_clean_line(err: str) -> str:
    assert "Traceback" not in err and "cv2.error" not in err, err
    return err


def test_verify_reports_the_forged_record_as_bad(forged_db: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["--no-progress", "verify", str(forged_db)]) == 1
    err = _one_clean_line(capsys.readouterr().err)
    assert "key '00000001': cannot decode" in err and "OPENCV_IO_MAX_IMAGE_PIXELS" in err
    assert "(1 problem(s), 1 bad record(s))" in err


@pytest.mark.parametrize("command", ["compute-mean", "export"])
def test_compute_mean_and_export_name_the_forged_key(forged_db: Path, tmp_path: Path, command: str, capsys) -> None:
    out = tmp_path / ("mean.binaryproto" if command == "compute-mean" else "all.npz")
    capsys.readouterr()
    assert main(["--no-progress", command, str(forged_db), str(out)]) == 2
    err = _one_clean_line(capsys.readouterr().err)
    assert len(err.strip().splitlines()) == 1
    assert "key '00000001': cannot decode" in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forged"]  # no partial file either


# --------------------------------------------------------------------------- bounded, atomic export


def _bomb_db(tmp_path: Path, count: int) -> Path:
    """Records of 5000 x 5000 black PNGs: ~25 kB each on disk, 75 MB each decoded."""
    import cv2

    ok, png = cv2.imencode(".png", np.zeros((5000, 5000, 3), np.uint8))
    assert ok and len(png) < 100_000
    path = tmp_path / "bombs"
    with DatabaseWriter(path, channel_order="BGR") as writer:
        for i in range(count):
            writer.add_serialized(encode_image(png.tobytes(), i), b"%08d" % i, shape=(3, 5000, 5000))
    return path


def test_export_refuses_a_decompression_bomb_before_writing(tmp_path: Path, capsys) -> None:
    bombs = _bomb_db(tmp_path, 60)  # 1.5 MB database, 4.5 GB of pixels
    out = tmp_path / "all.npz"
    capsys.readouterr()
    assert main(["--no-progress", "export", str(bombs), str(out)]) == 2
    err = capsys.readouterr().err
    assert f"exporting 60 records of uint8 (3, 5000, 5000) needs {60 * 75_000_000} bytes" in err
    assert "over --max-bytes 4294967296" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bombs"]
    assert main(["--no-progress", "export", "--max-bytes", str(2 * 75_000_000), str(bombs), str(out)]) == 2
    assert "over --max-bytes 150000000" in capsys.readouterr().err


def test_export_within_the_bound_and_max_bytes_zero(db: Path, tmp_path: Path, capsys) -> None:
    exact = 5 * 3 * 4 * 4
    assert main(["--no-progress", "export", "--max-bytes", str(exact - 1), str(db), str(tmp_path / "a.npz")]) == 2
    assert main(["--no-progress", "export", "--max-bytes", str(exact), str(db), str(tmp_path / "a.npz")]) == 0
    assert main(["--no-progress", "export", "--max-bytes", "0", str(db), str(tmp_path / "b")]) == 0
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert a["images"].shape == (5, 3, 4, 4)
        np.testing.assert_array_equal(a["images"], b["images"])
        assert a["labels"].tolist() == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz", "db"]


def test_a_failed_export_leaves_the_previous_file_whole(db: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "all.npz"
    assert main(["--no-progress", "export", str(db), str(out)]) == 0
    before = out.read_bytes()

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    assert main(["--no-progress", "export", "--overwrite", str(db), str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.npz", "db"]


# --------------------------------------------------------------------------- file outputs


def test_export_never_writes_through_a_link_planted_at_its_temporary_name(db: Path, tmp_path: Path) -> None:
    """The temporary was `.OUT.<pid>.partial`, opened with a plain open(): a symlink planted there
    made export overwrite the file it led to, without --overwrite. Now it is made exclusively
    (mkstemp: O_CREAT|O_EXCL, a random name), so no planted name is ever opened."""
    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's file\n")
    out = tmp_path / "all.npz"
    planted = [out.with_name(f".{out.name}.{os.getpid()}.partial"), out.with_name(f".{out.name}.tmp")]
    for link in planted:
        link.symlink_to(victim)
    assert main(["--no-progress", "export", str(db), str(out)]) == 0
    assert victim.read_text() == "someone else's file\n"
    assert out.is_file() and not out.is_symlink()
    with np.load(out) as exported:
        assert exported["labels"].tolist() == [0, 1, 2, 3, 4]
    assert all(link.is_symlink() for link in planted)  # not ours: left as found
    assert sorted(p.name for p in tmp_path.iterdir() if not p.is_symlink()) == ["all.npz", "db", "victim.txt"]


def test_temporary_files_are_new_private_files_under_random_names(tmp_path: Path) -> None:
    """Each write makes its own temporary (0600 until complete), so two writers of one target
    (or a stranger's file at a guessable name) never share one."""
    target = tmp_path / "report.json"
    with replacing(target) as first, replacing(target) as second:
        temporaries = sorted(p for p in tmp_path.iterdir() if p.name.startswith(".report.json."))
        assert len(temporaries) == 2 and first.name != second.name
        for temporary in temporaries:
            info = temporary.lstat()
            assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        first.write(b"first")
        second.write(b"second")  # renamed first (the inner block ends first), then replaced
    assert target.read_bytes() == b"first" and stat.S_IMODE(target.stat().st_mode) == OUTPUT_MODE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


@pytest.mark.parametrize(
    ("command", "output", "what"),
    [
        ("compute-mean", "{db}/data.mdb", "lies inside"),  # destroyed the database it computed the mean of
        ("compute-mean", "{db}/datumdb.json", "lies inside"),
        ("compute-mean", "{db}/mean.binaryproto", "lies inside"),  # a new file: no longer only a database
        ("compute-mean", "{db}", "is"),
        ("compute-mean", "{link}/data.mdb", "lies inside"),  # the same folder by another path
        ("compute-mean", "{db}/../db/data.mdb", "lies inside"),
        ("export", "{db}/all.npz", "lies inside"),
        ("export", "{link}/data.mdb", "lies inside"),  # (data.mdb.npz)
    ],
)
def test_an_output_that_is_or_lies_inside_the_input_database_is_refused(
    db: Path, tmp_path: Path, command: str, output: str, what: str, capsys
) -> None:
    (tmp_path / "link").symlink_to(db, target_is_directory=True)
    before = {p.name: p.read_bytes() for p in db.iterdir()}
    target = output.format(db=db, link=tmp_path / "link")
    capsys.readouterr()
    assert main(["--no-progress", command, "--overwrite", str(db), target]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f": {what} the input {db}; writing it would destroy that input" in err, err
    assert {p.name: p.read_bytes() for p in db.iterdir()} == before
    assert main(["--no-progress", "verify", "--in-process", str(db)]) == 0


@pytest.mark.parametrize(
    "names",
    [
        ["m.bp", "--npy", "x", "--json", "x"],  # silently kept only the JSON
        ["x", "--npy", "x"],
        ["m.bp", "--npy", "x", "--json", "./sub/../x"],
        ["m.bp", "--json", "{link}/m.bp"],  # the same folder through a link
    ],
)
def test_compute_mean_refuses_two_outputs_with_one_name(
    db: Path, tmp_path: Path, names: list[str], monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to(tmp_path, target_is_directory=True)
    argv = [name.format(link=tmp_path / "link") for name in names]
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert main(["--no-progress", "compute-mean", str(db), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "named twice as an output" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


# --------------------------------------------------------------------------- the bounded read itself


def test_a_small_read_allocates_its_size_not_the_bound(tmp_path: Path) -> None:
    """read(n) allocates n bytes up front: asking for the 2 GiB bound cost 2 GiB per image read."""
    (tmp_path / "small.png").write_bytes(b"x" * 1000)
    tracemalloc.start()
    try:
        data = read_regular_file(tmp_path / "small.png", "image")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert data == b"x" * 1000
    assert peak < 1 << 20


def test_a_file_larger_than_its_stat_said_is_refused() -> None:
    """/proc files say 0 bytes and hold more: what a file growing during the read looks like."""
    with pytest.raises(
        UnsafeInputError, match=r"/proc/self/status: list file grew while being read \(it was 0 bytes\)"
    ):
        read_regular_file("/proc/self/status", "list file")


# --------------------------------------------------------------------------- decompression and scan bombs (issue 17)

_ADDRESS_SPACE = 2 << 30  # the CLI takes under 1 GiB of address space here; the TIFF bomb alone wanted 2 GB more


def _limited_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """``datumdb --no-progress ARGV`` in a process (and its children) limited to 2 GiB of address space."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (_ADDRESS_SPACE, _ADDRESS_SPACE))

    return subprocess.run(
        [sys.executable, "-m", "datumdb", "--no-progress", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
        check=False,
    )


@pytest.fixture(scope="module")
def bomb_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database another tool wrote (no manifest): good PNGs, the 18 KB TIFF bomb (8192x8192
    float64 RGBA, 2 GB) as record 1 and the 30 KB scan bomb (3,010 scans) as record 3."""
    good = encode_image(forged_png(8, 8), 0)
    path = tmp_path_factory.mktemp("bombs") / "db"
    path.mkdir()
    with lmdb.open(str(path), map_size=1 << 20) as env, env.begin(write=True) as txn:
        txn.put(b"00000000", good)
        txn.put(b"00000001", encode_image(tiff_bomb(), 1))
        txn.put(b"00000002", good)
        txn.put(b"00000003", encode_image(jpeg_scan_bomb(), 3))
        txn.put(b"00000004", good)
    (path / "lock.mdb").unlink()
    return path


def test_verify_names_every_bomb_record_and_fails(bomb_db: Path) -> None:
    result = _limited_cli("verify", "--timeout", "30", str(bomb_db))
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and "Insufficient memory" not in result.stderr
    assert any("key '00000001': cannot decode" in line and "bytes to decode, over the bound" in line for line in lines)
    assert any("key '00000003': cannot decode" in line and "scan bomb" in line for line in lines)
    assert lines[-1].endswith("FAILED (2 problem(s), 2 bad record(s))")


@pytest.mark.parametrize("command", ["compute-mean", "export"])
def test_compute_mean_and_export_stop_at_the_first_bomb_with_one_line(
    bomb_db: Path, tmp_path: Path, command: str
) -> None:
    out = tmp_path / ("mean.binaryproto" if command == "compute-mean" else "all.npz")
    result = _limited_cli(command, str(bomb_db), str(out))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "key '00000001': cannot decode" in lines[0] and "over the bound" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_the_reader_refuses_bombs_and_reads_the_rest(bomb_db: Path) -> None:
    with DatumReader(bomb_db) as reader:
        assert reader[0][0].shape == (3, 8, 8)
        with pytest.raises(DatumError, match=r"^key '00000001': .*TIFF header declares 8192x8192 pixels"):
            reader[1]
        with pytest.raises(DatumError, match=r"^key '00000003': .*scan bomb"):
            reader[3]
        with pytest.raises(DatumError, match=r"^key '00000001': "):
            reader.read_batch([0, 1])
        assert reader[4][1] == 0


@pytest.mark.parametrize("bomb", ["bomb.tif", "scan.jpg"])
def test_convert_imageset_refuses_bomb_files_with_one_line(tmp_path: Path, bomb: str) -> None:
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.png").write_bytes(forged_png(8, 8))
    (root / bomb).write_bytes(tiff_bomb() if bomb.endswith(".tif") else jpeg_scan_bomb())
    (tmp_path / "list.txt").write_text(f"a.png 0\n{bomb} 1\n")
    expected = "over the bound" if bomb.endswith(".tif") else "scan bomb"
    for options in ([], ["--workers", "2"], ["--encoded"]):
        result = _limited_cli("convert-imageset", *options, str(root), str(tmp_path / "list.txt"), str(tmp_path / "db"))
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and f"list.txt:2: {root / bomb}: " in lines[0] and expected in lines[0], lines
        assert not (tmp_path / "db").exists()
    skipping = _limited_cli(
        "convert-imageset", "--on-error", "skip", str(root), str(tmp_path / "list.txt"), str(tmp_path / "db")
    )
    assert skipping.returncode == 0, skipping.stderr
    [skipped] = read_manifest(tmp_path / "db")["metadata"]["skipped"]
    assert skipped["path"] == bomb and expected in skipped["reason"]
