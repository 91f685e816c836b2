"""A reader is pinned to one version of a database: rebuilds, worker processes, threads, indices.

Every test rebuilds the database in place with ``DatabaseWriter(..., overwrite=True)`` (a new
folder exchanged over the old one, the way a pipeline rerun does it) while a reader is in use.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import random
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from datumdb import DatabaseWriter, DatumReader
from datumdb import reader as reader_module
from datumdb.errors import DatabaseChangedError, DatabaseNotFoundError, DatumDBError
from datumdb.fastpath import _VALIDATED_SAMPLE

SHAPE = (3, 4, 5)
COUNT = 200  # more records than the offset index's validation sample looks at
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _write(path: Path, images: np.ndarray, labels: np.ndarray, *, overwrite: bool = False) -> None:
    with DatabaseWriter(path, batch_size=64, overwrite=overwrite) as writer:
        for image, label in zip(images, labels, strict=True):
            writer.add(image, int(label))


def _versions(count: int = COUNT) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], int]:
    """Two versions that differ in one record only, one the validation sample never looks at."""
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (count, *SHAPE), dtype=np.uint8)
    labels = rng.integers(0, 10, count)
    sampled = {0, count - 1, *random.Random(count).sample(range(count), min(count, _VALIDATED_SAMPLE))}
    changed = next((i for i in range(count) if i not in sampled), count // 2)  # small: all sampled
    new_images, new_labels = images.copy(), labels.copy()
    new_images[changed] = 255 - images[changed]
    new_labels[changed] = labels[changed] + 10
    return (images, labels), (new_images, new_labels), changed


def _fds_to(identity: tuple[int, int]) -> int:
    """Descriptors this process holds on the file with this (device, inode), deleted or not."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            stat = os.stat(f"/proc/self/fd/{name}")
        except OSError:  # the listing's own descriptor, closed by now
            continue
        count += (stat.st_dev, stat.st_ino) == identity
    return count


def _open_versions(identity: tuple[int, int]) -> int:
    """1 while this process has the file open as a pinned version (its environment included)."""
    return int(identity in reader_module._FILES or identity in reader_module._OPEN)


def _assert_reads(reader: DatumReader, images: np.ndarray, labels: np.ndarray) -> None:
    """Every way of reading gives exactly this version."""
    assert len(reader) == len(images)
    assert reader.keys() == tuple(b"%08d" % i for i in range(len(images)))
    for i in range(len(images)):
        array, label = reader[i]
        assert np.array_equal(array, images[i]) and label == labels[i], f"record {i}"
    everything = np.arange(len(images))
    batch, batch_labels = reader.read_batch(everything[::-1])
    assert np.array_equal(batch, images[::-1]) and np.array_equal(batch_labels, labels[::-1])
    iterated = list(reader)
    assert np.array_equal(np.stack([a for a, _ in iterated]), images)
    assert [label for _, label in iterated] == labels.tolist()
    assert [d.label for _, d in reader.datums()] == labels.tolist()


# --------------------------------------------------------------------------- one process


@pytest.mark.parametrize("first_use", ["len", "item", "batch", "iterate", "manifest", "index"])
def test_reads_after_an_in_place_rebuild_all_come_from_the_pinned_version(tmp_path: Path, first_use: str) -> None:
    (images, labels), (new_images, new_labels), changed = _versions()
    path = tmp_path / "db"
    _write(path, images, labels)
    reader = DatumReader(path)
    if first_use == "len":  # the offset index is built after the rebuild: the reported case
        assert len(reader) == COUNT
    elif first_use == "item":
        reader[changed]
    elif first_use == "batch":
        reader.read_batch([changed, 0])
    elif first_use == "iterate":
        next(iter(reader))
    elif first_use == "index":  # single reads through the offset index before the rebuild
        assert reader.build_index()
        assert reader[changed][1] == labels[changed]
    else:
        assert reader.manifest["count"] == COUNT
    pinned = reader.version
    old_digest = reader.manifest["digest"]
    _write(path, new_images, new_labels, overwrite=True)

    with DatumReader(path) as fresh:  # the rebuild really replaced that one record
        assert fresh.version != pinned and fresh.manifest["digest"] != old_digest
        _assert_reads(fresh, new_images, new_labels)
    _assert_reads(reader, images, labels)
    assert reader.version == pinned and reader.manifest["digest"] == old_digest
    reader.close()


