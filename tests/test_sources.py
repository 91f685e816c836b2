"""datumdb.sources: convert-arrays (layouts, channel order, gray, floats, encodings, bad input)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import leftovers, read_lmdb_items

import datumdb.sources
from datumdb import DatumReader
from datumdb.cli import main
from datumdb.codec import decode
from datumdb.errors import InputError
from datumdb.manifest import read_manifest
from datumdb.pipeline.config import to_config, validate_params
from datumdb.pipeline.sources import open_source
from datumdb.sources import convert_arrays, iter_array_samples, load_labels


def _save(tmp_path: Path, images: np.ndarray, labels, name: str = "X") -> tuple[Path, Path]:
    x, y = tmp_path / f"{name}.npy", tmp_path / f"{name}_labels.npy"
    np.save(x, images)
    np.save(y, np.asarray(labels))
    return x, y


def _cli(x: Path, y: Path, db: Path, *flags: str) -> int:
    return main(["--no-progress", "convert-arrays", str(x), str(y), str(db), *flags])


@pytest.fixture()
def chw(tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    return rng.integers(0, 256, (9, 3, 5, 7), dtype=np.uint8), rng.integers(-4, 40, 9)


def test_chw_and_hwc_layouts_give_the_same_database(tmp_path: Path, chw) -> None:
    images, labels = chw
    x1, y = _save(tmp_path, images, labels, "chw")
    x2, _ = _save(tmp_path, np.ascontiguousarray(images.transpose(0, 2, 3, 1)), labels, "hwc")
    assert _cli(x1, y, tmp_path / "a") == 0
    assert _cli(x2, y, tmp_path / "b", "--layout", "hwc") == 0
    assert read_lmdb_items(tmp_path / "a") == read_lmdb_items(tmp_path / "b")
    assert read_manifest(tmp_path / "a")["digest"] == read_manifest(tmp_path / "b")["digest"]
    with DatumReader(tmp_path / "b") as reader:
        assert len(reader) == 9
        for i, (array, label) in enumerate(reader):
            np.testing.assert_array_equal(array, images[i])
            assert label == labels[i]
    manifest = read_manifest(tmp_path / "b")
    assert manifest["channel_order"] == "as given" and manifest["shapes"] == {"3x5x7": 9}
    assert manifest["metadata"]["layout"] == "hwc"


def test_bgr_from_rgb_reverses_channels(tmp_path: Path, chw) -> None:
    images, labels = chw
    x, y = _save(tmp_path, images, labels)
    assert _cli(x, y, tmp_path / "db", "--bgr-from-rgb") == 0
    with DatumReader(tmp_path / "db") as reader:
        for i, (array, _) in enumerate(reader):
            np.testing.assert_array_equal(array, images[i, ::-1])
    assert read_manifest(tmp_path / "db")["channel_order"] == "BGR"
    x2, _ = _save(tmp_path, np.ascontiguousarray(images.transpose(0, 2, 3, 1)), labels, "hwc")
    assert _cli(x2, y, tmp_path / "db2", "--bgr-from-rgb", "--layout", "hwc") == 0
    assert read_lmdb_items(tmp_path / "db") == read_lmdb_items(tmp_path / "db2")


def test_gray_images(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 6), dtype=np.uint8)
    x, y = _save(tmp_path, images, np.arange(5))
    assert _cli(x, y, tmp_path / "db") == 0
    with DatumReader(tmp_path / "db") as reader:
        for i, (array, label) in enumerate(reader):
            assert array.shape == (1, 4, 6)
            np.testing.assert_array_equal(array[0], images[i])
            assert label == i
    manifest = read_manifest(tmp_path / "db")
    assert manifest["channel_order"] == "gray" and manifest["shapes"] == {"1x4x6": 5}
    with pytest.raises(InputError, match="3-channel"):
        convert_arrays(x, y, tmp_path / "bgr", bgr_from_rgb=True, progress=False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
def test_float_arrays_become_float_data_read_back_exactly(tmp_path: Path, dtype) -> None:
    rng = np.random.default_rng(4)
    images = (rng.normal(size=(6, 2, 3, 3)) * 1000).astype(dtype)
    x, y = _save(tmp_path, images, np.zeros(6, dtype=np.int32))
    assert _cli(x, y, tmp_path / "db") == 0
    for _, value in read_lmdb_items(tmp_path / "db"):
        datum = decode(value)
        assert len(datum.data) == 0 and datum.float_data.size == 18
    with DatumReader(tmp_path / "db") as reader:
        batch, labels = reader.read_batch(range(6))
    assert labels.tolist() == [0] * 6
    assert batch.dtype == np.float32
    assert np.array_equal(batch, images.astype(np.float32))
    assert read_manifest(tmp_path / "db")["dtype"] == "float32"


def test_png_encoding_round_trips_exactly(tmp_path: Path, chw) -> None:
    images, labels = chw
    x, y = _save(tmp_path, images, labels)
    assert _cli(x, y, tmp_path / "db", "--encode", "png") == 0
    for _, value in read_lmdb_items(tmp_path / "db"):
        datum = decode(value)
        assert datum.encoded and bytes(datum.data[:4]) == b"\x89PNG" and datum.shape == (3, 5, 7)
    with DatumReader(tmp_path / "db") as reader:
        batch, got_labels = reader.read_batch(np.arange(9))
    np.testing.assert_array_equal(batch, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert read_manifest(tmp_path / "db")["encoding"] == "png"
    assert _cli(x, y, tmp_path / "jpg", "--encode", "jpg") == 0
    with DatumReader(tmp_path / "jpg") as reader:
        assert reader[0][0].shape == (3, 5, 7)
        assert bytes(reader.datum(0).data[:2]) == b"\xff\xd8"


def test_many_chunks_stream_correctly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny chunk size makes the mmap walk (and its page dropping) cover many chunks."""
    monkeypatch.setattr(datumdb.sources, "CHUNK_BYTES", 5000)
    images = np.random.default_rng(8).integers(0, 256, (40, 3, 16, 16), dtype=np.uint8)
    x, y = _save(tmp_path, images, np.arange(40) % 7)
    convert_arrays(x, y, tmp_path / "db", batch_size=9, progress=False)
    with DatumReader(tmp_path / "db") as reader:
        batch, labels = reader.read_batch(np.arange(40))
    np.testing.assert_array_equal(batch, images)
    np.testing.assert_array_equal(labels, np.arange(40) % 7)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.arange(8), "8 labels for 9 images"),
        (np.arange(10), "10 labels for 9 images"),
        (np.arange(9, dtype=np.float64), "must be integers"),
        (np.ones(9, dtype=bool), "must be integers"),
        (np.arange(9).reshape(3, 3), "1-D"),
        (np.array([0] * 4 + [2**31] + [0] * 4, dtype=np.int64), "label 2147483648 at index 4 is outside int32"),
        (np.array([0] * 8 + [-(2**31) - 1], dtype=np.int64), "at index 8 is outside int32"),
        (np.array([0] * 8 + [2**63], dtype=np.uint64), "outside int32"),
    ],
)
def test_bad_labels(tmp_path: Path, chw, labels: np.ndarray, message: str, capsys) -> None:
    x, y = _save(tmp_path, chw[0], labels)
    with pytest.raises(InputError, match=message):
        convert_arrays(x, y, tmp_path / "db", progress=False)
    capsys.readouterr()
    assert _cli(x, y, tmp_path / "db") == 2
    err = capsys.readouterr().err
    assert err.startswith("datumdb convert-arrays: error:") and str(y) in err and message.split()[0] in err
    assert not (tmp_path / "db").exists() and leftovers(tmp_path / "db") == []


