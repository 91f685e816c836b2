"""datumdb.pnggray: Caffe's --gray of colour PNGs with colour-space chunks (libpng 1.6.39 + OpenCV 4.6.0).

Three kinds of ground truth, none computed by the module under test:

* real Caffe: ``tests/fixtures/caffe/photos`` (four colour PNGs carrying the HP-Microsoft sRGB ICC
  profile, which libpng 1.6.39 recognises as sRGB);
* pip's OpenCV, whose libpng (1.6.58) still converts in linear light for ``gAMA`` and ``sRGB``
  chunks, only ignores ``iCCP``: so "iCCP with a known sRGB profile" must equal "sRGB chunk"
  decoded by pip's OpenCV, and a single gAMA/sRGB chunk must equal pip's OpenCV itself;
* libpng 1.6.39's colour-space rules read from its source (which later chunk is ignored when),
  checked by comparing with pip's OpenCV on a file holding only the chunk that wins.
"""

from __future__ import annotations

import shutil
import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import FIXTURES, read_lmdb_items
from hypothesis import given
from hypothesis import strategies as st

from datumdb.cli import main
from datumdb.codec import decode, imdecode
from datumdb.errors import DatumError
from datumdb.pnggray import RGB_TO_GRAY_COEFFICIENTS, gray_conversion

pytestmark = pytest.mark.unit

PHOTOS = FIXTURES / "photos"
ICCP_IMAGES = ("rgb/astronaut_iccp.png", "rgb/chelsea_iccp.png", "rgb/coffee_iccp.png", "rgb/rocket_iccp.png")


# --------------------------------------------------------------------------- PNG building


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(pixels: np.ndarray, color_type: int, chunks: list[bytes] = (), palette: np.ndarray | None = None) -> bytes:
    """A PNG of ``pixels`` (H x W x C in file order, RGB(A) or palette indices) with ``chunks`` before PLTE/IDAT."""
    depth = 16 if pixels.dtype == np.uint16 else 8
    height, width = pixels.shape[:2]
    rows = pixels.astype(">u2" if depth == 16 else np.uint8).reshape(height, -1).view(np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    plte = [] if palette is None else [_chunk(b"PLTE", palette.astype(np.uint8).tobytes())]
    head = [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", ihdr), *chunks, *plte]
    return b"".join([*head, _chunk(b"IDAT", zlib.compress(raw)), _chunk(b"IEND", b"")])


def _gama(value: int) -> bytes:
    return _chunk(b"gAMA", struct.pack(">I", value))


def _srgb(intent: int = 0) -> bytes:
    return _chunk(b"sRGB", bytes([intent]))


def _iccp_body(path: Path) -> bytes:
    """The iCCP chunk data (keyword, method, zlib stream) of a fixture image."""
    data = path.read_bytes()
    pos = 8
    while pos < len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"iCCP":
            return data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    raise AssertionError(f"{path} has no iCCP chunk")


SRGB_ICCP = _iccp_body(PHOTOS / "images" / ICCP_IMAGES[0])


def _iccp(profile: bytes | None = None, body: bytes | None = None) -> bytes:
    if body is None:
        body = b"ICC profile\x00\x00" + zlib.compress(profile)
    return _chunk(b"iCCP", body)


def _srgb_profile() -> bytes:
    return zlib.decompress(SRGB_ICCP[SRGB_ICCP.index(b"\x00") + 2 :])


def _cv2_gray(png: bytes) -> np.ndarray:
    """pip's OpenCV (libpng 1.6.58), untouched by datumdb."""
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)


def _random_rgb(seed: int, shape=(23, 31, 3), dtype=np.uint8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)
    image[0, :, 1:3] = image[0, :, :1]  # a row of grey pixels (R == G == B)
    return image


# --------------------------------------------------------------------------- real Caffe


def _copy(tmp_path: Path, name: str) -> Path:
    """A fixture LMDB copied out, so opening it can never leave lock.mdb in tests/fixtures."""
    return Path(shutil.copytree(PHOTOS / name, tmp_path / f"ref_{name}"))


def _convert(tmp_path: Path, name: str, *flags: str) -> Path:
    db = tmp_path / name
    root = str(PHOTOS / "images") + "/"
    assert main(["--no-progress", "convert-imageset", *flags, root, str(PHOTOS / "list.txt"), str(db)]) == 0
    return db


@pytest.mark.parametrize(
    ("name", "flags"),
    [
        ("lmdb_gray_resized", ["--gray", "--resize-height", "24", "--resize-width", "32"]),
        ("lmdb_gray_png", ["--gray", "--encoded", "--encode-type", "png"]),
        ("lmdb_color_resized", ["--resize-height", "24", "--resize-width", "32"]),
    ],
)
def test_convert_imageset_reproduces_caffe_photos(tmp_path: Path, name: str, flags: list[str]) -> None:
    produced, reference = read_lmdb_items(_convert(tmp_path, name, *flags)), read_lmdb_items(_copy(tmp_path, name))
    assert [key for key, _ in produced] == [key for key, _ in reference]
    assert len(reference) == 14
    for (key, value), (_, ref_value) in zip(produced, reference, strict=True):
        assert value == ref_value, key


def test_the_iccp_records_are_the_ones_plain_opencv_gets_wrong(tmp_path: Path) -> None:
    """The fixture really tests the gamma path: pip's OpenCV alone misses exactly the colour iCCP images."""
    reference = dict(read_lmdb_items(_copy(tmp_path, "lmdb_gray_resized")))
    wrong = []
    for key, value in reference.items():
        path = PHOTOS / "images" / key.decode().split("_", 1)[1]
        plain = cv2.resize(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), (32, 24))
        datum = decode(value)
        if plain.tobytes() != bytes(datum.data):
            wrong.append(path.relative_to(PHOTOS / "images").as_posix())
    assert sorted(wrong) == sorted(ICCP_IMAGES)