@pytest.mark.parametrize("indexed", [False, True])
def test_a_closed_reader_reopens_its_version_or_raises(tmp_path: Path, indexed: bool) -> None:
    (images, labels), (new_images, new_labels), changed = _versions()
    path = tmp_path / "db"
    _write(path, images, labels)
    reader = DatumReader(path).pin()
    if indexed:  # single reads on the fast path: closing must end it too
        assert reader.build_index() and reader[changed][1] == labels[changed]
    reader.close()
    assert reader[changed][1] == labels[changed]  # nothing changed: reopens the same file
    if indexed:
        assert reader.build_index()
        kept, _ = reader[changed]
    reader.close()
    _write(path, new_images, new_labels, overwrite=True)
    for use in (len, lambda r: r[0], lambda r: r.read_batch([0]), list, lambda r: r.manifest):
        with pytest.raises(DatabaseChangedError, match=f"{path}.*replaced after this reader pinned"):
            use(reader)
    if indexed:  # an array read before the close is a view of the old version's map, still valid
        assert np.array_equal(kept, images[changed])


def test_the_replaced_version_is_released_when_its_last_reader_closes(tmp_path: Path) -> None:
    (images, labels), (new_images, new_labels), _ = _versions()
    path = tmp_path / "db"
    _write(path, images, labels)
    first, second = DatumReader(path), DatumReader(path)
    first.read_batch([0, 1])  # environment, map and offset index
    second[5]
    old = (first.version.device, first.version.inode)
    assert second.version == first.version and _open_versions(old) == 1
    assert _fds_to(old) == 2  # LMDB's descriptor and the offset index's map: one version, shared
    _write(path, new_images, new_labels, overwrite=True)
    iterator = iter(first)
    next(iterator)
    first.close()
    second.close()
    assert _fds_to(old) == 2, "an iteration in progress keeps its version open"
    assert len(list(iterator)) == COUNT - 1
    assert _fds_to(old) == 0 and _open_versions(old) == 0  # the old file's space can be freed


