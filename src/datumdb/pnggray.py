"""Caffe's ``IMREAD_GRAYSCALE`` of colour PNGs, exactly: libpng 1.6.39's ``rgb_to_gray``, gamma included.

Why this module exists. Caffe (Debian 12: OpenCV 4.6.0, libpng 1.6.39) reads ``--gray`` images
with ``cv::imread(path, IMREAD_GRAYSCALE)``. For a PNG, OpenCV lets libpng convert:
``png_set_rgb_to_gray(png_ptr, 1, 0.299, 0.587)`` (``grfmt_png.cpp``, ``PngDecoder::readData``).
libpng 1.6.39 converts *in linear light* whenever the file's colour space has a known gamma far
from 1.0 (``png_init_read_transformations`` builds the gamma tables for ``PNG_RGB_TO_GRAY`` when
``png_gamma_significant(colorspace.gamma)``, pngrtran.c:1574-1588), and ``png_do_rgb_to_gray``
then maps each non-grey pixel through ``gamma_to_1``, mixes with rounding and maps back through
``gamma_from_1`` (pngrtran.c:3022-3055); grey pixels (R == G == B) go through ``gamma_table``.
Otherwise it mixes the encoded values and truncates. The gamma comes from a ``gAMA`` chunk, an
``sRGB`` chunk (0.45455) or an ``iCCP`` chunk whose profile libpng recognises as one of seven known
sRGB profiles (``png_compare_ICC_profile_with_sRGB``, png.c:2307: length, intent, Adler-32, CRC-32
and the header's MD5 field) -- including the common, broken "HP-Microsoft sRGB v2" profile, for
which libpng warns "known incorrect sRGB profile" and still uses it.

pip's OpenCV bundles libpng 1.6.58. From 1.6.47 (commit a8242dd "PNGv3 colourspace precedence
rules conformance") libpng ignores ``iCCP`` for gamma and no longer invalidates inconsistent
colour-space chunks. So ``gAMA``/``sRGB`` PNGs come out as in Caffe, but sRGB-profile PNGs differ
by up to ~35 grey levels, and files with inconsistent chunks can differ too.

What we do. :func:`gray_conversion` reads the chunks before the first ``IDAT`` and replays libpng
1.6.39's colour-space bookkeeping (:class:`_Colorspace`). A colour PNG (types 2, 3, 6) that has any
colour-space chunk gets a :class:`GrayConversion`: the caller decodes it in colour with OpenCV
(BGR, alpha stripped and palette expanded exactly as libpng does for ``IMREAD_GRAYSCALE``) and
:meth:`GrayConversion.apply` does libpng 1.6.39's integer conversion with NumPy, tables built as
``png_build_gamma_table`` builds them (png.c:4196; floating-point ``pow`` as in Debian's
``PNG_FLOATING_ARITHMETIC_SUPPORTED`` build). Everything else returns None and stays with OpenCV's
own ``IMREAD_GRAYSCALE``, which is already exact (the same libpng code without gamma tables).

Bounds: the chunk walk looks at chunk headers only up to the first ``IDAT``; an ``iCCP`` profile is
inflated at most to the length it declares, which libpng caps at 8,000,000 bytes
(``PNG_USER_CHUNK_MALLOC_MAX``), streamed and never held beyond the sRGB candidates' 60,988 bytes;
pixels are converted in strips of :data:`_STRIP_PIXELS`.
"""

from __future__ import annotations

import functools
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from datumdb.errors import DatumError

