"""datumdb.reader: the Caffe fixtures, the sequence protocol, batches, processes, read-only folders."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURE_LMDBS, folder_state, read_lmdb_items, resident_fraction

from datumdb import DatabaseWriter, DatumReader
from datumdb.codec import Datum, datum_to_array
from datumdb.errors import DatabaseNotFoundError
from datumdb.verify import content_digest, verify_database

SHAPE = (3, 5, 6)


def _build(path: Path, count: int = 20, *, dtype=np.uint8, encoding: str = "none", seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        images = rng.integers(0, 256, (count, *SHAPE), dtype=np.uint8)
    else:
        images = rng.normal(size=(count, *SHAPE)).astype(dtype)
    labels = rng.integers(-3, 100, count)
    with DatabaseWriter(path, encoding=encoding, batch_size=6) as writer:  # type: ignore[arg-type]
        for image, label in zip(images, labels, strict=True):
            writer.add(image, int(label))
    return images, labels


@pytest.fixture(scope="module")
def raw_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    path = tmp_path_factory.mktemp("reader") / "raw"
    images, labels = _build(path)
    return path, images, labels


# --------------------------------------------------------------------------- Caffe fixtures


@pytest.mark.parametrize("name", FIXTURE_LMDBS)
def test_reads_caffe_fixture(caffe_dir: Path, expected, name: str) -> None:
    facts = expected[name]
    folder = caffe_dir / name
    before = folder_state(folder)
    with DatumReader(folder) as reader:
        assert len(reader) == facts["num_entries"] == len(facts["entries"])
        keys = reader.keys()
        assert [k.decode() for k in keys] == [e["key"] for e in facts["entries"]]
        for entry, (key, value), (key2, datum) in zip(facts["entries"], reader.items(), reader.datums(), strict=True):
            assert key == key2 == bytes.fromhex(entry["key_hex"])
            assert hashlib.sha256(value).hexdigest() == entry["value_sha256"]
            assert len(value) == entry["value_len"]
            assert datum.label == entry["label"] == entry["list_label"]
            assert datum.encoded is entry["encoded"]
            assert hashlib.sha256(bytes(datum.data)).hexdigest() == entry["data_sha256"]
            array, label = reader[entry["index"]]
            assert label == entry["label"]
            if entry["encoded"]:
                assert datum.shape == (0, 0, 0)  # Caffe leaves the shape fields unset
                width, height = entry["decoded_size_wh"]
                assert array.shape == (3, height, width)
            else:
                assert array.shape == (entry["channels"], entry["height"], entry["width"])
                assert int(array.sum(dtype=np.int64)) == entry["data_sum"]
                for pixel in entry["pixels"]:
                    assert array[pixel["c"], pixel["h"], pixel["w"]] == pixel["value"]
    assert folder_state(folder) == before
    assert not (folder / "lock.mdb").exists()


def test_encoded_fixture_decodes_like_the_raw_one(caffe_dir: Path) -> None:
    """lmdb_jpg is the JPEG of lmdb_raw's resized images: close, not equal (max diff 52 per opencv_check)."""
    with DatumReader(caffe_dir / "lmdb_jpg") as jpg, DatumReader(caffe_dir / "lmdb_raw") as raw:
        diffs = [np.abs(a.astype(int) - b.astype(int)).max() for (a, _), (b, _) in zip(jpg, raw, strict=True)]
    assert max(diffs) == 52


def test_imread_modes_on_encoded_fixture(caffe_dir: Path) -> None:
    with DatumReader(caffe_dir / "lmdb_png", imread="gray") as reader:
        assert reader[0][0].shape == (1, 16, 20)
    with DatumReader(caffe_dir / "lmdb_png", imread="color") as reader:
        assert reader[0][0].shape == (3, 16, 20)


# --------------------------------------------------------------------------- sequence protocol


def test_len_index_slices_and_keys(raw_db) -> None:
    path, images, labels = raw_db
    with DatumReader(path) as reader:
        assert len(reader) == 20
        array, label = reader[3]
        np.testing.assert_array_equal(array, images[3])
        assert label == labels[3] and isinstance(label, int)
        assert array.dtype == np.uint8 and not array.flags.writeable
        np.testing.assert_array_equal(reader[-1][0], images[-1])
        np.testing.assert_array_equal(reader[-20][0], images[0])
        np.testing.assert_array_equal(reader[np.int64(5)][0], images[5])
        for bad in (20, -21, 10**6):
            with pytest.raises(IndexError, match="out of range"):
                reader[bad]
        for sl in (slice(2, 9, 3), slice(None, None, -4), slice(15, 100), slice(5, 2)):
            got = reader[sl]
            want = list(range(20))[sl]
            assert len(got) == len(want)
            for (array, label), i in zip(got, want, strict=True):
                np.testing.assert_array_equal(array, images[i])
                assert label == labels[i]
        assert reader.keys() == tuple(b"%08d" % i for i in range(20))
        assert reader.key(-1) == b"00000019"


