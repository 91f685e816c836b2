"""datumdb.codec: Caffe-exact bytes out, zero-copy views in, DatumError on every malformed input."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import FIXTURE_LMDBS
from google.protobuf.message import DecodeError
from hostile_inputs import alternating_float_datum, forged_jpeg, forged_png, jpeg_scan_bomb, jpeg_segments, tiff_bomb
from hostile_inputs import varint as _varint
from hypothesis import given
from hypothesis import strategies as st

from datumdb.codec import (
    DECODE_MEMORY_FACTOR,
    DECODE_MEMORY_SLACK,
    Datum,
    check_label,
    datum_to_array,
    decode,
    decode_image,
    encode_array,
    encode_image,
    encode_image_into,
    encode_opencv_image,
    encode_opencv_image_into,
    encode_png_or_jpg,
    hwc_to_chw,
    imdecode,
    imencode,
    resize,
)
from datumdb.errors import DatumError
from datumdb.imageheader import check_decodable, read_header
from datumdb.limits import MAX_IMAGE_PIXELS, MAX_JPEG_SCANS, max_decoded_bytes, max_image_pixels
from datumdb.proto import datum_pb2
from datumdb.proto.regenerate import generate

pytestmark = pytest.mark.unit

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

labels = st.one_of(st.integers(INT32_MIN, INT32_MAX), st.sampled_from([INT32_MIN, INT32_MAX, -1, 0, 1]))
shapes = st.tuples(st.integers(1, 4), st.integers(1, 8), st.integers(1, 8))
dtypes = st.sampled_from(["uint8", "int16", "int32", "float32", "float64"])


def _wire_fields(value: bytes) -> list[tuple[int, int]]:
    """(field number, wire type) of each field, in wire order (a tiny independent parser)."""
    fields, pos = [], 0
    while pos < len(value):
        tag, pos = _read_varint(value, pos)
        number, wire = tag >> 3, tag & 7
        fields.append((number, wire))
        if wire == 0:
            _, pos = _read_varint(value, pos)
        elif wire == 2:
            length, pos = _read_varint(value, pos)
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise AssertionError(f"unexpected wire type {wire}")
    return fields


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


@st.composite
def arrays(draw, dtype=None):
    c, h, w = draw(shapes)
    dtype = np.dtype(dtype or draw(dtypes))
    n = c * h * w
    if dtype.kind == "f":
        elements = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)
    else:
        info = np.iinfo(dtype)
        elements = st.integers(int(info.min), int(info.max))
    values = draw(st.lists(elements, min_size=n, max_size=n))
    return np.array(values, dtype=dtype).reshape(c, h, w)


def _assert_same_as_protobuf(value: bytes, datum: Datum) -> None:
    message = datum_pb2.Datum()
    message.ParseFromString(value)
    assert (datum.channels, datum.height, datum.width) == (message.channels, message.height, message.width)
    assert bytes(datum.data) == message.data
    assert datum.label == message.label
    assert datum.encoded == message.encoded
    np.testing.assert_array_equal(datum.float_data, np.array(message.float_data, dtype=np.float32))


# --------------------------------------------------------------------------- exact bytes


def test_generated_proto_module_is_current(tmp_path: Path) -> None:
    generated = generate(tmp_path)
    committed = Path(datum_pb2.__file__)
    assert generated.read_bytes() == committed.read_bytes(), "run python -m datumdb.proto.regenerate"


def test_raw_datum_bytes_equal_protobuf_with_explicit_label_and_encoded() -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for label in (0, 7, -1, INT32_MIN, INT32_MAX):
        value = encode_array(array, label)
        reference = datum_pb2.Datum(
            channels=2, height=3, width=4, data=array.tobytes(), label=label, encoded=False
        ).SerializeToString()
        assert value == reference
        assert _wire_fields(value) == [(1, 0), (2, 0), (3, 0), (4, 2), (5, 0), (7, 0)]


def test_raw_datum_layout_is_caffes() -> None:
    array = np.zeros((3, 32, 32), dtype=np.uint8)
    value = encode_array(array, 0)
    assert value[:9] == bytes([0x08, 3, 0x10, 32, 0x18, 32, 0x22, 0x80, 0x18])
    assert value[-4:] == bytes([0x28, 0, 0x38, 0])
    assert len(value) == 9 + 3072 + 4


def test_fixture_values_reencode_byte_for_byte(caffe_dir: Path, lmdb_items) -> None:
    """Every Caffe-written value, decoded and encoded again, gives Caffe's bytes back."""
    for name in FIXTURE_LMDBS:
        for key, value in lmdb_items(caffe_dir / name):
            datum = decode(value, key)
            if datum.encoded:
                again = encode_image(bytes(datum.data), datum.label)
            else:
                again = encode_array(datum_to_array(datum, key=key), datum.label)
            assert again == value, (name, key)