def test_without_fd_paths_the_path_is_opened_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Systems without /proc/self/fd or /dev/fd open the environment by path, then check the file."""
    (images, labels), (new_images, new_labels), _ = _versions(30)
    monkeypatch.setattr(reader_module, "_FD_DIR", None)
    path = tmp_path / "db"
    _write(path, images, labels)
    with DatumReader(path) as reader:
        _assert_reads(reader, images, labels)
        _write(path, new_images, new_labels, overwrite=True)
        _assert_reads(reader, images, labels)


def test_a_database_without_manifest_pins_by_file_and_reports_the_missing_manifest(caffe_dir: Path) -> None:
    with DatumReader(caffe_dir / "lmdb_raw") as reader:
        assert reader.version.digest is None and len(reader) == 12
        for _ in range(2):  # the error seen at pin time, raised afresh on each request
            with pytest.raises(DatabaseNotFoundError, match="no manifest"):
                _ = reader.manifest
        assert reader.decode_mode == "unchanged"


def test_a_file_changed_in_place_under_an_open_version_is_refused(tmp_path: Path) -> None:
    """Databases are replaced whole; an in-place change is not a version any reader can trust."""
    images, labels = _versions(30)[0]
    path = tmp_path / "db"
    _write(path, images, labels)
    with DatumReader(path) as reader:
        pinned = reader.version
        os.utime(path / "data.mdb", ns=(pinned.mtime_ns + 10**9, pinned.mtime_ns + 10**9))
        with pytest.raises(DatabaseChangedError, match="modified in place"):
            len(DatumReader(path))
        assert reader[3][1] == labels[3] and reader.version == pinned


def test_a_path_that_keeps_changing_while_opening_gives_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = _versions(30)[0]
    path = tmp_path / "db"
    _write(path, images, labels)
    monkeypatch.setattr(reader_module, "_identity", lambda folder: (0, 0))  # never the file just opened
    with pytest.raises(DatabaseChangedError, match="replaced 5 times while being opened"):
        len(DatumReader(path))


# --------------------------------------------------------------------------- worker processes


def _read_all(reader: DatumReader) -> tuple[int, bytes, bytes, bytes]:
    batch, labels = reader.read_batch(np.arange(len(reader)))
    return len(reader), batch.tobytes(), labels.tobytes(), np.stack([a for a, _ in reader]).tobytes()


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_pinned_reader_in_a_worker_after_a_rebuild_raises(tmp_path: Path, method: str) -> None:
    (images, labels), (new_images, new_labels), _ = _versions()
    path = tmp_path / "db"
    _write(path, images, labels)
    reader = DatumReader(path)
    assert len(reader) == COUNT  # pinned in the parent
    unused = DatumReader(path)  # never used: not pinned, pins in the worker
    with multiprocessing.get_context(method).Pool(1) as pool:
        assert pool.apply(_read_all, (reader,)) == _read_all(reader)  # same version: same bytes
        _write(path, new_images, new_labels, overwrite=True)
        with pytest.raises(DatabaseChangedError, match="replaced after this reader pinned"):
            pool.apply(_read_all, (reader,))
        count, batch, batch_labels, iterated = pool.apply(_read_all, (unused,))
    assert count == COUNT and batch == iterated == new_images.tobytes()
    assert batch_labels == new_labels.astype(np.int64).tobytes()
    _assert_reads(reader, images, labels)  # the parent still reads its version
    clone = pickle.loads(pickle.dumps(reader))  # the pickle carries the version, not handles
    assert clone.path == path and clone._pin is None
    with pytest.raises(DatabaseChangedError):
        len(clone)
    reader.close()


def _inherited(reader: DatumReader, results: multiprocessing.queues.Queue) -> None:
    try:
        results.put(("read", _read_all(reader)[0]))
    except DatumDBError as exc:
        results.put((type(exc).__name__, str(exc)))


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("indexed", [False, True])
def test_a_forked_child_that_inherits_a_pinned_reader_raises_after_a_rebuild(tmp_path: Path, indexed: bool) -> None:
    """fork passes Process arguments by memory, not by pickle: the same rule must hold.

    Also when the parent built the offset index, which the child inherits with the map.
    """
    (images, labels), (new_images, new_labels), _ = _versions(30)
    path = tmp_path / "db"
    _write(path, images, labels)
    reader = DatumReader(path).pin()
    if indexed:
        assert reader.build_index()
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    outcomes = []
    for rebuild in (False, True):
        if rebuild:
            _write(path, new_images, new_labels, overwrite=True)
        child = context.Process(target=_inherited, args=(reader, results))
        child.start()
        outcomes.append(results.get(timeout=60))
        child.join(60)
        assert child.exitcode == 0
    assert outcomes[0] == ("read", 30)
    assert outcomes[1][0] == "DatabaseChangedError" and str(path) in outcomes[1][1]
    reader.close()


# --------------------------------------------------------------------------- threads

_CLOSE_WHILE_READING = """
import sys, threading
import numpy as np
from datumdb import DatumReader
from datumdb.reader import _FILES, _OPEN

path, closes = sys.argv[1], int(sys.argv[2])
reader = DatumReader(path)
expected = [label for _, label in reader]
identity = (reader.version.device, reader.version.inode)
errors, rounds = [], []
started = threading.Semaphore(0)
stop = threading.Event()

def read(kind):
    done = 0
    try:
        while not stop.is_set() and done < 100_000:  # bounded even if the main thread dies
            if kind == "iterate":
                got = [label for _, label in reader]
            elif kind == "batch":
                got = reader.read_batch(np.arange(len(expected)))[1].tolist()
            else:
                got = [reader[i][1] for i in range(len(expected))]
            if got != expected:
                errors.append(f"{kind}: wrong labels")
            done += 1
            if done == 1:
                started.release()
    except Exception as exc:
        errors.append(f"{kind}: {exc!r}")
        started.release()
    rounds.append(done)