def test_compute_mean_of_the_gray_db_reproduces_caffe(tmp_path: Path) -> None:
    db = _convert(tmp_path, "gray", "--gray", "--resize-height", "24", "--resize-width", "32")
    out = tmp_path / "mean.binaryproto"
    assert main(["--no-progress", "compute-mean", str(db), str(out)]) == 0
    assert out.read_bytes() == (PHOTOS / "mean_gray_resized.binaryproto").read_bytes()


@pytest.mark.parametrize("name", ICCP_IMAGES)
def test_fixture_iccp_image_decodes_like_the_same_pixels_with_an_srgb_chunk(name: str) -> None:
    """libpng 1.6.39 turns the recognised profile into sRGB (intent 0): same grey as an sRGB chunk."""
    data = (PHOTOS / "images" / name).read_bytes()
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    with_srgb = _png(np.ascontiguousarray(bgr[..., ::-1]), 2, [_srgb(0)])
    assert np.array_equal(imdecode(data, cv2.IMREAD_GRAYSCALE), _cv2_gray(with_srgb))


def test_grey_png_with_the_profile_is_left_to_opencv() -> None:
    data = (PHOTOS / "images" / "gray" / "camera_iccp.png").read_bytes()
    assert gray_conversion(data) is None


# --------------------------------------------------------------------------- synthetic PNGs


def test_coefficients_are_opencvs_weights_in_libpng_fixed_point() -> None:
    """Without colour-space chunks pip's OpenCV truncates (R*rc + G*gc + B*bc) >> 15, as libpng 1.6.39."""
    rgb = _random_rgb(1)
    rc, gc, bc = RGB_TO_GRAY_COEFFICIENTS
    wide = rgb.astype(np.uint32)
    expected = (rc * wide[..., 0] + gc * wide[..., 1] + bc * wide[..., 2]) >> 15
    assert rc + gc + bc == 32768
    assert np.array_equal(_cv2_gray(_png(rgb, 2)), expected)


@pytest.mark.parametrize("kind", ["rgb", "rgba", "palette", "rgb16", "rgb+trns"])
def test_without_colour_space_chunks_opencv_decides(kind: str) -> None:
    png = _case(kind, [])
    assert gray_conversion(png) is None
    assert np.array_equal(imdecode(png, cv2.IMREAD_GRAYSCALE), _cv2_gray(png))


def _case(kind: str, chunks: list[bytes], seed: int = 0) -> bytes:
    if kind == "rgb16":
        return _png(_random_rgb(seed, dtype=np.uint16), 2, chunks)
    rgb = _random_rgb(seed)
    if kind == "rgba":
        alpha = np.random.default_rng(seed + 1).integers(0, 256, (*rgb.shape[:2], 1), dtype=np.uint8)
        return _png(np.concatenate([rgb, alpha], axis=2), 6, chunks)
    if kind == "palette":
        palette = _random_rgb(seed, shape=(256, 1, 3)).reshape(256, 3)  # entry 0 is grey
        indices = np.random.default_rng(seed).integers(0, 256, (*rgb.shape[:2], 1), dtype=np.uint8)
        return _png(indices, 3, chunks, palette=palette)
    if kind == "rgb+trns":
        return _png(rgb, 2, [*chunks, _chunk(b"tRNS", b"\x00\x10\x00\x20\x00\x30")])
    return _png(rgb, 2, chunks)