def test_float_datum_bytes_equal_protobuf() -> None:
    array = np.array([[[1.5, -2.25], [0.0, 3.0e7]]], dtype=np.float32)
    value = encode_array(array, -5)
    reference = datum_pb2.Datum(
        channels=1, height=2, width=2, label=-5, float_data=array.reshape(-1).tolist(), encoded=False
    ).SerializeToString()
    assert value == reference
    assert [f for f, _ in _wire_fields(value)] == [1, 2, 3, 5, 6, 6, 6, 6, 7]


def test_encoded_datum_bytes_equal_protobuf_with_and_without_shape() -> None:
    image = encode_png_or_jpg(np.full((3, 5, 6), 9, dtype=np.uint8), "png")
    plain = encode_image(image, 4)
    assert plain == datum_pb2.Datum(data=image, label=4, encoded=True).SerializeToString()
    assert _wire_fields(plain) == [(4, 2), (5, 0), (7, 0)]
    shaped = encode_image(image, 4, shape=(3, 5, 6))
    assert (
        shaped == datum_pb2.Datum(channels=3, height=5, width=6, data=image, label=4, encoded=True).SerializeToString()
    )
    assert _wire_fields(shaped) == [(1, 0), (2, 0), (3, 0), (4, 2), (5, 0), (7, 0)]


# --------------------------------------------------------------------------- round trips


@given(array=arrays(), label=labels)
def test_round_trip_raw_and_float(array: np.ndarray, label: int) -> None:
    value = encode_array(array, label, key="k")
    datum = decode(value, "k")
    _assert_same_as_protobuf(value, datum)
    assert datum.label == label and datum.encoded is False
    assert datum.shape == array.shape
    out = datum_to_array(datum, key="k")
    if array.dtype == np.uint8:
        assert out.dtype == np.uint8 and len(datum.float_data) == 0
        np.testing.assert_array_equal(out, array)
    else:
        assert out.dtype == np.float32 and len(datum.data) == 0
        np.testing.assert_array_equal(out, array.astype(np.float32))
    reference = datum_pb2.Datum(channels=array.shape[0], height=array.shape[1], width=array.shape[2], label=label)
    if array.dtype == np.uint8:
        reference.data = array.tobytes()
    else:
        reference.float_data.extend(array.astype(np.float32).reshape(-1).tolist())
    reference.encoded = False
    assert value == reference.SerializeToString()


@given(array=arrays("uint8"), label=labels, with_shape=st.booleans())
def test_round_trip_png_is_exact(array: np.ndarray, label: int, with_shape: bool) -> None:
    chw = array[:1] if array.shape[0] in (2, 4) else array  # PNG via encode_png_or_jpg: 1 or 3 channels
    image = encode_png_or_jpg(chw, "png")
    assert image.startswith(b"\x89PNG")
    value = encode_image(image, label, shape=chw.shape if with_shape else None)
    datum = decode(value)
    _assert_same_as_protobuf(value, datum)
    assert datum.encoded is True and datum.label == label and bytes(datum.data) == image
    assert datum.shape == (chw.shape if with_shape else (0, 0, 0))
    np.testing.assert_array_equal(datum_to_array(datum), chw)


@given(array=arrays("uint8"), label=labels, with_shape=st.booleans())
def test_round_trip_jpeg(array: np.ndarray, label: int, with_shape: bool) -> None:
    chw = array[:1] if array.shape[0] in (2, 4) else array
    image = encode_png_or_jpg(chw, "jpg")
    assert image.startswith(b"\xff\xd8")
    value = encode_image(image, label, shape=chw.shape if with_shape else None)
    datum = decode(value)
    _assert_same_as_protobuf(value, datum)
    assert bytes(datum.data) == image and datum.label == label and datum.encoded
    decoded = datum_to_array(datum)
    assert decoded.shape == chw.shape
    reference = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(
        decoded, reference[np.newaxis] if reference.ndim == 2 else reference.transpose(2, 0, 1)
    )


def test_decode_image_modes() -> None:
    color = np.random.default_rng(0).integers(0, 256, (3, 6, 7), dtype=np.uint8)
    png = encode_png_or_jpg(color, "png")
    assert decode_image(png, "unchanged").shape == (3, 6, 7)
    assert decode_image(png, "color").shape == (3, 6, 7)
    assert decode_image(png, "gray").shape == (1, 6, 7)
    gray_png = encode_png_or_jpg(color[:1], "png")
    assert decode_image(gray_png, "color").shape == (3, 6, 7)
    with pytest.raises(DatumError, match="imread mode"):
        decode_image(png, "bogus")  # type: ignore[arg-type]