threads = [threading.Thread(target=read, args=(kind,)) for kind in ("iterate", "batch", "item") * 2]
for thread in threads:
    thread.start()
for thread in threads:
    started.acquire()  # every thread is reading in its loop
for _ in range(closes):
    reader.close()
    stop.wait(0.0002)  # let the readers run between closes
stop.set()
for thread in threads:
    thread.join()
reader.close()
assert not errors, errors
assert min(rounds) >= 1, rounds
assert identity not in _FILES and identity not in _OPEN, "environment still open after every reader closed"
print("ok", sum(rounds))
"""


def test_closing_while_other_threads_read_never_crashes(tmp_path: Path) -> None:
    """Run in a subprocess: a segfault must fail this test, not kill pytest."""
    images, labels = _versions(120)[0]
    _write(tmp_path / "db", images, labels)
    script = tmp_path / "close_while_reading.py"
    script.write_text(textwrap.dedent(_CLOSE_WHILE_READING))
    for trial in range(3):
        result = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "db"), "500"],
            env={**os.environ, "PYTHONPATH": SRC},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, f"trial {trial}: exit {result.returncode}\n{result.stderr[-2000:]}"
        assert result.stdout.split()[0] == "ok"


def _first_use(reader: DatumReader, index: int, barrier: threading.Barrier, seen: list[tuple]) -> None:
    barrier.wait()  # all eight threads reach the reader's first use together
    seen.append((len(reader), reader[index][1], reader.read_batch([index])[1][0], reader.version))


@pytest.mark.parametrize("shared", [True, False], ids=["one-reader", "eight-readers"])
def test_concurrent_first_use_from_eight_threads_leaves_nothing_open(tmp_path: Path, shared: bool) -> None:
    images, labels = _versions(30)[0]
    path = tmp_path / "db"
    _write(path, images, labels)
    with DatumReader(path) as probe:
        identity = (probe.version.device, probe.version.inode)
    assert _fds_to(identity) == 0
    for trial in range(20):
        readers = [DatumReader(path)] * 8 if shared else [DatumReader(path) for _ in range(8)]
        barrier = threading.Barrier(8)
        seen: list[tuple] = []
        threads = [threading.Thread(target=_first_use, args=(r, i, barrier, seen)) for i, r in enumerate(readers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(seen) == 8, f"trial {trial}: a thread failed"
        assert {s[3] for s in seen} == {readers[0].version}
        assert sorted(s[1] for s in seen) == sorted(s[2] for s in seen) == sorted(labels[:8].tolist())
        assert _open_versions(identity) == 1 and _fds_to(identity) == 2  # one environment, one map
        for reader in readers:
            reader.close()
        assert _open_versions(identity) == 0 and _fds_to(identity) == 0, f"trial {trial}: left open"


# --------------------------------------------------------------------------- index types


@pytest.mark.parametrize("indexed", [False, True])
def test_indices_must_be_integers(tmp_path: Path, indexed: bool) -> None:
    images, labels = _versions(30)[0]
    path = tmp_path / "db"
    _write(path, images, labels)
    with DatumReader(path) as reader:
        assert not indexed or reader.build_index()  # the single-read fast path, or not
        for bad in (30, -31, 2**64, np.int64(30), np.uint64(2**64 - 1)):
            with pytest.raises(IndexError, match=f"{path}: index {bad} out of range for 30 records"):
                reader[bad]
        for good in (2, np.int8(2), np.uint16(2), np.int64(2), np.array(2), -28):
            array, label = reader[good]
            assert np.array_equal(array, images[2]) and label == labels[2], repr(good)
            assert reader.key(good) == b"00000002" and reader.datum(good).label == labels[2]
        for bad in ("00000020", b"00000020", 2.9, 2.0, np.float64(2), True, False, np.bool_(True), None, [2]):
            for use in (lambda i: reader[i], reader.key, reader.datum):
                if isinstance(bad, (str, bytes)) and use == reader.datum:
                    continue  # datum() looks strings and bytes up as keys
                with pytest.raises(TypeError, match=f"{path}: record indices must be integers"):
                    use(bad)
        with pytest.raises(TypeError, match="get\\(\\)"):
            reader["00000020"]
        assert reader.datum("00000020").label == labels[20]  # by key, where keys are meant
        batch, batch_labels = reader.read_batch(np.array([2, -1], dtype=np.int16))
        assert np.array_equal(batch, images[[2, -1]]) and np.array_equal(batch_labels, labels[[2, -1]])
        assert np.array_equal(reader.read_batch(np.array([29, 3], dtype=np.uint64))[0], images[[29, 3]])
        for bad in ([2.9], np.array([1.0]), ["3"], [True, False], np.array([True])):
            with pytest.raises(TypeError, match="record indices must be integers"):
                reader.read_batch(bad)
        with pytest.raises(IndexError, match="out of range"):
            reader.read_batch(np.array([2**64 - 1], dtype=np.uint64))  # not wrapped to -1


# --------------------------------------------------------------------------- one file, two folders


def _hardlinked_color_and_gray(caffe_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """``--encoded`` and ``--encoded --gray`` of the same PNGs: byte-identical data.mdb, two
    manifests; then one inode, as DVC's hardlink cache (``dvc checkout --relink``) leaves them."""
    from datumdb.cli import main

    color, gray = tmp_path / "color", tmp_path / "gray"
    for db, flags in ((color, []), (gray, ["--gray"])):
        root = str(caffe_dir / "images") + "/"
        assert (
            main(["--no-progress", "convert-imageset", root, str(caffe_dir / "list.txt"), str(db), "--encoded", *flags])
            == 0
        )
    assert (color / "data.mdb").read_bytes() == (gray / "data.mdb").read_bytes()
    (gray / "data.mdb").unlink()
    os.link(color / "data.mdb", gray / "data.mdb")
    assert (color / "data.mdb").stat().st_ino == (gray / "data.mdb").stat().st_ino
    return color, gray


