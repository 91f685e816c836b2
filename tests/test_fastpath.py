"""The fast read paths must return exactly what the general decoder returns, or step aside."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import read_lmdb_items

from datumdb import DatabaseWriter, DatumReader
from datumdb.codec import RawLayout, datum_to_array, decode, encode_array

LABELS = [0, 1, 127, 128, 300, 2**31 - 1, -1, -(2**31), 5]  # 1-, 2-, 5- and 10-byte varints


def _plain(path: Path) -> list[tuple[np.ndarray, int]]:
    """Every record through the general parser, straight from LMDB."""
    return [
        (datum_to_array(decode(value, key), key=key), decode(value, key).label) for key, value in read_lmdb_items(path)
    ]


def _build(path: Path, arrays: list[np.ndarray], labels: list[int], **options) -> Path:
    with DatabaseWriter(path, **options) as writer:
        for array, label in zip(arrays, labels, strict=True):
            writer.add(array, label)
    return path


def _check_reader_equals_plain(path: Path, expect_index: bool) -> None:
    plain = _plain(path)
    rng = np.random.default_rng(0)
    indices = rng.integers(-len(plain), len(plain), 40)
    with DatumReader(path) as reader:
        assert (reader._offset_index() is not None) is expect_index
        for i, (array, label) in enumerate(plain):
            got, got_label = reader[i]
            assert got_label == label and got.dtype == array.dtype and np.array_equal(got, array)
        if len({a.shape for a, _ in plain}) == 1:
            batch, labels = reader.read_batch(indices)
            for row, index in enumerate(indices):
                assert np.array_equal(batch[row], plain[index][0]) and labels[row] == plain[index][1]


def test_uniform_raw_database_uses_the_offset_index_and_matches(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (3, 32, 32), dtype=np.uint8) for _ in range(300)]
    labels = [LABELS[i % len(LABELS)] for i in range(300)]
    _check_reader_equals_plain(_build(tmp_path / "db", arrays, labels, batch_size=17), expect_index=True)


def test_small_values_stored_inside_leaf_pages_also_match(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    arrays = [rng.integers(0, 256, (1, 4, 5), dtype=np.uint8) for _ in range(500)]
    labels = [LABELS[i % len(LABELS)] for i in range(500)]
    _check_reader_equals_plain(_build(tmp_path / "db", arrays, labels), expect_index=True)


def test_caffe_made_raw_database_uses_the_offset_index(caffe_dir: Path) -> None:
    for name in ("lmdb_raw", "lmdb_gray"):
        _check_reader_equals_plain(caffe_dir / name, expect_index=True)


@pytest.mark.parametrize("kind", ["float", "png", "mixed"])
def test_other_databases_fall_back_and_still_match(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(3)
    if kind == "float":
        arrays = [rng.random((2, 3, 3)).astype(np.float32) for _ in range(20)]
        options = {}
    elif kind == "png":
        arrays = [rng.integers(0, 256, (3, 6, 5), dtype=np.uint8) for _ in range(20)]
        options = {"encoding": "png"}
    else:  # raw, but two shapes: no single layout
        arrays = [rng.integers(0, 256, (3, 4, 4) if i % 3 else (3, 5, 4), dtype=np.uint8) for i in range(20)]
        options = {}
    path = _build(tmp_path / "db", arrays, [LABELS[i % len(LABELS)] for i in range(20)], **options)
    _check_reader_equals_plain(path, expect_index=False)


def test_raw_layout_rejects_anything_but_its_exact_layout() -> None:
    image = np.arange(12, dtype=np.uint8).reshape(1, 3, 4)
    layout = RawLayout.of(encode_array(image, 7))
    assert layout is not None and layout.shape == (1, 3, 4)
    assert layout.label(encode_array(image, -5)) == -5
    value = bytearray(encode_array(image, 7))
    value[-1] = 1  # encoded=true
    assert layout.label(bytes(value)) is None
    assert layout.label(encode_array(image[:, :2], 7)) is None  # another shape
    assert layout.label(encode_array(image.astype(np.float32), 7)) is None  # float_data
    assert RawLayout.of(encode_array(image.astype(np.float32), 7)) is None