@given(
    value=st.builds(
        lambda a, label: encode_array(a, label),
        arrays(),
        labels,
    ),
    unknown=st.sampled_from([b"", b"\x40\x05", b"\x4a\x02ab", b"\x55\x00\x00\x80\x3f"]),
)
def test_decode_agrees_with_protobuf_including_unknown_fields(value: bytes, unknown: bytes) -> None:
    data = unknown + value + unknown
    _assert_same_as_protobuf(data, decode(data))


def test_decode_accepts_packed_float_data_like_protobuf() -> None:
    message = datum_pb2.Datum(channels=1, height=1, width=3, label=2)
    message.float_data.extend([1.0, -2.5, 3.25])
    floats = np.array([1.0, -2.5, 3.25], dtype="<f4").tobytes()
    packed = b"\x08\x01\x10\x01\x18\x03\x28\x02\x32" + _varint(len(floats)) + floats
    check = datum_pb2.Datum()
    check.ParseFromString(packed)
    assert check == message
    datum = decode(packed)
    np.testing.assert_array_equal(datum.float_data, [1.0, -2.5, 3.25])
    np.testing.assert_array_equal(datum_to_array(datum), np.array([[[1.0, -2.5, 3.25]]], np.float32))


# --------------------------------------------------------------------------- zero copy


def test_raw_decode_is_a_zero_copy_view() -> None:
    array = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    value = encode_array(array, 1)
    datum = decode(value)
    assert isinstance(datum.data, memoryview)
    out = datum_to_array(datum)
    assert np.shares_memory(out, np.frombuffer(value, dtype=np.uint8))
    assert not out.flags.writeable
    buffer = bytearray(value)  # a mutable buffer shows the view is live
    view = datum_to_array(decode(buffer))
    first_pixel = len(value) - 4 - array.size  # the payload is followed by 28 <label> 38 00
    buffer[first_pixel] = 200
    assert view[0, 0, 0] == 200


def test_float_decode_is_a_zero_copy_view() -> None:
    array = np.linspace(-1, 1, 12, dtype=np.float32).reshape(1, 3, 4)
    value = bytearray(encode_array(array, 0))
    out = datum_to_array(decode(value))
    np.testing.assert_array_equal(out, array)
    assert np.shares_memory(out, np.frombuffer(value, dtype=np.uint8))


# --------------------------------------------------------------------------- labels and values


@pytest.mark.parametrize("label", [2**31, -(2**31) - 1, 2**40, True, False, 1.0, 2.5, "3", None, np.float32(1)])
def test_bad_labels_raise(label: object) -> None:
    with pytest.raises(DatumError, match="label"):
        encode_array(np.zeros((1, 2, 2), np.uint8), label)  # type: ignore[arg-type]
    with pytest.raises(DatumError, match="label"):
        encode_image(b"\x89PNG....", label)  # type: ignore[arg-type]
    with pytest.raises(DatumError, match="label"):
        check_label(label)


def test_numpy_integer_labels_are_accepted() -> None:
    assert check_label(np.int64(INT32_MAX)) == INT32_MAX
    assert check_label(np.int8(-3)) == -3
    with pytest.raises(DatumError):
        check_label(np.bool_(True))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_float_data_raises_naming_the_key(bad: float) -> None:
    array = np.zeros((1, 2, 2), dtype=np.float64)
    array[0, 1, 1] = bad
    with pytest.raises(DatumError, match=r"'img7'.*NaN or infinity"):
        encode_array(array, 0, key="img7")


def test_float64_beyond_float32_range_raises_datum_error_not_a_numpy_warning() -> None:
    """1e39 is finite as float64 but infinite as float32: a DatumError, with no RuntimeWarning
    escaping from numpy's cast first (under ``-W error`` that warning replaces the DatumError)."""
    array = np.array([[[1.0, 1e39]]], dtype=np.float64)
    with pytest.raises(DatumError, match=r"'big'.*NaN or infinity"):
        encode_array(array, 0, key="big")


@pytest.mark.parametrize("shape", [(4,), (1, 1, 2, 2)])
def test_wrong_ndim_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(DatumError, match="shape"):
        encode_array(np.zeros(shape, np.uint8))


def test_2d_array_is_one_channel() -> None:
    datum = decode(encode_array(np.ones((2, 3), np.uint8), 0))
    assert datum.shape == (1, 2, 3)


@pytest.mark.parametrize("dtype", [np.bool_, np.complex64, object])
def test_unsupported_dtypes_raise(dtype) -> None:
    with pytest.raises(DatumError):
        encode_array(np.zeros((1, 2, 2), dtype=dtype))


def test_empty_encoded_image_raises() -> None:
    with pytest.raises(DatumError, match="non-empty"):
        encode_image(b"", 0)


def test_png_jpg_need_one_or_three_uint8_channels() -> None:
    with pytest.raises(DatumError):
        encode_png_or_jpg(np.zeros((2, 4, 4), np.uint8), "png")
    with pytest.raises(DatumError):
        encode_png_or_jpg(np.zeros((3, 4, 4), np.float32), "jpg")