def _what_each_reads(readers: tuple[DatumReader, DatumReader]) -> list[tuple[int, str, str, int, int]]:
    """Per reader: channels of record 0, decode mode, the manifest's channel order, and the
    channels of every record through a batch and through iteration (one value when all agree)."""
    seen = []
    for reader in readers:
        channels = {array.shape[0] for array, _ in reader} | {reader[i][0].shape[0] for i in range(len(reader))}
        assert len(channels) == 1, channels
        seen.append(
            (reader[0][0].shape[0], reader.decode_mode, reader.manifest["channel_order"], channels.pop(), len(reader))
        )
    return seen


def test_two_folders_sharing_one_data_mdb_each_read_with_their_own_manifest(caffe_dir: Path, tmp_path: Path) -> None:
    color, gray = _hardlinked_color_and_gray(caffe_dir, tmp_path)
    for order in ((color, gray), (gray, color)):  # whichever is opened first
        readers = tuple(DatumReader(path) for path in order)
        assert readers[0].version.inode == readers[1].version.inode  # one file, one environment
        seen = dict(zip(order, _what_each_reads(readers), strict=True))
        assert seen[color][:2] == (3, "color") and seen[color][3] == 3, seen
        assert seen[gray][:2] == (1, "gray") and seen[gray][3] == 1, seen
        assert seen[color][2] != seen[gray][2]
        assert readers[0].manifest != readers[1].manifest
        for reader in readers:
            reader.close()


def _read_pickled(readers: tuple[DatumReader, DatumReader]) -> list[tuple[int, str, str, int, int]]:
    return _what_each_reads(readers)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_two_folders_sharing_one_data_mdb_keep_their_manifests_in_workers(
    caffe_dir: Path, tmp_path: Path, method: str
) -> None:
    color, gray = _hardlinked_color_and_gray(caffe_dir, tmp_path)
    readers = (DatumReader(color).pin(), DatumReader(gray).pin())
    here = _what_each_reads(readers)  # both open in the parent: a fork inherits both pins of one file
    with multiprocessing.get_context(method).Pool(1) as pool:
        there = pool.apply(_read_pickled, (readers,))
        flipped = pool.apply(_read_pickled, ((readers[1], readers[0]),))
    assert there == here and flipped == here[::-1]
    assert here[0][:2] == (3, "color") and here[1][:2] == (1, "gray")
