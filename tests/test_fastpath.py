"""The fast read paths must return exactly what the general decoder returns, or step aside."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from pathlib import Path

import lmdb
import numpy as np
import pytest
from conftest import read_lmdb_items
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datumdb import DatabaseWriter, DatumReader, fastpath
from datumdb.codec import RawLayout, datum_to_array, decode, encode_array
from datumdb.errors import DatumDBError
from datumdb.fastpath import OffsetIndex

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
        assert reader.build_index() is expect_index
        assert (reader._offset_index() is not None) is expect_index
        for i, (array, label) in enumerate(plain):
            for index in (i, i - len(plain), np.int32(i)):  # the fast path takes plain ints only
                got, got_label = reader[index]
                assert type(got_label) is int and got_label == label, (i, index)
                assert got.dtype == array.dtype and got.shape == array.shape and np.array_equal(got, array)
                if expect_index:  # as the general path's raw arrays: read-only, C order
                    assert not got.flags.writeable and got.flags.c_contiguous
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


# ----------------------------------------------------------------- single reads, hostile values

SHAPE = (2, 3, 4)


def _write_values(path: Path, values: list[bytes]) -> Path:
    """A database of exactly these values (no manifest), as a foreign tool could write it."""
    env = lmdb.open(str(path), map_size=1 << 24, subdir=True)
    with env.begin(write=True) as txn:
        for i, value in enumerate(values):
            txn.put(b"%08d" % i, value)
    env.close()
    return path


def _outcome(read: Callable[[], tuple[np.ndarray, int]]) -> tuple[str, bytes, str, int] | str:
    try:
        array, label = read()
    except DatumDBError as exc:
        return type(exc).__name__
    return (str(array.dtype), array.tobytes(), str(array.shape), label)


def _mutations(image: np.ndarray, label: int) -> dict[str, bytes]:
    """Values a byte or two away from the uniform layout: all but _STILL_UNIFORM leave the fast path."""
    good = encode_array(image, label)
    encoded = good[:-1] + b"\x01"  # encoded=true: the payload is a compressed image
    return {
        "encoded": encoded,
        "extra field": good + b"\x40\x00",  # an unknown field after encoded
        "no encoded field": good[:-2],
        "truncated payload": good[:10] + good[11:],
        "float": encode_array(image.astype(np.float32), label),
        "other shape": encode_array(image[:, :2], label),
        "same size, other shape": encode_array(image.reshape(SHAPE[0], SHAPE[2], SHAPE[1]), label),
        "overlong label": good[: RawLayout(SHAPE).tail_start] + b"\x28\x85\x80\x00\x38\x00",  # 5, padded
        "long label": encode_array(image, -7),  # a 10-byte varint: the layout's slow label check
        "garbage": b"\xff" * len(good),
    }


_STILL_UNIFORM = {"overlong label", "long label"}  # valid protobuf of the layout: indexed, and exact
# A raw Datum of another shape: it leaves the others' layout, but a database whose every record has
# it is uniform in that shape (indexed, and exact).
_RESHAPED = {"other shape", "same size, other shape"}


def _compare_fast_and_general(path: Path) -> bool:
    """reader[i] after build_index equals the general decoder's answer (or its error) everywhere."""
    items = read_lmdb_items(path)
    with DatumReader(path) as reader:
        indexed = reader.build_index()
        for i, (key, value) in enumerate(items):
            general = _outcome(lambda value=value, key=key: (datum_to_array(decode(value, key)), decode(value).label))
            assert _outcome(lambda i=i: reader[i]) == general, i
            assert _outcome(lambda i=i: reader[i - len(items)]) == general, i
        if items:
            batch_ok = _outcome(lambda: reader.read_batch(np.arange(len(items))))
            assert isinstance(batch_ok, tuple) or not indexed
    return indexed


@pytest.mark.parametrize("mutation", list(_mutations(np.zeros(SHAPE, np.uint8), 0)))
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_one_hostile_value_anywhere_keeps_single_reads_exact(tmp_path: Path, mutation: str, where: str) -> None:
    rng = np.random.default_rng(9)
    images = rng.integers(0, 256, (120, *SHAPE), dtype=np.uint8)
    values = [encode_array(image, LABELS[i % len(LABELS)]) for i, image in enumerate(images)]
    position = {"first": 0, "middle": 61, "last": 119}[where]
    values[position] = _mutations(images[position], 3)[mutation]
    assert _compare_fast_and_general(_write_values(tmp_path / "db", values)) is (mutation in _STILL_UNIFORM)