# --------------------------------------------------------------------------- malformed values

GOOD = encode_array(np.arange(12, dtype=np.uint8).reshape(1, 3, 4), 3)

MALFORMED = {
    "truncated in the data": (GOOD[:-8], "declares"),
    "truncated varint": (b"\x08\x80", "truncated varint"),
    "truncated tag only": (GOOD + b"\x80", "truncated"),
    "varint longer than ten bytes": (b"\x08" + b"\xff" * 10 + b"\x01", "longer than ten"),
    "varint overflowing 64 bits": (b"\x08" + b"\xff" * 9 + b"\x7f", "overflows"),
    "huge declared length": (b"\x22" + _varint(2**40) + b"abc", "declares"),
    "huge packed float length": (b"\x32" + _varint(2**40) + b"abcd", "packed float_data"),
    "ragged packed floats": (b"\x32\x03abc", "ragged"),
    "wrong wire type channels": (b"\x0a\x01\x03" + GOOD, "wire type"),
    "wrong wire type data": (b"\x20\x05", "wire type"),
    "wrong wire type label": (b"\x2d\x00\x00\x00\x00", "wire type"),
    "truncated fixed32 float": (b"\x35\x00\x00", "truncated"),
    "negative channels": (GOOD + b"\x08" + _varint(-1), "negative"),
    "negative width": (GOOD + b"\x18" + _varint(-4), "negative"),
    "field number zero": (b"\x00\x01", "field number 0"),
    "group wire type": (b"\x43\x44", "wire type"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_values_raise_datum_error_naming_the_key(case: str) -> None:
    value, message = MALFORMED[case]
    started = time.monotonic()
    with pytest.raises(DatumError, match=message) as info:
        decode(value, b"00000042")
    assert time.monotonic() - started < 1.0  # no allocation of what a size field claims
    assert "00000042" in str(info.value)
    assert info.value.key == b"00000042"


def test_shape_not_matching_data_raises_in_datum_to_array() -> None:
    value = datum_pb2.Datum(channels=3, height=4, width=4, data=b"x" * 47, label=0, encoded=False).SerializeToString()
    datum = decode(value, "bad")
    with pytest.raises(DatumError, match=r"'bad'.*3\*4\*4 = 48 but data holds 47"):
        datum_to_array(datum, key="bad")
    floats = datum_pb2.Datum(channels=1, height=2, width=2, float_data=[1.0, 2.0, 3.0]).SerializeToString()
    with pytest.raises(DatumError, match=r"'f'.*float_data holds 3"):
        datum_to_array(decode(floats, "f"), key="f")


def test_empty_datum_raises_in_datum_to_array() -> None:
    with pytest.raises(DatumError, match="no data"):
        datum_to_array(decode(b"", "e"), key="e")


@pytest.mark.parametrize("garbage", [b"\x89PNG\r\n\x1a\nnot really", b"\xff\xd8\xff\xe0garbage", b"hello world"])
def test_garbage_encoded_image_raises_naming_the_key(garbage: bytes) -> None:
    datum = decode(encode_image(garbage, 1), "00000003")
    with pytest.raises(DatumError, match=r"^key '00000003': ") as info:
        datum_to_array(datum, key="00000003")
    assert info.value.key == "00000003"


def test_every_decode_error_is_a_value_error() -> None:
    assert issubclass(DatumError, ValueError)
    with pytest.raises(ValueError):
        decode(b"\x08")


# --------------------------------------------------------------------------- any field sequence

_floats32 = st.floats(width=32, allow_nan=False)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


_any_field = st.one_of(
    st.builds(lambda n, v: _field(n, 0, _varint(v)), st.sampled_from([1, 2, 3, 5]), st.integers(0, 2**31 - 1) | labels),
    st.builds(lambda b: _field(4, 2, _varint(len(b)) + b), st.binary(max_size=20)),
    st.builds(lambda f: _field(6, 5, np.array([f], "<f4").tobytes()), _floats32),
    st.builds(
        lambda fs: _field(6, 2, _varint(4 * len(fs)) + np.array(fs, "<f4").tobytes()),
        st.lists(_floats32, max_size=4),
    ),
    st.builds(lambda v: _field(7, 0, _varint(v)), st.integers(0, 3)),
    st.builds(lambda n, v: _field(n, 0, _varint(v)), st.integers(8, 40), st.integers(0, 2**64 - 1)),
    st.builds(lambda n, b: _field(n, 2, _varint(len(b)) + b), st.integers(8, 40), st.binary(max_size=6)),
    st.builds(lambda n, b: _field(n, 1, b), st.integers(8, 40), st.binary(min_size=8, max_size=8)),
    st.builds(lambda n, b: _field(n, 5, b), st.integers(8, 40), st.binary(min_size=4, max_size=4)),
)


@given(fields=st.lists(_any_field, max_size=12))
def test_decode_agrees_with_protobuf_on_any_field_sequence(fields: list[bytes]) -> None:
    """Repeated, reordered, packed/unpacked and unknown fields: last one wins, floats concatenate."""
    value = b"".join(fields)
    message = datum_pb2.Datum()
    message.ParseFromString(value)
    if min(message.channels, message.height, message.width) < 0:
        with pytest.raises(DatumError, match="negative"):
            decode(value, "k")
        return
    _assert_same_as_protobuf(value, decode(value, "k"))


# --------------------------------------------------------------------------- bounded decoding


def test_alternating_float_runs_decode_in_bounded_memory() -> None:
    """float_data split into 200k one-float runs: at most 3x the value's size (+8 MiB), was ~37x."""
    count = 200_000
    value = alternating_float_datum(count)
    tracemalloc.start()
    try:
        datum = decode(value, b"hostile")
        array = datum_to_array(datum, key=b"hostile")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= DECODE_MEMORY_FACTOR * len(value) + DECODE_MEMORY_SLACK
    assert array.shape == (1, 1, count)
    np.testing.assert_array_equal(array.reshape(-1), np.arange(count, dtype=np.float32))
    assert datum.label == 7


def test_alternating_float_runs_agree_with_protobuf() -> None:
    value = alternating_float_datum(5000)
    _assert_same_as_protobuf(value, decode(value))


_run = st.tuples(
    st.integers(0, 70),  # unpacked floats in a row (crosses the 16, 32, 64 gallop windows)
    st.sampled_from([b"", b"\x40\x00", b"\x32\x00", b"\x32\x04\x00\x00\x80\x3f", b"\x5d\x00\x00\x00\x00"]),
)


@given(runs=st.lists(_run, max_size=40), tail=st.sampled_from([b"", b"\x35\x00\x00", b"\x35"]))
def test_float_runs_of_any_length_agree_with_protobuf(runs: list[tuple[int, bytes]], tail: bytes) -> None:
    """Runs of unpacked floats (found by the vectorized scan) between other fields, packed runs included."""
    value = b"".join(
        b"".join(b"\x35" + np.array([n * 100 + i], "<f4").tobytes() for i in range(n)) + sep for n, sep in runs
    )
    if tail:  # a float field cut short at the very end is refused, whatever came before
        with pytest.raises(DatumError, match="truncated"):
            decode(value + tail, "k")
        return
    _assert_same_as_protobuf(value, decode(value, "k"))


def test_many_mixed_runs_across_gather_batches_agree_with_protobuf() -> None:
    """10k runs (more than one gather batch): unpacked of 1-40 floats, packed of 1-5, in random order."""
    rng = np.random.default_rng(9)
    parts = []
    for _ in range(10_000):
        n = int(rng.integers(1, 41))
        values = rng.normal(size=n).astype("<f4")
        if rng.random() < 0.3:
            packed = values[:5].tobytes()
            parts.append(b"\x32" + bytes([len(packed)]) + packed)
        else:
            wire = np.empty((n, 5), np.uint8)
            wire[:, 0] = 0x35
            wire[:, 1:] = values.view(np.uint8).reshape(-1, 4)
            parts.append(wire.tobytes())
        parts.append(b"\x40\x01")  # an unknown field ends every run
    value = b"".join(parts)
    _assert_same_as_protobuf(value, decode(value))


@pytest.mark.parametrize("floats", [1, 2, 17, 100])
@pytest.mark.parametrize("cut", [1, 2, 4])
def test_a_float_cut_short_after_a_run_is_refused(floats: int, cut: int) -> None:
    run = b"".join(b"\x35" + np.array([i], "<f4").tobytes() for i in range(floats))
    np.testing.assert_array_equal(decode(run).float_data, np.arange(floats, dtype=np.float32))
    with pytest.raises(DatumError, match="truncated") as info:
        decode(run + (b"\x35" + b"\x00" * 4)[:cut], "k")
    message = datum_pb2.Datum()
    with pytest.raises(DecodeError):  # protobuf refuses it too
        message.ParseFromString(run + (b"\x35" + b"\x00" * 4)[:cut])
    assert info.value.key == "k"


@pytest.mark.parametrize("forge", [forged_jpeg, forged_png], ids=["jpeg", "png"])
def test_forged_huge_image_header_is_a_datum_error_naming_the_key(forge) -> None:
    datum = decode(encode_image(forge(60000, 60000), 4), "00000009")
    with pytest.raises(DatumError, match=r"^key '00000009': .*OPENCV_IO_MAX_IMAGE_PIXELS") as info:
        datum_to_array(datum, key="00000009")
    assert info.value.key == "00000009"
    for mode in ("unchanged", "color", "gray"):
        with pytest.raises(DatumError, match="more than"):
            decode_image(forge(60000, 60000), mode, "k")  # type: ignore[arg-type]


def test_opencv_failures_in_encode_and_resize_are_datum_errors() -> None:
    with pytest.raises(DatumError, match=r"^key 'k': OpenCV cannot encode"):
        imencode(".nosuchformat", np.zeros((4, 4), np.uint8), "k")
    with pytest.raises(DatumError, match=r"^key 'k': OpenCV cannot resize"):
        resize(np.zeros((4, 4), np.uint8), 0, 0, "k")
    with pytest.raises(DatumError, match="empty"):
        imdecode(b"", cv2.IMREAD_COLOR, "k")


@pytest.mark.parametrize(("preset", "expected"), [(None, str(MAX_IMAGE_PIXELS)), ("5000", "5000")])
def test_opencv_pixel_bound_admits_photos_and_yields_to_the_user(preset: str | None, expected: str) -> None:
    """Set before cv2 is imported (a fresh interpreter); >= 100 megapixels; the user's value wins."""
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    if preset is not None:
        env["OPENCV_IO_MAX_IMAGE_PIXELS"] = preset
    code = "import datumdb.imageset, os; print(os.environ['OPENCV_IO_MAX_IMAGE_PIXELS'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
    assert MAX_IMAGE_PIXELS >= 100_000_000


@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    channels=st.sampled_from([0, 1, 3, 4]),
    label=st.integers(-(2**31), 2**31 - 1),
    data=st.data(),
)
def test_encode_opencv_image_is_encode_array_of_the_chw_view(
    height: int, width: int, channels: int, label: int, data: st.DataObject
) -> None:
    """The split-into-place serializer of convert-imageset makes encode_array's bytes exactly."""
    shape = (height, width) if channels == 0 else (height, width, channels)
    image = np.frombuffer(data.draw(st.binary(min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))),
                          dtype=np.uint8).reshape(shape)  # fmt: skip
    if data.draw(st.booleans()):  # a strided view, as OpenCV hands out after a crop
        image = np.ascontiguousarray(np.pad(image, [(0, 1)] * image.ndim))[:height, :width]
    assert encode_opencv_image(image, label) == encode_array(hwc_to_chw(image), label)