def test_lookup_by_key(raw_db) -> None:
    path, images, labels = raw_db
    with DatumReader(path) as reader:
        for key in ("00000007", b"00000007"):
            array, label = reader.get(key)
            np.testing.assert_array_equal(array, images[7])
            assert label == labels[7]
            assert isinstance(reader.datum(key), Datum)
        assert reader.datum(7).label == labels[7]
        for missing in ("nope", b"00000020", "0000000"):
            with pytest.raises(KeyError, match=repr(missing if isinstance(missing, str) else missing.decode())):
                reader.get(missing)
            with pytest.raises(KeyError):
                reader.datum(missing)


def test_value_view_is_the_stored_value_without_a_copy_and_outlives_the_reader(raw_db) -> None:
    path, _, _ = raw_db
    reader = DatumReader(path)
    keys = reader.keys()
    views = {key: reader.value_view(key) for key in keys}
    values = {key: reader.value(key) for key in keys}
    assert all(isinstance(view, memoryview) and view.readonly for view in views.values())
    assert reader.value_view("00000003") == views[b"00000003"] == reader.value(b"00000003")  # str or bytes
    for missing in ("nope", b"00000020", b"", b"k" * 600):
        with pytest.raises(KeyError):
            reader.value_view(missing)
    reader.close()
    import gc

    gc.collect()  # the environment is closed now; each view holds the map it was cut from
    assert {key: bytes(view) for key, view in views.items()} == values


@pytest.mark.skipif(sys.platform != "linux", reason="mincore and posix_fadvise as Linux has them")
def test_prefetch_brings_a_file_the_cache_dropped_back_without_reading_it(tmp_path: Path) -> None:
    data = tmp_path / "db" / "data.mdb"
    with DatabaseWriter(tmp_path / "db") as writer:
        for i in range(600):
            writer.add(np.full((3, 64, 64), i % 251, np.uint8), i % 3)
    with DatumReader(tmp_path / "db") as reader:
        reader.pin()
        descriptor = os.open(data, os.O_RDONLY)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)  # as a machine reclaiming its cache
        os.close(descriptor)
        if resident_fraction(data) > 0.5:
            pytest.skip("this file system keeps the pages (tmpfs?): nothing to fetch")
        reader.prefetch()
        deadline = time.monotonic() + 10
        while resident_fraction(data) < 0.99 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert resident_fraction(data) >= 0.99
        assert reader.datum(599).label == 599 % 3


def test_lookup_of_keys_lmdb_cannot_hold_raises_key_error(raw_db) -> None:
    """No record can have an empty or a 600-byte key: a KeyError, not LMDB's BadValsizeError."""
    path, _, _ = raw_db
    with DatumReader(path) as reader:
        for impossible in (b"", "", b"k" * 600):
            with pytest.raises(KeyError):
                reader.get(impossible)


def test_iteration_datums_items_in_key_order(raw_db) -> None:
    path, images, labels = raw_db
    with DatumReader(path) as reader:
        iterated = list(reader)
        assert len(iterated) == 20
        for i, (array, label) in enumerate(iterated):
            np.testing.assert_array_equal(array, images[i])
            assert label == labels[i]
        datums = list(reader.datums())
        assert [k for k, _ in datums] == [b"%08d" % i for i in range(20)]
        assert [d.label for _, d in datums] == labels.tolist()
        items = list(reader.items())
    assert items == read_lmdb_items(path)
    for (_, datum), image in zip(datums, images, strict=True):  # still valid after the reader is closed
        np.testing.assert_array_equal(datum_to_array(datum), image)


def test_missing_database(tmp_path: Path) -> None:
    with pytest.raises(DatabaseNotFoundError):
        DatumReader(tmp_path)
    with pytest.raises(FileNotFoundError):
        DatumReader(tmp_path / "absent")


# --------------------------------------------------------------------------- read_batch

INDICES = [7, 0, 7, 19, 3, 3, 12, 1]


@pytest.mark.parametrize(("dtype", "encoding"), [(np.uint8, "none"), (np.float32, "none"), (np.uint8, "png")])
def test_read_batch_equals_item_reads(tmp_path: Path, dtype, encoding: str) -> None:
    path = tmp_path / "db"
    images, labels = _build(path, dtype=dtype, encoding=encoding)
    with DatumReader(path) as reader:
        batch, batch_labels = reader.read_batch(INDICES)
        assert batch.shape == (len(INDICES), *SHAPE)
        assert batch.dtype == (np.uint8 if dtype == np.uint8 else np.float32)
        assert batch_labels.dtype == np.int64
        for j, i in enumerate(INDICES):
            array, label = reader[i]
            np.testing.assert_array_equal(batch[j], array)
            np.testing.assert_array_equal(batch[j], images[i])  # png is lossless
            assert batch_labels[j] == label == labels[i]
        out = np.full((len(INDICES), *SHAPE), 99, dtype=batch.dtype)
        same, same_labels = reader.read_batch(np.array(INDICES), out=out)
        assert same is out
        np.testing.assert_array_equal(out, batch)
        np.testing.assert_array_equal(same_labels, batch_labels)
        with pytest.raises(IndexError):
            reader.read_batch([0, 20])
        with pytest.raises(ValueError):
            reader.read_batch(INDICES, out=np.empty((len(INDICES), 1, 5, 6), dtype=batch.dtype))