def test_int32_limit_labels_are_accepted(tmp_path: Path, chw) -> None:
    labels = np.array([-(2**31), 2**31 - 1, 0, 0, 0, 0, 0, 0, 0], dtype=np.int64)
    x, y = _save(tmp_path, chw[0], labels)
    convert_arrays(x, y, tmp_path / "db", progress=False)
    assert [decode(v).label for _, v in read_lmdb_items(tmp_path / "db")][:2] == [-(2**31), 2**31 - 1]
    assert load_labels(y).dtype == np.int64


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_images_name_the_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: float) -> None:
    monkeypatch.setattr(datumdb.sources, "CHUNK_BYTES", 2 * 4 * 2 * 3 * 3)  # two rows per chunk
    images = np.zeros((9, 2, 3, 3), dtype=np.float32)
    images[7, 1, 2, 0] = bad
    x, y = _save(tmp_path, images, np.zeros(9, np.int64))
    with pytest.raises(InputError, match=r"image 7 contains NaN or infinity"):
        convert_arrays(x, y, tmp_path / "db", progress=False)
    assert not (tmp_path / "db").exists() and leftovers(tmp_path / "db") == []


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((4, 5), np.uint8), "got shape"),
        (np.zeros((2, 1, 3, 4, 5), np.uint8), "got shape"),
        (np.zeros((2, 3, 0, 4), np.uint8), "empty dimension"),
        (np.zeros((2, 3, 4), bool), "dtype"),
        (np.zeros((2, 3, 4), np.complex64), "dtype"),
    ],
)
def test_bad_images(tmp_path: Path, images: np.ndarray, message: str) -> None:
    x, y = _save(tmp_path, images, np.zeros(len(images), np.int64))
    with pytest.raises(InputError, match=message):
        convert_arrays(x, y, tmp_path / "db", progress=False)
    assert not (tmp_path / "db").exists()