# --------------------------------------------------------------------------- every decoder bounded first (issue 17)


def test_a_tiff_bomb_is_refused_from_its_header_naming_the_key() -> None:
    """18 KB declaring 8192x8192 float64 RGBA: 2 GB to decode (issue 17's took 8.4 GB and 26 s)."""
    bomb = tiff_bomb()
    assert len(bomb) < 20_000
    datum = decode(encode_image(bomb, 1), "00000007")
    tracemalloc.start()
    try:
        for mode in ("unchanged", "color", "gray"):
            with pytest.raises(DatumError, match=r"^key '00000007': cannot decode the 17597-byte") as info:
                datum_to_array(datum, imread=mode, key="00000007")  # type: ignore[arg-type]
            message = str(info.value)
            assert "TIFF header declares 8192x8192 pixels of 4 channel(s) of 8 bytes" in message
            assert f"over the bound of {max_decoded_bytes()}" in message and "\n" not in message
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_the_same_tiff_within_the_bound_decodes_as_declared() -> None:
    image = imdecode(tiff_bomb(64, 48, 4), cv2.IMREAD_UNCHANGED)
    assert image.shape == (48, 64, 4) and image.dtype == np.float64 and not image.any()
    header = read_header(tiff_bomb(64, 48, 4))
    assert (header.width, header.height, header.channels, header.bytes_per_sample) == (64, 48, 4, 8)
    assert header.decoded_bytes >= image.nbytes