# --------------------------------------------------------------------------- environments and processes


def test_two_readers_on_one_path_in_one_process(raw_db) -> None:
    path, images, _ = raw_db
    first, second = DatumReader(path), DatumReader(str(path))
    try:
        np.testing.assert_array_equal(first[1][0], images[1])
        np.testing.assert_array_equal(second[2][0], images[2])
        first.close()
        np.testing.assert_array_equal(second[4][0], images[4])  # closing one leaves the other working
        np.testing.assert_array_equal(first[5][0], images[5])  # and a closed reader reopens
    finally:
        first.close()
        second.close()
    # both released: the environment is closed, so plain LMDB may open the path again
    assert len(read_lmdb_items(path)) == 20


def test_reader_opened_after_a_rebuild_sees_the_new_version(tmp_path: Path) -> None:
    """A reader created after the database was replaced must read the new version, even while an
    older reader of the same path (still holding the old environment) is open in the process."""
    path = tmp_path / "db"
    _build(path, count=3, seed=1)
    old = DatumReader(path)
    try:
        assert len(old) == 3
        new_images, _ = _build(tmp_path / "next", count=5, seed=2)
        with DatabaseWriter(path, overwrite=True) as writer:
            for image in new_images:
                writer.add(image, 0)
        with DatumReader(path) as fresh:
            assert fresh.manifest["count"] == 5
            assert len(fresh) == 5, "a new reader got the replaced database's stale environment"
            np.testing.assert_array_equal(fresh[4][0], new_images[4])
    finally:
        old.close()


def test_pickling_round_trip(raw_db) -> None:
    path, images, labels = raw_db
    with DatumReader(path, imread="gray") as reader:
        reader[0]  # opened before pickling: the handles must not travel
        clone = pickle.loads(pickle.dumps(reader))
    assert clone.path == path and clone.imread == "gray"
    with clone:
        assert len(clone) == 20
        np.testing.assert_array_equal(clone[9][0], images[9])
        assert clone[9][1] == labels[9]
    assert repr(clone) == f"DatumReader({str(path)!r})"


def _read_in_worker(args: tuple[DatumReader, int]) -> tuple[int, bytes, int, bytes, int]:
    reader, index = args
    array, label = reader[index]
    batch, _ = reader.read_batch([index, 0])
    return os.getpid(), array.tobytes(), label, batch.tobytes(), len(reader)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_reader_in_worker_processes(raw_db, method: str) -> None:
    path, images, labels = raw_db
    reader = DatumReader(path)
    try:
        parent = [reader[i] for i in range(len(reader))]  # used in the parent before the workers start
        with multiprocessing.get_context(method).Pool(2) as pool:
            results = pool.map(_read_in_worker, [(reader, i) for i in range(20)], chunksize=3)
        assert {pid for pid, *_ in results} - {os.getpid()}, "work must run in child processes"
        assert os.getpid() not in {pid for pid, *_ in results}
        for i, (_, data, label, batch, length) in enumerate(results):
            assert data == images[i].tobytes() == parent[i][0].tobytes()
            assert label == labels[i] == parent[i][1]
            assert batch == images[[i, 0]].tobytes()
            assert length == 20
        np.testing.assert_array_equal(reader[19][0], images[19])  # the parent's reader still works
    finally:
        reader.close()


# --------------------------------------------------------------------------- read-only folders


def test_heavy_reads_never_touch_the_folder(tmp_path: Path) -> None:
    path = tmp_path / "db"
    images, _ = _build(path, count=40)
    (path / "data.mdb").chmod(0o444)
    (path / "datumdb.json").chmod(0o444)
    path.chmod(0o555)
    try:
        before = folder_state(path)
        for _ in range(3):
            with DatumReader(path) as reader:
                assert len(list(reader)) == 40
                rng = np.random.default_rng(0)
                batch, batch_labels = reader.read_batch(rng.integers(0, 40, 200))
                assert batch_labels.shape == (200,)
                assert batch.shape == (200, *SHAPE)
                for i in rng.integers(-40, 40, 100):
                    np.testing.assert_array_equal(reader[int(i)][0], images[int(i)])
                assert reader.manifest["count"] == 40
        assert verify_database(path)["ok"]
        assert content_digest(path) == DatumReader(path).manifest["digest"]
        after = folder_state(path)
        assert after == before  # same files, same bytes, same mtimes
        assert sorted(after) == ["data.mdb", "datumdb.json"]
    finally:
        path.chmod(0o755)
