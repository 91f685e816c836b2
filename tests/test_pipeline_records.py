"""datumdb.pipeline.records: the record files between the records and build steps."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datumdb.errors import InputError
from datumdb.files import atomic_write
from datumdb.pipeline.records import RECORDS_FORMAT, RecordFile, RecordWriter, read_records, write_records

pytestmark = pytest.mark.unit

_ITEMS = st.lists(st.tuples(st.binary(min_size=1, max_size=20), st.binary(max_size=60)), max_size=12)


def test_record_file_round_trip_and_damage(tmp_path: Path) -> None:
    items = [(b"%08d" % i, bytes([i]) * (i + 1)) for i in range(5)]
    path = write_records(tmp_path / "r" / "train.rec", {"split": "train"}, items)
    header, records = read_records(path)
    assert header == {"format": RECORDS_FORMAT, "split": "train"} and list(records) == items
    assert [p.name for p in path.parent.iterdir()] == ["train.rec"]  # no temporary file left
    data = path.read_bytes()
    path.write_bytes(data[:-20])
    with pytest.raises(InputError, match=r"truncated|trailer"):
        list(read_records(path)[1])
    path.write_bytes(b"not a record file")
    with pytest.raises(InputError, match="not a datumdb record file"):
        read_records(path)
    with pytest.raises(InputError, match="not found"):
        read_records(tmp_path / "missing.rec")


@given(items=_ITEMS, header=st.dictionaries(st.sampled_from(["split", "shard", "x"]), st.integers(0, 9)))
def test_any_items_round_trip(items: list[tuple[bytes, bytes]], header: dict[str, int]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = write_records(Path(folder) / "a.rec", header, iter(items))  # a generator is enough
        got_header, records = read_records(path)
        assert got_header == {"format": RECORDS_FORMAT, **header}
        assert list(records) == items


@given(items=_ITEMS.filter(bool), cut=st.integers(1, 10**6))
def test_every_truncation_is_detected(items: list[tuple[bytes, bytes]], cut: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = write_records(Path(folder) / "a.rec", {}, items)
        data = path.read_bytes()
        path.write_bytes(data[: cut % len(data)])
        with pytest.raises(InputError):
            list(read_records(path)[1])


def test_a_trailer_with_the_wrong_count_or_trailing_bytes_is_refused(tmp_path: Path) -> None:
    path = write_records(tmp_path / "a.rec", {}, [(b"k", b"v")])
    data = path.read_bytes()
    (footer_len,) = struct.unpack_from("<Q", data, len(data) - 16)
    trailer_end = len(data) - 16 - footer_len  # the trailer frame: key length 0, count, a zero shape
    count_at = trailer_end - 20
    path.write_bytes(data[:count_at] + struct.pack("<Q", 2) + data[count_at + 8 :])
    with pytest.raises(InputError, match=r"damaged trailer \(says 2 records, read 1\)"):
        list(read_records(path)[1])
    path.write_bytes(data + b"\0")
    with pytest.raises(InputError, match="truncated"):
        list(read_records(path)[1])
    path.write_bytes(data[:trailer_end] + b"\0" + data[trailer_end:])  # a stray byte after the trailer
    with pytest.raises(InputError, match="damaged"):
        list(read_records(path)[1])


def test_shapes_and_skipped_samples_travel_with_the_records(tmp_path: Path) -> None:
    skipped = {"path": "a/b c.jpg", "line": 7, "position": 3, "reason": "not an image OpenCV can decode"}
    with RecordWriter(tmp_path / "a.rec", {"split": "train"}) as writer:
        writer.add(b"00000000_x.jpg", b"v1", (3, 480, 640))
        writer.skip(skipped)
        writer.add(b"00000001_y.png", b"v2")
    records = RecordFile(tmp_path / "a.rec")
    assert list(records) == [(b"00000000_x.jpg", b"v1", (3, 480, 640)), (b"00000001_y.png", b"v2", None)]
    assert records.skipped == [skipped]
    assert records.header["split"] == "train"


def test_a_damaged_or_foreign_header_is_refused(tmp_path: Path) -> None:
    path = write_records(tmp_path / "a.rec", {"split": "val"}, [])
    data = path.read_bytes()
    (head_len,) = struct.unpack_from("<I", data, 8)
    path.write_bytes(data[:12] + b"{" * head_len + data[12 + head_len :])
    with pytest.raises(InputError, match="damaged header"):
        read_records(path)
    other = json.dumps({"format": "other/1"}).encode()
    path.write_bytes(data[:8] + struct.pack("<I", len(other)) + other + data[12 + head_len :])
    with pytest.raises(InputError, match=f"not a {RECORDS_FORMAT} file"):
        read_records(path)


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path: Path) -> None:
    def items():
        yield b"a", b"1"
        raise RuntimeError("the source failed")

    path = tmp_path / "r" / "train.rec"
    with pytest.raises(RuntimeError, match="the source failed"):
        write_records(path, {}, items())
    assert list(path.parent.iterdir()) == []
    write_records(path, {"v": 1}, [(b"a", b"1")])
    with pytest.raises(RuntimeError):
        write_records(path, {"v": 2}, items())
    header, records = read_records(path)  # the earlier file is intact
    assert header["v"] == 1 and list(records) == [(b"a", b"1")]
    assert [p.name for p in path.parent.iterdir()] == ["train.rec"]


def test_atomic_write_replaces_a_file_and_creates_its_folder(tmp_path: Path) -> None:
    path = atomic_write(tmp_path / "a" / "b" / "out.json", b"one")
    assert path.read_bytes() == b"one" and (path.stat().st_mode & 0o777) == 0o644
    atomic_write(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]


def test_pages_already_read_are_released_and_the_records_stay_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build streams gigabytes of records: the pages read are given back every _DROP_EVERY bytes
    (MADV_DONTNEED on a read-only mapping), and every record read before or after is intact."""
    from datumdb.pipeline import records as records_module

    monkeypatch.setattr(records_module, "_DROP_EVERY", 5000)
    items = [(b"%08d" % i, bytes([i % 251]) * (1000 + 37 * i)) for i in range(60)]
    path = write_records(tmp_path / "a.rec", {}, items)
    released = []
    record_file = RecordFile(path)
    real_drop = record_file._drop
    monkeypatch.setattr(record_file, "_drop", lambda start, stop: released.append(stop) or real_drop(start, stop))
    assert [(k, v) for k, v, _ in record_file] == items
    assert len(released) >= 10