def test_a_jpeg_scan_bomb_is_refused_before_libjpeg_sweeps_it() -> None:
    """30 KB, 4096x4096, 3,010 scans: within the pixel and byte bounds, refused for its scans."""
    bomb = jpeg_scan_bomb()
    datum = decode(encode_image(bomb, 0), "00000003")
    started = time.perf_counter()
    with pytest.raises(DatumError, match=rf"^key '00000003': .*more than {MAX_JPEG_SCANS} scans.*scan bomb"):
        datum_to_array(datum, key="00000003")
    assert time.perf_counter() - started < 30  # not a speed assertion: the decode would take seconds to minutes


def test_the_scan_bound_counts_scans_as_libjpeg_does() -> None:
    """Exactly MAX_JPEG_SCANS passes and decodes; one more is refused. Markers inside other segments
    (an APP segment holding a whole thumbnail JPEG with its own scans) are not scans of the image."""
    real = imencode(".jpg", np.full((8, 8, 3), 100, np.uint8))  # baseline, to be re-encoded progressive
    real = cv2.imencode(".jpg", cv2.imdecode(np.frombuffer(real, np.uint8), 1), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1]
    real = real.tobytes()
    real_scans = sum(marker == 0xDA for marker, _, _ in jpeg_segments(real))
    assert read_header(real).scans == real_scans == 10  # libjpeg's progressive script for colour
    at_bound = jpeg_scan_bomb(64, 64, MAX_JPEG_SCANS - real_scans)
    assert read_header(at_bound).scans == MAX_JPEG_SCANS
    assert imdecode(at_bound, cv2.IMREAD_COLOR).shape == (64, 64, 3)
    with pytest.raises(DatumError, match="scan bomb"):
        read_header(jpeg_scan_bomb(64, 64, MAX_JPEG_SCANS - real_scans + 1))
    thumbnail = jpeg_scan_bomb(8, 8, MAX_JPEG_SCANS)  # 110 scans, hidden in an APP1 segment
    app1 = b"\xff\xe1" + (len(thumbnail) + 2).to_bytes(2, "big") + thumbnail
    assert read_header(real[:2] + app1 + real[2:]).scans == 10
    assert imdecode(real[:2] + app1 + real[2:], cv2.IMREAD_COLOR).shape == (8, 8, 3)


