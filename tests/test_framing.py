"""datumdb.framing and the bulk checks it serves: every bulk result equals the per-record one."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from datumdb.codec import INT32_MAX, INT32_MIN, RawLayout, encode_array
from datumdb.framing import BackgroundDigest, frame_items, frame_raw_images, index_key_digits
from datumdb.manifest import RECORDS_PER_CHUNK, ContentDigest

pytestmark = pytest.mark.unit

LABELS = [0, 1, 127, 128, 300, 16383, 16384, 2**31 - 1, -1, -(2**31), 5]  # varints of 1, 2, 3, 5 and 10 bytes
labels_lists = st.lists(st.one_of(st.sampled_from(LABELS), st.integers(INT32_MIN, INT32_MAX)), min_size=1, max_size=40)
shapes = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6))


def _records(framed) -> list[tuple[bytes, bytes]]:
    return [(bytes(key), bytes(value)) for key, value in framed.items()]


@given(labels=labels_lists, shape=shapes, first=st.integers(0, 10**6), width=st.integers(7, 12), seed=st.integers(0, 9))
def test_frame_raw_images_gives_encode_array_bytes_under_index_keys(labels, shape, first, width, seed) -> None:
    images = np.random.default_rng(seed).integers(0, 256, (len(labels), *shape), dtype=np.uint8)
    keys = index_key_digits(first, len(labels), width)
    framed = frame_raw_images(images, np.array(labels, dtype=np.int64), keys)
    expected = [
        (b"%0*d" % (width, first + i), encode_array(image, label))
        for i, (image, label) in enumerate(zip(images, labels, strict=True))
    ]
    assert _records(framed) == expected
    digest = ContentDigest()
    digest.update_framed(framed.buffer, framed.bounds)
    assert digest.hexdigest == _digest_of(expected).hexdigest


def test_frame_raw_images_takes_any_strides() -> None:
    """HWC transposed and channel-flipped views, as convert-arrays hands them over."""
    hwc = np.random.default_rng(1).integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    chw = hwc.transpose(0, 3, 1, 2)[:, ::-1]
    framed = frame_raw_images(chw, np.arange(7) * 100, index_key_digits(0, 7, 8))
    assert [value for _, value in _records(framed)] == [encode_array(image, i * 100) for i, image in enumerate(chw)]


def test_index_key_digits_match_the_writer_format_at_every_width() -> None:
    for first, count, width in [(0, 12, 8), (99_999_990, 10, 8), (10**17, 3, 18), (5, 3, 25)]:
        got = [row.tobytes() for row in index_key_digits(first, count, width)]
        assert got == [b"%0*d" % (width, i) for i in range(first, first + count)]


def _digest_of(items) -> ContentDigest:
    digest = ContentDigest()
    for key, value in items:
        digest.update(key, value)
    return digest


@given(
    sizes=st.lists(st.integers(0, 3 * RECORDS_PER_CHUNK), min_size=1, max_size=4),
    per_record=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_update_framed_equals_update_record_by_record_across_chunk_boundaries(sizes, per_record) -> None:
    """Any mix of framed runs and single updates, straddling chunks anyhow: the same digest,
    chunk digests and chunk first keys."""
    items = [(b"k%07d" % i, bytes([i % 251]) * (i % 7)) for i in range(sum(sizes))]
    reference = _digest_of(items)
    digest = ContentDigest()
    start = 0
    for size, single in zip(sizes, per_record, strict=False):
        part = items[start : start + size]
        if single:
            for key, value in part:
                digest.update(key, value)
        else:
            framed = frame_items([k for k, _ in part], [v for _, v in part])
            digest.update_framed(framed.buffer, framed.bounds)
            assert _records(framed) == part
        start += size
    assert digest.count == reference.count == len(items)
    assert digest.hexdigest == reference.hexdigest
    assert digest.chunk_digests == reference.chunk_digests
    assert digest.chunk_first_keys == reference.chunk_first_keys


def test_background_digest_keeps_the_order_of_its_chunks() -> None:
    items = [(b"%08d" % i, bytes(range(i % 200)) * 20) for i in range(5000)]
    hasher = BackgroundDigest(ContentDigest())
    try:
        for start in range(0, len(items), 700):
            part = items[start : start + 700]
            hasher.submit(frame_items([k for k, _ in part], [v for _, v in part]))
        digest = hasher.wait()
    finally:
        hasher.close()
    assert not hasher
    assert digest.chunk_digests == _digest_of(items).chunk_digests and digest.count == len(items)


def _damaged(value: bytes, position: int, byte: int, cut: int) -> bytes:
    data = bytearray(value)
    data[position % len(data)] = byte
    return bytes(data[: len(data) - cut % 3])


@given(
    labels=labels_lists,
    damage=st.lists(st.tuples(st.integers(0, 39), st.integers(0, 10**6), st.integers(0, 255), st.integers(0, 5))),
    extra=st.lists(st.sampled_from([b"", b"\x28\x01\x38\x00", b"\x80", b"\x28\x80\x80\x38\x00"]), max_size=3),
)
def test_raw_layout_labels_agree_with_label_on_hostile_values(labels, damage, extra) -> None:
    """Bytes flipped anywhere (header, tag, varint, continuation bits, encoded flag), values cut
    short or padded: the vectorized check accepts exactly when every value passes
    :meth:`RawLayout.label`, and then gives the same labels."""
    shape = (1, 2, 3)
    layout = RawLayout(shape)
    image = np.arange(6, dtype=np.uint8).reshape(shape)
    values = [encode_array(image, label) for label in labels]
    for index, position, byte, cut in damage:
        if index < len(values):
            values[index] = _damaged(values[index], position, byte, cut)
    for index, tail in enumerate(extra):
        values[index % len(values)] += tail
    framed = frame_items([b"%08d" % i for i in range(len(values))], values)
    found = layout.labels(framed.buffer, framed.value_starts, framed.value_ends)
    expected = [layout.label(value) for value in values]
    if any(label is None for label in expected):
        assert found is None
    else:
        assert found is not None and found.tolist() == expected


def test_raw_layout_labels_reads_overlong_and_overflowing_varints_as_label_does() -> None:
    layout = RawLayout((1, 1, 1))
    header = layout.header + b"\x07"
    cases = [
        b"\x80\x00",  # 0 in two bytes: protobuf accepts it
        b"\xff\xff\xff\xff\x0f",  # 2**32 - 1 in five bytes: -1 as int32
        b"\xff" * 9 + b"\x01",  # ten bytes, the top bit: no overflow
        b"\xff" * 9 + b"\x02",  # ten bytes above 2**64: refused
        b"\x80" * 10 + b"\x00",  # eleven bytes: refused
        b"\x81",  # the continuation bit on the last byte: refused
    ]
    values = [header + b"\x28" + varint + b"\x38\x00" for varint in cases]
    expected = [layout.label(value) for value in values]
    assert expected[:3] == [0, -1, -1] and expected[3:] == [None, None, None]
    for value, label in zip(values, expected, strict=True):
        framed = frame_items([b"k"], [value])
        found = layout.labels(framed.buffer, framed.value_starts, framed.value_ends)
        assert (found is None) if label is None else (found is not None and found.tolist() == [label])


@given(st.lists(st.tuples(st.binary(min_size=1, max_size=12), st.binary(max_size=40)), max_size=30))
def test_frame_items_gives_back_its_pairs_whatever_the_keys(pairs) -> None:
    """Keys of one length or of many, with NUL bytes at either end: items() returns them as given."""
    framed = frame_items([k for k, _ in pairs], [v for _, v in pairs])
    assert _records(framed) == pairs and len(framed) == len(pairs)
    assert [bytes(framed.buffer[a:b]) for a, b in zip(framed.value_starts, framed.value_ends, strict=True)] == [
        v for _, v in pairs
    ]


def test_frame_items_with_uniform_keys_keeps_nul_bytes() -> None:
    pairs = [(b"\x00a\x00", b"x"), (b"b\x00\x00", b""), (b"\x00\x00\x00", b"yz")]
    assert _records(frame_items([k for k, _ in pairs], [v for _, v in pairs])) == pairs