__all__ = ["RGB_TO_GRAY_COEFFICIENTS", "GrayConversion", "gray_conversion"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_FP_1 = 100000  # libpng's fixed point 1.0
_GAMMA_THRESHOLD = 5000  # PNG_GAMMA_THRESHOLD_FIXED: |gamma - 1| below this is "not significant"
_GAMMA_sRGB_INVERSE = 45455  # PNG_GAMMA_sRGB_INVERSE
_MAX_GAMMA_8 = 11  # PNG_MAX_GAMMA_8: significant input bits of 16-bit tables when output is 8-bit
_CHUNK_MALLOC_MAX = 8_000_000  # PNG_USER_CHUNK_MALLOC_MAX of the standard build: iCCP size bound
_STRIP_PIXELS = 1 << 20  # pixels converted per NumPy pass: bounds the uint32 temporaries
_INFLATE_STEP = 1 << 16


def _rgb_to_gray_coefficient(weight: float) -> int:
    """libpng's 15-bit coefficient for OpenCV's weight: ``png_fixed`` rounds, ``*32768/100000`` truncates."""
    fixed = math.floor(100000 * weight + 0.5)  # png_fixed (png.c:3316)
    return fixed * 32768 // 100000  # png_set_rgb_to_gray_fixed (pngrtran.c:1021-1022)


# OpenCV 4.6.0 grfmt_png.cpp: png_set_rgb_to_gray(png_ptr, 1, 0.299, 0.587); blue takes the rest.
_RED = _rgb_to_gray_coefficient(0.299)
_GREEN = _rgb_to_gray_coefficient(0.587)
RGB_TO_GRAY_COEFFICIENTS: tuple[int, int, int] = (_RED, _GREEN, 32768 - _RED - _GREEN)
"""(red, green, blue) out of 32768, as ``png_do_rgb_to_gray`` uses them: (9797, 19234, 9737)."""

# The known sRGB profiles of png.c:2227-2304 (PNG_sRGB_PROFILE_CHECKS = 2: Adler-32 and CRC-32):
# (MD5 field of the profile header, length, rendering intent, adler32, crc32).
_SRGB_PROFILES: tuple[tuple[bytes, int, int, int, int], ...] = (
    (bytes.fromhex("29f83ddeaff255ae7842fae4ca83390d"), 3048, 0, 0x0A3FD9F6, 0x3B8772B9),
    (bytes.fromhex("c95bd637e95d8a3b0df38f99c1320389"), 3052, 1, 0x4909E5E1, 0x427EBB21),
    (bytes.fromhex("fc66337837e2886bfd72e9838228f1b8"), 60988, 0, 0xFD2144A1, 0x306FD8AE),
    (bytes.fromhex("34562abf994ccd066d2c5721d0d68c5d"), 60960, 0, 0x209C35D2, 0xBBEF7812),
    (bytes(16), 3024, 1, 0xA054D762, 0x5D5129CE),
    (bytes(16), 3144, 0, 0xF784F3FB, 0x182EA552),  # HP-Microsoft sRGB v2 perceptual (broken)
    (bytes(16), 3144, 1, 0x0398F3FC, 0xF29E526D),  # HP-Microsoft sRGB v2 media-relative (broken)
)
_SRGB_MAX_LENGTH = max(entry[1] for entry in _SRGB_PROFILES)
# sRGB end points (x, y of white, red, green, blue) as png.c:1662 stores them, cHRM's order.
_SRGB_XY = (31270, 32900, 64000, 33000, 30000, 60000, 15000, 6000)

_COLOR_MASK = 2
_COLORSPACE_CHUNKS = frozenset({b"gAMA", b"sRGB", b"iCCP", b"cHRM", b"cICP", b"mDCV"})


# --------------------------------------------------------------------------- libpng arithmetic


def _significant(gamma: int) -> bool:
    """``png_gamma_significant``: is ``gamma`` more than the threshold away from 1.0?"""
    return gamma < _FP_1 - _GAMMA_THRESHOLD or gamma > _FP_1 + _GAMMA_THRESHOLD


def _int32(value: float) -> int | None:
    """A rounded double as ``png_fixed_point``, or None where libpng reports overflow."""
    return int(value) if -2147483648.0 <= value <= 2147483647.0 else None


def _muldiv(a: int, times: int, divisor: int) -> int | None:
    """``png_muldiv`` (floating-point build): ``a * times / divisor`` rounded, None on failure."""
    if divisor == 0:
        return None
    if a == 0 or times == 0:
        return 0
    r = float(a)
    r *= times
    r /= divisor
    return _int32(math.floor(r + 0.5))


def _reciprocal(a: int) -> int:
    """``png_reciprocal``: 1/a in fixed point, 0 on overflow."""
    value = _int32(math.floor(1e10 / a + 0.5))
    return 0 if value is None else value


def _reciprocal2(a: int, b: int) -> int:
    """``png_reciprocal2``: 1/(a*b) in fixed point, 0 on overflow."""
    if a == 0 or b == 0:
        return 0
    r = 1e15 / a
    r /= b
    value = _int32(math.floor(r + 0.5))
    return 0 if value is None else value


def _product2(a: int, b: int) -> int:
    """``png_product2``: a*b in fixed point, 0 on overflow."""
    r = a * 1e-5
    r *= b
    value = _int32(math.floor(r + 0.5))
    return 0 if value is None else value


@functools.lru_cache(maxsize=64)
def _table8(gamma: int) -> np.ndarray:
    """``png_build_8bit_table``: 256 entries of ``png_gamma_8bit_correct`` (identity if not significant)."""
    if not _significant(gamma):
        return np.arange(256, dtype=np.uint8)
    exponent = gamma * 0.00001
    table = [0] + [math.floor(255 * math.pow(i / 255.0, exponent) + 0.5) for i in range(1, 255)] + [255]
    return np.array(table, dtype=np.uint8)


@functools.lru_cache(maxsize=64)
def _table16(shift: int, gamma: int) -> np.ndarray:
    """``png_build_16bit_table``, flattened: entry ``v >> shift`` is libpng's ``table[..][..]`` for ``v``."""
    size = 1 << (16 - shift)
    top = size - 1
    index = range(size)
    if _significant(gamma):
        fmax = 1.0 / top
        exponent = gamma * 0.00001
        values = [math.floor(65535.0 * math.pow(i * fmax, exponent) + 0.5) for i in index]
    elif shift:
        values = [(i * 65535 + (1 << (15 - shift))) // top for i in index]
    else:
        values = list(index)
    return np.array(values, dtype=np.uint16)


def _gamma_16bit_correct(value: int, gamma: int) -> int:
    if 0 < value < 65535:
        return math.floor(65535 * math.pow(value / 65535.0, gamma * 0.00001) + 0.5)
    return value


@functools.lru_cache(maxsize=64)
def _table16to8(shift: int, gamma: int) -> np.ndarray:
    """``png_build_16to8_table``, flattened like :func:`_table16`: the 16-bit value of the nearest 8-bit output."""
    size = 1 << (16 - shift)
    top = size - 1
    table = np.full(size, 65535, dtype=np.uint16)
    last = 0
    for i in range(255):
        out = i * 257
        bound = (_gamma_16bit_correct(out + 128, gamma) * top + 32768) // 65535 + 1
        if bound > last:
            table[last : min(bound, size)] = out
            last = bound
    return table


# --------------------------------------------------------------------------- colour-space bookkeeping


def _endpoints_match(xy1: tuple[int, ...], xy2: tuple[int, ...], delta: int) -> bool:
    return all(b - delta <= a <= b + delta for a, b in zip(xy1, xy2, strict=True))


def _xyz_from_xy(xy: tuple[int, ...]) -> tuple[int, ...] | int:
    """``png_XYZ_from_xy``: the nine XYZ values, or libpng's error code 1 (invalid) / 2 (overflow)."""
    wx, wy, rx, ry, gx, gy, bx, by = xy
    for x, y in ((rx, ry), (gx, gy), (bx, by)):
        if x < 0 or x > _FP_1 or y < 0 or y > _FP_1 - x:
            return 1
    if wx < 0 or wx > _FP_1 or wy < 5 or wy > _FP_1 - wx:
        return 1
    left = _muldiv(gx - bx, ry - by, 7)
    right = _muldiv(gy - by, rx - bx, 7)
    if left is None or right is None:
        return 2
    denominator = left - right
    left = _muldiv(gx - bx, wy - by, 7)
    right = _muldiv(gy - by, wx - bx, 7)
    if left is None or right is None:
        return 2
    red_inverse = _muldiv(wy, denominator, left - right)
    if red_inverse is None or red_inverse <= wy:
        return 1
    left = _muldiv(ry - by, wx - bx, 7)
    right = _muldiv(rx - bx, wy - by, 7)
    if left is None or right is None:
        return 2
    green_inverse = _muldiv(wy, denominator, left - right)
    if green_inverse is None or green_inverse <= wy:
        return 1
    blue_scale = _reciprocal(wy) - _reciprocal(red_inverse) - _reciprocal(green_inverse)
    if blue_scale <= 0:
        return 1
    values = (
        _muldiv(rx, _FP_1, red_inverse),
        _muldiv(ry, _FP_1, red_inverse),
        _muldiv(_FP_1 - rx - ry, _FP_1, red_inverse),
        _muldiv(gx, _FP_1, green_inverse),
        _muldiv(gy, _FP_1, green_inverse),
        _muldiv(_FP_1 - gx - gy, _FP_1, green_inverse),
        _muldiv(bx, blue_scale, _FP_1),
        _muldiv(by, blue_scale, _FP_1),
        _muldiv(_FP_1 - bx - by, blue_scale, _FP_1),
    )
    if any(v is None for v in values):
        return 1
    return tuple(v for v in values if v is not None)


def _xy_from_xyz(xyz: tuple[int, ...]) -> tuple[int, ...] | None:
    """``png_xy_from_XYZ``, in cHRM's order (white, red, green, blue), or None on overflow."""
    out: list[int | None] = []
    white_x = white_y = white_d = 0
    for X, Y, Z in (xyz[0:3], xyz[3:6], xyz[6:9]):
        d = X + Y + Z
        out += [_muldiv(X, _FP_1, d), _muldiv(Y, _FP_1, d)]
        white_d += d
        white_x += X
        white_y += Y
    out = [_muldiv(white_x, _FP_1, white_d), _muldiv(white_y, _FP_1, white_d), *out]
    if any(v is None for v in out):
        return None
    return tuple(v for v in out if v is not None)


def _check_xy(xy: tuple[int, ...]) -> int:
    """``png_colorspace_check_xy``: 0 valid, 1 invalid, 2 overflow (libpng's ``png_error``)."""
    xyz = _xyz_from_xy(xy)
    if isinstance(xyz, int):
        return xyz
    back = _xy_from_xyz(xyz)
    if back is None:
        return 1
    return 0 if _endpoints_match(xy, back, 5) else 1


def _gamma_mismatch(old: int, new: int) -> bool:
    """``png_colorspace_check_gamma``'s test: old/new overflows or is significantly not 1."""
    ratio = _muldiv(old, _FP_1, new)
    return ratio is None or _significant(ratio)


@dataclass
class _Colorspace:
    """The part of libpng 1.6.39's ``png_colorspace`` that decides the file gamma.

    Each method is the chunk handler of pngrutil.c (gAMA :1119, cHRM :1239, sRGB :1311, iCCP
    :1361) with the ``png_colorspace_*`` calls of png.c it makes. What matters beyond the gamma
    value is the *invalid* flag: once set, later gAMA/sRGB/iCCP chunks are ignored, but the gamma
    already recorded stays in ``png_ptr->colorspace.gamma`` and is still used for the conversion.
    """

    gamma: int = 0
    invalid: bool = False
    have_gamma: bool = False
    from_gama: bool = False
    from_srgb: bool = False
    from_chrm: bool = False
    have_intent: bool = False
    intent: int = 0
    endpoints: tuple[int, ...] | None = None

    def gama(self, value: int) -> None:
        gamma = value if value <= 0x7FFFFFFF else -1  # png_get_fixed_point -> PNG_FIXED_ERROR
        if gamma < 16 or gamma > 625000000 or self.from_gama:  # out of range, or a duplicate
            self.invalid = True
        elif self.invalid:
            return
        elif not (self.have_gamma and self.from_srgb and _gamma_mismatch(self.gamma, gamma)):
            self.gamma = gamma
            self.have_gamma = self.from_gama = True

    def srgb_chunk(self, intent: int) -> None:
        if self.invalid:
            return
        if self.have_intent:  # "too many profiles"
            self.invalid = True
            return
        self._set_srgb(intent)

    def _set_srgb(self, intent: int) -> None:
        """``png_colorspace_set_sRGB`` (png.c:1872)."""
        if self.invalid:
            return
        if intent >= 4 or (self.have_intent and self.intent != intent):
            self.invalid = True
            return
        if self.from_srgb:
            return
        self.intent = intent
        self.endpoints = _SRGB_XY
        self.gamma = _GAMMA_sRGB_INVERSE
        self.have_gamma = self.have_intent = self.from_srgb = True

    def chrm(self, xy: tuple[int, ...]) -> None:
        if any(v > 0x7FFFFFFF for v in xy) or self.invalid:  # "invalid values": chunk ignored
            return
        if self.from_chrm:  # "duplicate"
            self.invalid = True
            return
        self.from_chrm = True
        # _check_xy's 2 (libpng's png_error) needs an overflow that the range checks exclude.
        if _check_xy(xy) != 0 or (self.endpoints is not None and not _endpoints_match(xy, self.endpoints, 100)):
            self.invalid = True
            return
        self.endpoints = xy

    def iccp(self, body: bytes | memoryview, color_type: int) -> None:
        if len(body) < 14 or self.invalid:  # "too short" is ignored without invalidating
            return
        if self.have_intent:  # "too many profiles"
            self.invalid = True
            return
        read_length = min(81, len(body))
        if len(body) - read_length < 11:
            return
        keyword_length = 0
        while keyword_length < min(80, read_length) and body[keyword_length] != 0:
            keyword_length += 1
        if not 1 <= keyword_length <= 79 or not (
            keyword_length + 1 < read_length and body[keyword_length + 1] == 0
        ):  # bad keyword or compression method
            self.invalid = True
            return
        profile = _inflate_profile(body[keyword_length + 2 :], color_type)
        if profile is None:
            self.invalid = True
        elif profile:
            intent = _srgb_profile_intent(profile)
            if intent is not None:
                self._set_srgb(intent)


def _inflate_profile(stream: bytes | memoryview, color_type: int) -> bytes | None:
    """Inflate and check an iCCP profile as png_handle_iCCP does.

    None: libpng rejects it (the colour space becomes invalid). ``b""``: valid, but too long to be
    a known sRGB profile, so it was checked while streaming and not kept. Else the profile.
    """
    inflater = zlib.decompressobj()
    data = memoryview(stream)

    def take(count: int) -> bytes | None:
        nonlocal data
        out = bytearray()
        while len(out) < count:
            try:
                piece = inflater.decompress(data, min(count - len(out), _INFLATE_STEP))
            except zlib.error:
                return None
            data = memoryview(inflater.unconsumed_tail)
            if not piece:
                return None  # truncated: the stream ended (or input ran out) too early
            out += piece
        return bytes(out)

    header = take(132)
    if header is None:
        return None
    length, klass, space, pcs = struct.unpack_from(">I8xIII", header)
    tag_count = struct.unpack_from(">I", header, 128)[0]
    if (
        length < 132
        or length > _CHUNK_MALLOC_MAX
        or (header[8] > 3 and length & 3)
        or tag_count > 357913930
        or length < 132 + 12 * tag_count
        or struct.unpack_from(">I", header, 64)[0] >= 0xFFFF
        or header[36:40] != b"acsp"
        or space != (0x52474220 if color_type & _COLOR_MASK else 0x47524159)  # 'RGB ' / 'GRAY'
        or klass in (0x61627374, 0x6C696E6B)  # 'abst', 'link'
        or pcs not in (0x58595A20, 0x4C616220)  # 'XYZ ', 'Lab '
    ):
        return None
    tags = take(12 * tag_count)
    if tags is None:
        return None
    for start, size in struct.iter_unpack(">4xII", tags):
        if start > length or size > length - start:
            return None
    keep = length <= _SRGB_MAX_LENGTH
    parts = [header, tags]
    remaining = length - 132 - 12 * tag_count
    while remaining:
        piece = take(min(remaining, _INFLATE_STEP))
        if piece is None:
            return None
        remaining -= len(piece)
        if keep:
            parts.append(piece)
    return b"".join(parts) if keep else b""


def _srgb_profile_intent(profile: bytes) -> int | None:
    """``png_compare_ICC_profile_with_sRGB`` (png.c:2307): the intent to set if it is a known sRGB profile."""
    md5 = profile[84:100]
    length, intent = len(profile), struct.unpack_from(">I", profile, 64)[0]
    for entry_md5, entry_length, entry_intent, adler, crc in _SRGB_PROFILES:
        if md5 != entry_md5:
            continue
        if length == entry_length and intent == entry_intent:
            if zlib.adler32(profile) == adler and zlib.crc32(profile) == crc:
                return intent
            return None  # "Not recognizing known sRGB profile that has been edited"
    return None


# --------------------------------------------------------------------------- the conversion


@dataclass(frozen=True)
class GrayConversion:
    """libpng 1.6.39's RGB->grey of one PNG: its bit depth, file gamma (0: none) and sBIT shift."""

    bit_depth: int
    gamma: int
    significant_bits: int = 0

    @property
    def uses_gamma(self) -> bool:
        """Whether libpng builds gamma tables, i.e. converts in linear light (pngrtran.c:1574)."""
        return _significant(self._file_gamma) or _significant(self._screen_gamma)

    @property
    def _file_gamma(self) -> int:
        # png_init_read_transformations (pngrtran.c:1316-1343): no gamma at all means 1.0 ...
        return self.gamma or _FP_1

    @property
    def _screen_gamma(self) -> int:
        # ... and OpenCV sets no screen gamma, so it is the file gamma's reciprocal.
        return _reciprocal(self.gamma) if self.gamma else _FP_1

    def apply(self, bgr: np.ndarray, key: bytes | str | None = None) -> np.ndarray:
        """The H x W uint8 grey image of OpenCV's H x W x 3 BGR decode (uint16 for 16-bit PNGs)."""
        if bgr.ndim != 3 or bgr.shape[2] != 3:
            raise DatumError(f"expected a BGR decode for the grey conversion, got shape {bgr.shape}", key)
        expected = np.uint16 if self.bit_depth == 16 else np.uint8
        if bgr.dtype != expected:
            raise DatumError(f"a {self.bit_depth}-bit PNG decoded to {bgr.dtype}", key)
        flat = bgr.reshape(-1, 3)
        out = np.empty(flat.shape[0], dtype=np.uint8)
        convert = self._convert16 if self.bit_depth == 16 else self._convert8
        for start in range(0, flat.shape[0], _STRIP_PIXELS):
            strip = flat[start : start + _STRIP_PIXELS]
            out[start : start + len(strip)] = convert(strip[:, 2], strip[:, 1], strip[:, 0])
        return out.reshape(bgr.shape[:2])

    def _convert8(self, r: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
        rc, gc, bc = RGB_TO_GRAY_COEFFICIENTS
        if not self.uses_gamma:  # the historical path: truncate (pngrtran.c:3067-3082)
            mixed = rc * r.astype(np.uint32) + gc * g.astype(np.uint32) + bc * b.astype(np.uint32)
            return (mixed >> 15).astype(np.uint8)
        to_linear = _table8(_reciprocal(self._file_gamma)).astype(np.uint32)
        from_linear = _table8(_reciprocal(self._screen_gamma))
        same = _table8(_reciprocal2(self._file_gamma, self._screen_gamma))
        linear = (rc * to_linear[r] + gc * to_linear[g] + bc * to_linear[b] + 16384) >> 15
        grey = (r == g) & (r == b)
        return np.where(grey, same[r], from_linear[linear])

    def _convert16(self, r: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
        rc, gc, bc = RGB_TO_GRAY_COEFFICIENTS
        if not self.uses_gamma:  # rounds even without gamma (pngrtran.c:3142-3165), then strip_16
            mixed = rc * r.astype(np.uint32) + gc * g.astype(np.uint32) + bc * b.astype(np.uint32)
            return (((mixed + 16384) >> 15) >> 8).astype(np.uint8)
        # png_build_gamma_table's 16-bit branch (png.c:4236-4322) with OpenCV's png_set_strip_16.
        shift = 16 - self.significant_bits if 0 < self.significant_bits < 16 else 0
        shift = min(max(shift, 16 - _MAX_GAMMA_8), 8)
        to_linear = _table16(shift, _reciprocal(self._file_gamma)).astype(np.uint32)
        from_linear = _table16(shift, _reciprocal(self._screen_gamma))
        same = _table16to8(shift, _product2(self._file_gamma, self._screen_gamma))
        linear = (rc * to_linear[r >> shift] + gc * to_linear[g >> shift] + bc * to_linear[b >> shift] + 16384) >> 15
        grey = (r == g) & (r == b)
        wide = np.where(grey, same[r >> shift], from_linear[linear >> shift])
        return (wide >> 8).astype(np.uint8)


def _crc_ok(view: memoryview, pos: int, length: int) -> bool:
    """Whether the CRC of the chunk at ``pos`` matches (type and data, as libpng computes it)."""
    stored = int.from_bytes(view[pos + 8 + length : pos + 12 + length], "big")
    return zlib.crc32(view[pos + 4 : pos + 8 + length]) == stored


def gray_conversion(data: bytes | memoryview) -> GrayConversion | None:
    """How Caffe's libpng turns this PNG grey, when OpenCV's own ``IMREAD_GRAYSCALE`` may not match.

    None for anything that is not a colour PNG (types 2, 3, 6) with a colour-space chunk (gAMA,
    sRGB, iCCP, cHRM, cICP, mDCV) before its image data: for those pip's libpng and Caffe's agree,
    and OpenCV's grey decode is exact. Malformed files also return None, so OpenCV reports them.
    Expects chunk lengths already checked against the data (:func:`datumdb.imageheader.check_png_chunks`).
    """
    view = memoryview(data).cast("B")
    if bytes(view[:8]) != PNG_SIGNATURE or len(view) < 33 or bytes(view[12:16]) != b"IHDR":
        return None
    bit_depth, color_type = view[24], view[25]
    if not color_type & _COLOR_MASK or color_type not in (2, 3, 6) or bit_depth not in (1, 2, 4, 8, 16):
        return None
    channels = 4 if color_type == 6 else 3
    colorspace = _Colorspace()
    seen_colorspace_chunk = False
    significant_bits = 0
    have_sbit = False
    pos = 33
    while pos + 12 <= len(view):
        length = int.from_bytes(view[pos : pos + 4], "big")
        kind = bytes(view[pos + 4 : pos + 8])
        body = view[pos + 8 : pos + 8 + length]
        if len(body) < length or kind in (b"IDAT", b"IEND", b"PLTE"):
            break  # after PLTE libpng calls all these chunks "out of place"
        seen_colorspace_chunk |= kind in _COLORSPACE_CHUNKS
        if kind == b"iCCP":  # libpng checks this CRC only after using the profile
            colorspace.iccp(body, color_type)
        elif kind not in (b"gAMA", b"sRGB", b"cHRM", b"sBIT") or not _crc_ok(view, pos, length):
            pass  # a damaged ancillary chunk is dropped with a warning ("CRC error")
        elif kind == b"gAMA" and length == 4:
            colorspace.gama(int.from_bytes(body, "big"))
        elif kind == b"sRGB" and length == 1:
            colorspace.srgb_chunk(body[0])
        elif kind == b"cHRM" and length == 32:
            colorspace.chrm(struct.unpack(">8I", body))
        elif kind == b"sBIT" and not have_sbit and length == (3 if color_type == 3 else channels):
            depth = 8 if color_type == 3 else bit_depth
            if all(0 < bits <= depth for bits in body):
                significant_bits = max(body[:3])
                have_sbit = True
        pos += 12 + length
    if not seen_colorspace_chunk:
        return None
    return GrayConversion(
        bit_depth=16 if bit_depth == 16 else 8, gamma=colorspace.gamma, significant_bits=significant_bits
    )