def test_a_progressive_jpeg_counts_its_coefficients() -> None:
    """libjpeg holds every DCT coefficient (2 bytes a sample) of a multi-scan JPEG: a progressive
    8000x8000 4:4:4 header is 576 MB to decode, over the bound; the same frame in baseline is not."""
    options = [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    image = np.full((8, 8, 3), 50, np.uint8)
    for progressive, refused in ((1, True), (0, False)):
        data = bytearray(cv2.imencode(".jpg", image, [*options, cv2.IMWRITE_JPEG_PROGRESSIVE, progressive])[1])
        frame = next(start for marker, start, _ in jpeg_segments(bytes(data)) if marker in (0xC0, 0xC2))
        data[frame + 5 : frame + 9] = (8000).to_bytes(2, "big") * 2
        header = read_header(bytes(data))
        assert header.decoded_bytes == 8000 * 8000 * 3 * (3 if progressive else 1)
        if refused:
            with pytest.raises(DatumError, match=r"and 384000000 bytes of decoder buffers: 576000000 bytes"):
                check_decodable(bytes(data))
        else:
            check_decodable(bytes(data))


_ACCEPTED = [  # (extension, encoder options, dtype, channels)
    (".jpg", [], np.uint8, 1),
    (".jpg", [], np.uint8, 3),
    (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1], np.uint8, 3),
    (".png", [], np.uint8, 1),
    (".png", [], np.uint8, 4),
    (".png", [], np.uint16, 3),
    (".bmp", [], np.uint8, 1),
    (".bmp", [], np.uint8, 3),
    (".bmp", [], np.uint8, 4),
    (".pbm", [], np.uint8, 1),
    (".pgm", [], np.uint8, 1),
    (".pgm", [], np.uint16, 1),
    (".ppm", [], np.uint8, 3),
    (".webp", [], np.uint8, 3),
    (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101], np.uint8, 4),
    (".tif", [], np.uint8, 1),
    (".tif", [], np.uint16, 3),
    (".tif", [], np.float32, 4),
    (".tif", [cv2.IMWRITE_TIFF_COMPRESSION, 1], np.uint8, 3),
]


@pytest.mark.parametrize(("extension", "options", "dtype", "channels"), _ACCEPTED)
def test_accepted_formats_declare_what_opencv_decodes(
    extension: str, options: list, dtype: type, channels: int
) -> None:
    pixels = np.random.default_rng(3).integers(0, 255, (37, 53, channels)).astype(dtype).squeeze()
    ok, buf = cv2.imencode(extension, pixels, options)
    assert ok
    data = buf.tobytes()
    header = check_decodable(data)
    expected = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    assert (header.width, header.height) == (53, 37)
    assert header.decoded_bytes >= expected.nbytes
    np.testing.assert_array_equal(imdecode(data, cv2.IMREAD_UNCHANGED), expected)


@pytest.mark.parametrize(
    ("extension", "name"),
    [(".jp2", "a JPEG 2000"), (".hdr", "a Radiance HDR"), (".pfm", "a PFM"), (".ras", "a Sun raster"),
     (".pam", "a PAM"), (".gif", "a GIF"), (".avif", "an AVIF or HEIF")],
)  # fmt: skip
def test_other_formats_opencv_reads_are_refused_by_name(extension: str, name: str) -> None:
    pixels = np.random.default_rng(4).integers(0, 255, (64, 64, 3)).astype(np.uint8)
    ok, buf = cv2.imencode(extension, pixels.astype(np.float32) / 255 if extension in (".hdr", ".pfm") else pixels)
    assert ok and cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) is not None  # OpenCV would decode it
    with pytest.raises(DatumError, match=rf"^key 'k': cannot decode .*: {name} image: datumdb decodes only JPEG, PNG"):
        decode_image(buf.tobytes(), "unchanged", "k")