def test_missing_and_unreadable_files(tmp_path: Path, chw) -> None:
    x, y = _save(tmp_path, chw[0], chw[1])
    with pytest.raises(InputError, match="images file not found"):
        convert_arrays(tmp_path / "absent.npy", y, tmp_path / "db", progress=False)
    with pytest.raises(InputError, match="labels file not found"):
        convert_arrays(x, tmp_path / "absent.npy", tmp_path / "db", progress=False)
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(InputError, match=r"not a readable \.npy"):
        convert_arrays(tmp_path / "junk.npy", y, tmp_path / "db", progress=False)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}] * 9, dtype=object), allow_pickle=True)
    with pytest.raises(InputError):
        convert_arrays(x, tmp_path / "objects.npy", tmp_path / "db", progress=False)
    assert not (tmp_path / "db").exists()


def test_iter_array_samples_reports_count_and_shape(tmp_path: Path, chw) -> None:
    x, _ = _save(tmp_path, np.ascontiguousarray(chw[0].transpose(0, 2, 3, 1)), chw[1])
    count, shape, samples = iter_array_samples(x, layout="hwc", bgr_from_rgb=True)
    assert (count, shape) == (9, (3, 5, 7))
    first = next(samples)
    np.testing.assert_array_equal(first, chw[0][0, ::-1])
    with pytest.raises(InputError, match="layout"):
        iter_array_samples(x, layout="whc")  # type: ignore[arg-type]


def test_arrays_pipeline_source_matches_convert_arrays(tmp_path: Path, chw) -> None:
    images, labels = chw
    np.save(tmp_path / "X.npy", np.ascontiguousarray(images.transpose(0, 2, 3, 1)))
    np.save(tmp_path / "y.npy", labels)

    def dataset(**arrays: object):
        params = {"dataset": {"source": "arrays", "input_dir": str(tmp_path), "arrays": arrays}}
        return to_config(validate_params(params)).dataset

    source = open_source(dataset(layout="hwc", bgr_from_rgb=True), 0)
    assert (source.count, source.shape, source.channel_order) == (9, (3, 5, 7), "BGR")
    got, got_labels = source.read(2, 6)
    np.testing.assert_array_equal(got, images[2:6, ::-1])
    np.testing.assert_array_equal(got_labels, labels[2:6])
    floats = np.zeros((5, 1, 2, 2), np.float64)
    floats[3, 0, 1, 1] = np.nan
    np.save(tmp_path / "F.npy", floats)
    np.save(tmp_path / "Fy.npy", np.zeros(5, np.int64))
    float_source = open_source(dataset(images="F.npy", labels="Fy.npy"), 0)
    assert float_source.read(0, 3)[0].dtype == np.float32
    with pytest.raises(InputError, match="image 3 contains NaN"):
        float_source.read(2, 5)