@pytest.mark.parametrize("kind", ["rgb", "rgba", "palette", "rgb16", "rgb+trns"])
@pytest.mark.parametrize("chunk", ["sRGB", "gAMA 0.45455", "gAMA 0.7", "gAMA 2.2"])
def test_single_gamma_chunk_matches_pip_libpng(kind: str, chunk: str) -> None:
    """pip's libpng also converts in linear light for gAMA and sRGB: an independent implementation."""
    extra = _srgb() if chunk == "sRGB" else _gama(round(float(chunk.split()[1]) * 100000))
    png = _case(kind, [extra])
    conversion = gray_conversion(png)
    assert conversion is not None and conversion.uses_gamma
    ours = imdecode(png, cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(ours, _cv2_gray(png))
    assert not np.array_equal(ours, _cv2_gray(_case(kind, [])))  # the gamma path changed something


@given(gamma=st.integers(16, 625000000), seed=st.integers(0, 2**16))
def test_any_gamma_value_matches_pip_libpng(gamma: int, seed: int) -> None:
    png = _case("rgb", [_gama(gamma)], seed)
    assert np.array_equal(imdecode(png, cv2.IMREAD_GRAYSCALE), _cv2_gray(png))


@pytest.mark.parametrize("bits", [4, 8, 9, 11, 12, 16])
def test_sixteen_bit_significant_bits_match_pip_libpng(bits: int) -> None:
    """sBIT sets the 16-bit tables' shift (png_build_gamma_table): max(16 - bits, 5), at most 8."""
    png = _case("rgb16", [_gama(45455), _chunk(b"sBIT", bytes([bits, bits - 1 if bits > 1 else 1, 1]))])
    assert np.array_equal(imdecode(png, cv2.IMREAD_GRAYSCALE), _cv2_gray(png))


def test_grey_pixels_are_unchanged_by_the_gamma_path() -> None:
    """R == G == B goes through gamma_table, the identity when the screen gamma is 1/file gamma."""
    values = np.arange(256, dtype=np.uint8)
    grey = np.repeat(values[:, None, None], 3, axis=2)
    for chunks in ([_srgb()], [_gama(45455)], [_gama(20000)], [_iccp(body=SRGB_ICCP)]):
        assert np.array_equal(imdecode(_png(grey, 2, chunks), cv2.IMREAD_GRAYSCALE)[:, 0], values)


@pytest.mark.parametrize("kind", ["rgb", "rgba", "palette", "rgb16"])
def test_srgb_profile_equals_srgb_chunk(kind: str) -> None:
    """The fixture's profile in a synthetic PNG: Caffe's libpng treats it exactly as sRGB, intent 0."""
    with_profile = _case(kind, [_iccp(body=SRGB_ICCP)])
    assert np.array_equal(imdecode(with_profile, cv2.IMREAD_GRAYSCALE), _cv2_gray(_case(kind, [_srgb(0)])))
    assert not np.array_equal(imdecode(with_profile, cv2.IMREAD_GRAYSCALE), _cv2_gray(with_profile))


def test_the_media_relative_hp_profile_is_recognised_too() -> None:
    """libpng's table has the HP profile twice, differing only in the intent byte (png.c:2290-2304)."""
    png = _case("rgb", [_iccp(_edited(67))])  # intent 0 -> 1: the media-relative profile
    assert np.array_equal(imdecode(png, cv2.IMREAD_GRAYSCALE), _cv2_gray(_case("rgb", [_srgb(1)])))


def _edited(offset: int) -> bytes:
    profile = bytearray(_srgb_profile())
    profile[offset] ^= 1
    return bytes(profile)


@pytest.mark.parametrize(
    ("profile", "why"),
    [
        (_edited(3000), "edited tag data: Adler-32/CRC-32 no longer match"),
        (_edited(11), "a changed version byte: the checksums no longer match"),
        (_srgb_profile() + b"\x00" * 4, "longer than the known profile"),
    ],
)
def test_unrecognised_profiles_leave_the_plain_conversion(profile: bytes, why: str) -> None:
    if why.startswith("longer"):
        profile = struct.pack(">I", len(profile)) + profile[4:]
    png = _case("rgb", [_iccp(profile)])
    assert np.array_equal(imdecode(png, cv2.IMREAD_GRAYSCALE), _cv2_gray(_case("rgb", []))), why


# libpng 1.6.39's rules for several chunks (pngrutil.c png_handle_gAMA/sRGB/iCCP, png.c
# png_colorspace_*): derived from the source. Each case's expected grey is pip's OpenCV on a
# file that holds only the chunk that wins (or none), where pip's libpng and 1.6.39 agree.
_BAD_ICCP = _iccp(body=b"ICC profile\x00\x01" + SRGB_ICCP[13:])  # compression method 1


@pytest.mark.parametrize(
    ("chunks", "winner"),
    [
        ([_BAD_ICCP, _gama(45455)], []),  # an invalid profile invalidates the colour space: gAMA ignored
        ([_srgb(), _srgb()], [_srgb()]),  # "too many profiles": invalid, but the gamma stays
        ([_srgb(), _gama(45000)], [_gama(45000)]),  # consistent gAMA after sRGB overwrites the value
        ([_srgb(), _gama(100000)], [_srgb()]),  # inconsistent gAMA after sRGB is ignored
        ([_gama(100000), _srgb()], [_srgb()]),  # sRGB always sets its own gamma
        ([_iccp(body=SRGB_ICCP), _srgb()], [_srgb()]),  # a second profile: invalid, gamma stays
        ([_gama(70000), _gama(45455)], [_gama(70000)]),  # duplicate gAMA: invalid, first value stays
        ([_gama(10), _gama(45455)], []),  # out-of-range gamma invalidates
        ([_chunk(b"sRGB", b"\x05"), _gama(45455)], []),  # bad rendering intent invalidates
        ([_chunk(b"gAMA", b"\x00\x00\xb1\x8f\x00"), _gama(70000)], [_gama(70000)]),  # wrong length: ignored
        ([_gama(45455)[:-1] + b"\x00", _gama(70000)], [_gama(70000)]),  # bad CRC: chunk dropped
        ([_iccp(body=b"x" * 13), _gama(70000)], [_gama(70000)]),  # too short: ignored, not invalid
        ([_chunk(b"cHRM", struct.pack(">8I", *[0] * 8)), _gama(45455)], []),  # invalid chromaticities
        ([_chunk(b"cHRM", struct.pack(">8I", 31270, 32900, 64000, 33000, 30000, 60000, 15000, 6000))], []),
        ([_gama(100000)], []),  # gamma 1.0: no tables, plain truncating conversion
    ],
)
def test_libpng_1_6_39_colour_space_rules(chunks: list[bytes], winner: list[bytes]) -> None:
    ours = imdecode(_case("rgb", chunks), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(ours, _cv2_gray(_case("rgb", winner)))


def test_chunks_after_plte_are_out_of_place() -> None:
    rgb = _random_rgb(3)
    palette_first = _png(rgb, 2, [_chunk(b"PLTE", bytes(range(48))), _gama(45455)])
    assert np.array_equal(imdecode(palette_first, cv2.IMREAD_GRAYSCALE), _cv2_gray(_png(rgb, 2)))


# --------------------------------------------------------------------------- hostile input


def test_a_profile_over_libpngs_size_bound_is_rejected_without_inflating() -> None:
    header = bytearray(_srgb_profile()[:132])
    header[0:4] = struct.pack(">I", 8_000_001)
    bomb = zlib.compress(bytes(header) + bytes(8_000_001 - 132), 9)
    png = _case("rgb", [_iccp(body=b"p\x00\x00" + bomb), _gama(45455)])
    start = time.perf_counter()
    ours = imdecode(png, cv2.IMREAD_GRAYSCALE)
    assert time.perf_counter() - start < 5
    assert np.array_equal(ours, _cv2_gray(_case("rgb", [])))  # invalid profile: the gAMA is ignored


def test_a_truncated_or_corrupt_profile_stream_is_an_invalid_profile() -> None:
    for body in (SRGB_ICCP[:200], SRGB_ICCP[:40] + b"\xff" * 200):
        png = _case("rgb", [_iccp(body=body), _gama(45455)])
        assert np.array_equal(imdecode(png, cv2.IMREAD_GRAYSCALE), _cv2_gray(_case("rgb", [])))


def test_undecodable_colour_png_names_the_key() -> None:
    png = _case("rgb", [_srgb()])
    broken = png[:-30] + b"\x00" * 18 + png[-12:]
    with pytest.raises(DatumError, match="img-7"):
        imdecode(broken, cv2.IMREAD_GRAYSCALE, "img-7")


@given(st.binary(max_size=300), st.integers(0, 200))
def test_random_bytes_after_the_header_never_crash_the_chunk_reader(tail: bytes, cut: int) -> None:
    png = _case("rgb", [_iccp(body=SRGB_ICCP)])
    data = png[:33] + tail[:cut] + png[33:]
    try:
        imdecode(data, cv2.IMREAD_GRAYSCALE, "k")
    except DatumError as exc:
        assert "k" in str(exc)