@pytest.mark.parametrize(
    "data",
    [b"BM" + bytes(10), b"P5\n# no numbers\n", b"P6 99999999999 1 255 ", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
     b"II*\x00\xff\xff\x00\x00", b"MM\x00*\x00\x00\x00\x08\xff\xff",
     b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDX" + bytes(17),
     b"\xff\xd8\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00", b"\xff\xd8\xff\xd9", b"hello"],
)  # fmt: skip
def test_unreadable_headers_are_refused_before_any_decoder(data: bytes) -> None:
    with pytest.raises(DatumError, match=r"^key 'k': cannot decode the \d+-byte encoded image: ") as info:
        decode_image(data, "unchanged", "k")
    assert "\n" not in str(info.value)


def test_tiff_compressions_without_a_declared_output_size_are_refused() -> None:
    ok, buf = cv2.imencode(".tif", np.zeros((8, 8, 3), np.uint8), [cv2.IMWRITE_TIFF_COMPRESSION, 7])  # JPEG
    assert ok and cv2.imdecode(buf, cv2.IMREAD_COLOR) is not None
    with pytest.raises(DatumError, match="the TIFF uses compression 7; datumdb decodes TIFF compressed with"):
        decode_image(buf.tobytes())


def test_the_pixel_bound_is_read_as_opencv_reads_it(monkeypatch) -> None:
    cases = (("5000", 5000), ("2KB", 2048), ("3Mb", 3 << 20), ("lots", MAX_IMAGE_PIXELS), ("", MAX_IMAGE_PIXELS))
    for value, expected in cases:
        monkeypatch.setenv("OPENCV_IO_MAX_IMAGE_PIXELS", value)
        max_image_pixels.cache_clear()
        try:
            assert max_image_pixels() == expected
            assert max_decoded_bytes() == 4 * expected
        finally:
            monkeypatch.undo()
            max_image_pixels.cache_clear()
    assert max_image_pixels() == int(os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"])


def test_mutated_headers_of_every_format_fail_only_with_a_datum_error() -> None:
    """20,000 seeded mutations (bytes, 2/4-byte words, truncations) of one file of each accepted
    format and of both bombs: the header parser returns a size or raises DatumError, nothing else."""
    rng = np.random.default_rng(17)
    pixels = rng.integers(0, 255, (24, 40, 3)).astype(np.uint8)
    seeds = [tiff_bomb(64, 48, 4), jpeg_scan_bomb(64, 64, 20)]
    for extension, options, dtype, channels in _ACCEPTED:
        seeds.append(cv2.imencode(extension, pixels[..., :channels].astype(dtype).squeeze(), options)[1].tobytes())
    for case in range(20_000):
        data = bytearray(seeds[case % len(seeds)])
        for _ in range(int(rng.integers(1, 4))):
            if not data:
                break
            kind, at = int(rng.integers(0, 4)), int(rng.integers(0, min(len(data), 400)))
            if kind == 0:
                data[at] = int(rng.integers(0, 256))
            elif kind in (1, 2):
                size = 2 * kind
                data[at : at + size] = rng.choice([0, 0xFF, int(rng.integers(0, 256))], size).astype(np.uint8).tobytes()
            else:
                del data[at:]
        try:
            header = read_header(bytes(data))
        except DatumError as exc:
            assert "\n" not in str(exc)
            continue
        assert min(header.width, header.height, header.channels, header.bytes_per_sample, header.working_bytes) >= 0


@pytest.mark.parametrize("shape", [(7, 5, 3), (4, 6), (3, 3, 1)])
def test_records_made_in_place_equal_the_made_ones_or_nothing_is_written(shape: tuple[int, ...]) -> None:
    """convert-imageset's workers write records straight into shared memory: the same bytes as
    encode_opencv_image / encode_image, and None (nothing written) where they do not fit."""
    image = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    expected = encode_opencv_image(image, 300)
    out = bytearray(b"\xee" * (len(expected) + 5))
    assert encode_opencv_image_into(image, 300, memoryview(out)) == len(expected)
    assert bytes(out[: len(expected)]) == expected and out[len(expected) :] == b"\xee" * 5
    short = bytearray(b"\xee" * (len(expected) - 1))
    assert encode_opencv_image_into(image, 300, memoryview(short)) is None
    assert short == b"\xee" * (len(expected) - 1)

    png = cv2.imencode(".png", image)[1].tobytes()
    expected = encode_image(png, -2)
    out = bytearray(len(expected))
    assert encode_image_into(png, -2, memoryview(out)) == len(expected) and bytes(out) == expected
    assert encode_image_into(png, -2, memoryview(bytearray(len(expected) - 1))) is None
    with pytest.raises(DatumError, match="non-empty image bytes"):
        encode_image_into(b"", 0, memoryview(out))