label_values = st.one_of(st.integers(0, 127), st.integers(-(2**31), 2**31 - 1))
mutation_names = st.sampled_from(list(_mutations(np.zeros(SHAPE, np.uint8), 0)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    labels=st.lists(label_values, min_size=1, max_size=40),
    broken=st.dictionaries(st.integers(0, 39), mutation_names, max_size=2),
    seed=st.integers(0, 2**32 - 1),
)
def test_single_reads_equal_the_general_decoder(tmp_path_factory, labels, broken, seed) -> None:
    """Any labels, any few hostile values: the fast path is exact, or not used."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (len(labels), *SHAPE), dtype=np.uint8)
    values = [encode_array(image, label) for image, label in zip(images, labels, strict=True)]
    for position, mutation in broken.items():
        if position < len(values):
            values[position] = _mutations(images[position], labels[position])[mutation]
    path = _write_values(tmp_path_factory.mktemp("hyp") / "db", values)
    indexed = _compare_fast_and_general(path)
    mutated = [mutation for position, mutation in broken.items() if position < len(values)]
    all_one_shape = len(mutated) == len(values) and len(set(mutated)) == 1 and mutated[0] in _RESHAPED
    assert indexed is (all_one_shape or all(mutation in _STILL_UNIFORM for mutation in mutated))


def test_the_index_is_built_by_single_reads_only_after_a_quarter_of_the_records(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    arrays = [rng.integers(0, 256, SHAPE, dtype=np.uint8) for _ in range(80)]
    path = _build(tmp_path / "db", arrays, list(range(80)))
    with DatumReader(path) as reader:
        for i in range(19):
            assert np.array_equal(reader[i][0], arrays[i])
        assert reader._pinned().built_offset_index() is None and reader._fast is None  # 19 < 80 / 4
        for i in range(19, 80):
            assert np.array_equal(reader[i][0], arrays[i]) and reader[i][1] == i
        assert reader._fast is not None  # the last reads took the fast path
        assert np.array_equal(reader[5][0], arrays[5]) and reader[5][1] == 5


def test_the_numpy_address_fallback_builds_the_same_index(tmp_path: Path, monkeypatch) -> None:
    rng = np.random.default_rng(6)
    arrays = [rng.integers(0, 256, SHAPE, dtype=np.uint8) for _ in range(100)]
    path = _build(tmp_path / "db", arrays, [LABELS[i % len(LABELS)] for i in range(100)])
    with DatumReader(path) as reader:
        file = reader._pinned().file
        arguments = (file.env, file.lmdb_map, file.data, file.raw_layout(path), len(reader))
        quick = OffsetIndex.build(*arguments)
        monkeypatch.setattr(fastpath, "_BUFFER_FIELD", None)
        slow = OffsetIndex.build(*arguments)
        assert quick is not None and slow is not None
        assert np.array_equal(quick.offsets, slow.offsets) and np.array_equal(quick.labels, slow.labels)
        monkeypatch.setattr(fastpath, "_BUFFER_FIELD", 0)  # a wrong guess (the reference count) ...
        assert OffsetIndex.build(*arguments) is None  # ... fails the build


def _read_in_child(reader: DatumReader, parent_index: int, results) -> None:
    array, label = reader[7]
    index = reader._pinned().built_offset_index()
    results.put((array.tobytes(), label, id(index) == parent_index, reader._fast is not None))


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_reuses_the_parents_index(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    arrays = [rng.integers(0, 256, SHAPE, dtype=np.uint8) for _ in range(50)]
    path = _build(tmp_path / "db", arrays, list(range(50)))
    with DatumReader(path) as reader:
        assert reader.build_index()
        parent_index = id(reader._pinned().built_offset_index())
        context = multiprocessing.get_context("fork")
        results = context.Queue()
        child = context.Process(target=_read_in_child, args=(reader, parent_index, results))
        child.start()
        data, label, same_index, fast = results.get(timeout=60)
        child.join(60)
    assert child.exitcode == 0
    assert data == arrays[7].tobytes() and label == 7
    assert same_index and fast  # no scan in the child: the parent's index, over the inherited map
