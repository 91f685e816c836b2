"""What an encoded image will cost to decode, read from its header before any decoder runs.

Why. OpenCV's only bound is a pixel count (``OPENCV_IO_MAX_IMAGE_PIXELS``), which assumes a few
bytes a pixel; its decoders trust the rest of the header. A 25 KB TIFF claiming float64 samples,
four a pixel, with every strip pointing at one small compressed strip, made it inflate 8 GB; a
46 KB progressive JPEG with 3,000 empty scans made libjpeg sweep the whole image 3,000 times
(a minute). So before OpenCV sees an image, :func:`check_decodable` reads its header and
refuses it unless

* it is one of the formats Caffe datasets hold (:data:`ACCEPTED_FORMATS`: JPEG, PNG, BMP,
  PBM/PGM/PPM, WebP, TIFF); every other format OpenCV reads (JPEG 2000, GIF, HDR, PFM, PAM,
  Sun raster, AVIF, EXR...) is refused by name, because a format we do not parse is a format
  we cannot bound;
* its pixels are within ``OPENCV_IO_MAX_IMAGE_PIXELS`` (:func:`datumdb.limits.max_image_pixels`);
* the bytes its decoder will produce and hold, width x height x channels x bytes per sample
  (plus a multi-scan JPEG's coefficients, plus a TIFF's strip or tile buffer), are within
  :func:`datumdb.limits.max_decoded_bytes` (4 bytes a pixel at the pixel bound: every 8-bit
  image within the pixel bound passes, a float64 RGBA TIFF has 16 megapixels);
* a JPEG has at most :data:`datumdb.limits.MAX_JPEG_SCANS` scans (libjpeg sweeps the whole
  image once per scan; real files have 1 to about 10);
* a TIFF is compressed in a way whose output is its declared size (none, LZW, Deflate,
  PackBits), since a JPEG-compressed strip could hold a scan bomb of its own.

Each parser reads only what the bound needs, from the same bytes OpenCV will get, and a header
it cannot read is refused (the decoder would have failed on it too). Every refusal is a
:class:`~datumdb.errors.DatumError` (one line; :mod:`datumdb.codec` adds the key).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from datumdb import limits
from datumdb.errors import DatumError
from datumdb.pnggray import PNG_SIGNATURE

__all__ = ["ACCEPTED_FORMATS", "ImageHeader", "check_decodable", "check_png_chunks", "read_header"]

ACCEPTED_FORMATS = "JPEG, PNG, BMP, PBM/PGM/PPM, WebP and TIFF"
"""The formats datumdb decodes: what Caffe's ``convert_imageset`` users store (and torchvision's
``ImageFolder`` extensions), each with a header parser here."""

# Formats OpenCV reads and datumdb refuses, by signature (checked after the accepted ones).
_REFUSED_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", 0, "a JPEG 2000"),
    (b"\xff\x4f\xff\x51", 0, "a JPEG 2000 codestream"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", 0, "a JPEG XL"),
    (b"\xff\x0a", 0, "a JPEG XL"),
    (b"GIF87a", 0, "a GIF"),
    (b"GIF89a", 0, "a GIF"),
    (b"#?RADIANCE", 0, "a Radiance HDR"),
    (b"#?RGBE", 0, "a Radiance HDR"),
    (b"\x59\xa6\x6a\x95", 0, "a Sun raster"),
    (b"\x76\x2f\x31\x01", 0, "an OpenEXR"),
    (b"P7", 0, "a PAM"),
    (b"PF", 0, "a PFM"),
    (b"Pf", 0, "a PFM"),
    (b"ftyp", 4, "an AVIF or HEIF"),
    (b"II+\x00", 0, "a BigTIFF"),
    (b"MM\x00+", 0, "a BigTIFF"),
)

# JPEG markers (the byte after 0xFF).
_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length field
# The next marker: 0xFF, then a byte that is not a stuffed zero, a restart marker or fill.
# In entropy-coded data (and garbage) only such a pair is a marker, as libjpeg reads it.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_COEFFICIENT_BYTES = 64 * 2  # a DCT block: 64 JCOEFs (int16) held for every block of a multi-scan JPEG

# TIFF tags, field types and the compressions whose output is the declared size.
_TIFF_WIDTH, _TIFF_LENGTH, _TIFF_BITS, _TIFF_COMPRESSION, _TIFF_PHOTOMETRIC = 256, 257, 258, 259, 262
_TIFF_SAMPLES, _TIFF_ROWS_PER_STRIP, _TIFF_TILE_WIDTH, _TIFF_TILE_LENGTH = 277, 278, 322, 323
_TIFF_TAGS = frozenset(
    {
        _TIFF_WIDTH,
        _TIFF_LENGTH,
        _TIFF_BITS,
        _TIFF_COMPRESSION,
        _TIFF_PHOTOMETRIC,
        _TIFF_SAMPLES,
        _TIFF_ROWS_PER_STRIP,
        _TIFF_TILE_WIDTH,
        _TIFF_TILE_LENGTH,
    }
)
_TIFF_TYPE_SIZES = {1: 1, 3: 2, 4: 4, 16: 8}  # BYTE, SHORT, LONG (LONG8 only in BigTIFF)
_TIFF_COMPRESSIONS = {1: "none", 5: "LZW", 8: "Deflate", 32946: "Deflate", 32773: "PackBits"}
_TIFF_PLAIN_PHOTOMETRIC = frozenset({0, 1, 2})  # WhiteIsZero, BlackIsZero, RGB: read as stored
_TIFF_MAX_ENTRIES = 4096  # an IFD with more entries than this is not a photo's


@dataclass(frozen=True)
class ImageHeader:
    """What an image declares: its size, and the bytes and passes its decoder will need."""

    format: str
    width: int
    height: int
    channels: int  # samples a pixel the decoder produces (a palette counts its expansion)
    bytes_per_sample: int
    working_bytes: int = 0  # held besides the samples: a multi-scan JPEG's coefficients, a TIFF strip
    scans: int = 1

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decoded_bytes(self) -> int:
        """width x height x channels x bytes per sample, plus the decoder's working buffers."""
        return self.pixels * self.channels * self.bytes_per_sample + self.working_bytes

    def describe(self) -> str:
        sample = f"{self.bytes_per_sample} byte{'s' * (self.bytes_per_sample > 1)}"
        text = f"{self.width}x{self.height} pixels of {self.channels} channel(s) of {sample}"
        return text + (f" and {self.working_bytes} bytes of decoder buffers" if self.working_bytes else "")


def check_decodable(data: bytes | memoryview) -> ImageHeader:
    """The header of ``data`` if it is within every bound above, else a :class:`DatumError` saying which."""
    header = read_header(data)
    pixel_bound = limits.max_image_pixels()
    if header.pixels > pixel_bound:
        raise DatumError(
            f"the {header.format} header declares {header.width}x{header.height} pixels, more than "
            f"{pixel_bound} (OPENCV_IO_MAX_IMAGE_PIXELS)"
        )
    byte_bound = limits.max_decoded_bytes()
    if header.decoded_bytes > byte_bound:
        raise DatumError(
            f"the {header.format} header declares {header.describe()}: {header.decoded_bytes} bytes to decode, "
            f"over the bound of {byte_bound} (4 bytes a pixel at OPENCV_IO_MAX_IMAGE_PIXELS)"
        )
    return header


def read_header(data: bytes | memoryview) -> ImageHeader:
    """Parse the header of an image in one of the :data:`ACCEPTED_FORMATS`; refuse anything else."""
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
    head = bytes(view[:16])
    if head.startswith(b"\xff\xd8"):
        return _jpeg(view)
    if head.startswith(PNG_SIGNATURE):
        return _png(view)
    if head.startswith(b"BM"):
        return _bmp(view)
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace():
        return _pnm(view)
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return _webp(view)
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return _tiff(view)
    for signature, offset, name in _REFUSED_SIGNATURES:
        if head[offset : offset + len(signature)] == signature:
            raise DatumError(f"{name} image: datumdb decodes only {ACCEPTED_FORMATS} (see README, Image formats)")
    raise DatumError(f"not a {ACCEPTED_FORMATS.replace(' and ', ' or ')} image (it starts with {head[:8].hex(' ')})")


def check_png_chunks(data: bytes | memoryview) -> None:
    """Refuse a PNG whose chunk lengths exceed its bytes before OpenCV sees it.

    Found by fuzzing: OpenCV 5's PNG reader allocates what a chunk header declares, so a
    972-byte PNG claiming a 4 GB chunk made it allocate 4 GB. Such a file is truncated or
    forged either way; walking the chunk headers is cheap (a handful per image).
    """
    view = memoryview(data)
    end = len(view)
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= end:
        length = int.from_bytes(view[pos : pos + 4], "big")
        kind = bytes(view[pos + 4 : pos + 8])
        if length > end - pos - 12:
            raise DatumError(
                f"PNG chunk {kind!r} at byte {pos} declares {length} bytes but only {max(end - pos - 12, 0)} remain"
            )
        pos += 12 + length
        if kind == b"IEND":
            return


# ----------------------------------------------------------------------------- JPEG


def _jpeg(data: bytes | memoryview) -> ImageHeader:
    """Walk the markers as libjpeg does, to EOI: the frame header (SOFn) and the number of scans.

    Segments are skipped by their length; after a scan's header the entropy-coded data is
    skipped to the next real marker (0xFF then a byte that is not 0x00, RSTn or fill), which is
    where libjpeg resumes too. libjpeg decodes every scan up to EOI before it outputs a row of a
    multi-scan image, and each scan sweeps all its components' blocks, however few bytes it has.
    """
    end = len(data)
    pos = 2
    frame: tuple[int, int, int, int, int, list[tuple[int, int]]] | None = None
    scans = first_scan_components = 0
    limit = limits.MAX_JPEG_SCANS
    while True:
        if pos + 1 >= end or data[pos] != 0xFF or data[pos + 1] in (0x00, 0xFF):
            found = _NEXT_MARKER.search(data, pos)
            if found is None:
                break  # no EOI: the decoder ends the image at the end of the data
            pos = found.start()
        marker = data[pos + 1]
        if marker == _EOI:
            break
        if marker in _STANDALONE or marker == _SOI:
            pos += 2
            continue
        if pos + 4 > end:
            break
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2:
            raise DatumError(f"the JPEG segment at byte {pos} has an impossible length of {length}")
        body = pos + 4
        pos += 2 + length
        if marker in _SOF_MARKERS:
            if frame is not None:
                raise DatumError("the JPEG has two frame headers (SOF markers)")
            frame = _jpeg_frame(data, marker, body, min(pos, end))
        elif marker == _SOS:
            if frame is None:
                raise DatumError("the JPEG has a scan before its frame header (no SOF marker)")
            scans += 1
            if scans == 1 and body < end:
                first_scan_components = data[body]
            if scans > limit:
                raise DatumError(
                    f"the JPEG holds more than {limit} scans (real ones have 1 to about 10; each scan makes the "
                    "decoder sweep the whole image): a scan bomb"
                )
    if frame is None:
        raise DatumError("the JPEG has no frame header (SOF marker)")
    marker, precision, height, width, components, sampling = frame
    working = 0
    # libjpeg keeps every DCT coefficient of the image when it reads it in several scans (it
    # decides from the frame type and the first scan: jdinput.c, has_multiple_scans).
    if marker in _PROGRESSIVE_SOF or scans > 1 or first_scan_components < components:
        max_h = max(h for h, _ in sampling)
        max_v = max(v for _, v in sampling)
        for h, v in sampling:
            columns = -(-width * h // (8 * max_h))
            rows = -(-height * v // (8 * max_v))
            working += -(-columns // h) * h * (-(-rows // v) * v) * _COEFFICIENT_BYTES
    return ImageHeader("JPEG", width, height, components, 1 if precision <= 8 else 2, working, max(scans, 1))


def _jpeg_frame(
    data: bytes | memoryview, marker: int, body: int, stop: int
) -> tuple[int, int, int, int, int, list[tuple[int, int]]]:
    if stop - body < 6:
        raise DatumError("the JPEG frame header (SOF) is truncated")
    precision = data[body]
    height = (data[body + 1] << 8) | data[body + 2]
    width = (data[body + 3] << 8) | data[body + 4]
    components = data[body + 5]
    if components == 0 or stop - body < 6 + 3 * components:
        raise DatumError(f"the JPEG frame header (SOF) declares {components} components it does not hold")
    sampling = []
    for index in range(components):
        factors = data[body + 6 + 3 * index + 1]
        h, v = factors >> 4, factors & 0x0F
        if not (1 <= h <= 4 and 1 <= v <= 4):
            raise DatumError(f"the JPEG frame header (SOF) has a sampling factor of {h}x{v}, outside 1..4")
        sampling.append((h, v))
    return marker, precision, height, width, components, sampling


# ----------------------------------------------------------------------------- PNG


def _png(data: bytes | memoryview) -> ImageHeader:
    """IHDR, which PNG requires first: size, bit depth and colour type."""
    check_png_chunks(data)
    if len(data) < 33 or bytes(data[12:16]) != b"IHDR" or bytes(data[8:12]) != b"\x00\x00\x00\x0d":
        raise DatumError("the PNG does not start with its IHDR chunk")
    width, height, depth, color_type = struct.unpack(">IIBB", bytes(data[16:26]))
    channels = {0: 1, 2: 3, 3: 4, 4: 2, 6: 4}.get(color_type)  # a palette may expand to BGRA
    if channels is None:
        raise DatumError(f"the PNG declares colour type {color_type}, which PNG does not define")
    return ImageHeader("PNG", width, height, channels, 2 if depth > 8 else 1)


# ----------------------------------------------------------------------------- BMP


def _bmp(data: bytes | memoryview) -> ImageHeader:
    """BITMAPINFOHEADER (or its OS/2 and V4/V5 relatives): size and bits a pixel."""
    info_size = int.from_bytes(data[14:18], "little")
    if len(data) < (26 if info_size == 12 else 30):
        raise DatumError("the BMP header is truncated")
    if info_size == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        width, height, _, bits = struct.unpack("<HHHH", bytes(data[18:26]))
    elif info_size >= 16:
        width, height, _, bits = struct.unpack("<iiHH", bytes(data[18:30]))
    else:
        raise DatumError(f"the BMP info header is {info_size} bytes, which no BMP version has")
    return ImageHeader("BMP", abs(width), abs(height), 4 if bits == 32 else 3, 1)


# ----------------------------------------------------------------------------- PBM/PGM/PPM

_PNM_TOKEN = re.compile(rb"(?:\s|#[^\n\r]*)*([0-9]{1,10})(?=[\s#])")


def _pnm(data: bytes | memoryview) -> ImageHeader:
    """The ASCII header: width, height and (but for bitmaps) the maximum value; comments allowed."""
    kind = chr(data[1])
    head = bytes(data[2:1024])  # a header is a few dozen bytes; comments may take more, not that much
    numbers = []
    pos = 0
    for _ in range(2 if kind in "14" else 3):
        found = _PNM_TOKEN.match(head, pos)
        if found is None:
            raise DatumError(f"the P{kind} header does not hold its width, height and maximum value as numbers")
        numbers.append(int(found.group(1)))
        pos = found.end()
    width, height = numbers[:2]
    maxval = numbers[2] if len(numbers) > 2 else 1
    return ImageHeader(f"P{kind} (PNM)", width, height, 3 if kind in "36" else 1, 2 if maxval > 255 else 1)


# ----------------------------------------------------------------------------- WebP


def _webp(data: bytes | memoryview) -> ImageHeader:
    """The first chunk: VP8 (lossy), VP8L (lossless) or VP8X (extended: the canvas)."""
    chunk = bytes(data[12:16])
    body = bytes(data[20:30])
    if chunk == b"VP8 " and len(body) >= 10 and body[3:6] == b"\x9d\x01\x2a":
        width, height = (int.from_bytes(body[6:8], "little") & 0x3FFF), (int.from_bytes(body[8:10], "little") & 0x3FFF)
        return ImageHeader("WebP", width, height, 3, 1)
    if chunk == b"VP8L" and len(body) >= 5 and body[0] == 0x2F:
        bits = int.from_bytes(body[1:5], "little")
        width, height, alpha = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, (bits >> 28) & 1
        return ImageHeader("WebP", width, height, 4 if alpha else 3, 1)
    if chunk == b"VP8X" and len(body) >= 10:
        width = int.from_bytes(body[4:7], "little") + 1
        height = int.from_bytes(body[7:10], "little") + 1
        return ImageHeader("WebP", width, height, 4 if body[0] & 0x10 else 3, 1)
    raise DatumError(f"the WebP starts with a {chunk!r} chunk, not a VP8, VP8L or VP8X header it can be decoded from")


# ----------------------------------------------------------------------------- TIFF


def _tiff(data: bytes | memoryview) -> ImageHeader:
    """The first IFD (the image OpenCV decodes): size, samples, bits, compression and strip or tile size."""
    order = "<" if bytes(data[:2]) == b"II" else ">"
    end = len(data)
    if end < 8:
        raise DatumError("the TIFF header is truncated")
    ifd = struct.unpack(order + "I", bytes(data[4:8]))[0]
    if ifd < 8 or ifd + 2 > end:
        raise DatumError(f"the TIFF's first directory is at byte {ifd}, outside its {end} bytes")
    count = struct.unpack(order + "H", bytes(data[ifd : ifd + 2]))[0]
    if count > _TIFF_MAX_ENTRIES or ifd + 2 + 12 * count > end:
        raise DatumError(f"the TIFF's first directory declares {count} entries that its bytes do not hold")
    tags: dict[int, list[int]] = {}
    for index in range(count):
        entry = ifd + 2 + 12 * index
        tag, kind, number = struct.unpack(order + "HHI", bytes(data[entry : entry + 8]))
        if tag not in _TIFF_TAGS:
            continue
        values = _tiff_values(data, order, entry, kind, number, tag)
        if tags.setdefault(tag, values) != values:
            raise DatumError(f"the TIFF's first directory has tag {tag} twice, with different values")
    if _TIFF_WIDTH not in tags or _TIFF_LENGTH not in tags:
        raise DatumError("the TIFF's first directory has no ImageWidth or ImageLength")
    width, height = tags[_TIFF_WIDTH][0], tags[_TIFF_LENGTH][0]
    samples = tags.get(_TIFF_SAMPLES, [1])[0]
    bits = max(tags.get(_TIFF_BITS, [1]))
    compression = tags.get(_TIFF_COMPRESSION, [1])[0]
    if compression not in _TIFF_COMPRESSIONS:
        raise DatumError(
            f"the TIFF uses compression {compression}; datumdb decodes TIFF compressed with "
            f"{', '.join(sorted(set(_TIFF_COMPRESSIONS.values())))} only"
        )
    if samples == 0 or bits == 0:
        raise DatumError("the TIFF declares 0 samples a pixel or 0 bits a sample")
    sample_bytes = -(-bits // 8)
    photometric = tags.get(_TIFF_PHOTOMETRIC, [1])[0]
    # Other colour models (palette, CMYK, YCbCr, CIELab...) and depths below 8 bits are read
    # through libtiff's RGBA interface: 4 bytes a pixel.
    channels = samples if photometric in _TIFF_PLAIN_PHOTOMETRIC and bits >= 8 else max(samples, 4)
    if _TIFF_TILE_WIDTH in tags or _TIFF_TILE_LENGTH in tags:
        block_width, block_height = tags.get(_TIFF_TILE_WIDTH, [width])[0], tags.get(_TIFF_TILE_LENGTH, [height])[0]
    else:
        block_width, block_height = width, min(tags.get(_TIFF_ROWS_PER_STRIP, [height])[0], height)
    working = block_width * block_height * max(samples, channels) * sample_bytes
    return ImageHeader("TIFF", width, height, channels, sample_bytes, working)


def _tiff_values(data: bytes | memoryview, order: str, entry: int, kind: int, number: int, tag: int) -> list[int]:
    size = _TIFF_TYPE_SIZES.get(kind)
    if size is None or number == 0:
        raise DatumError(f"the TIFF's tag {tag} has field type {kind} and {number} values, not a number")
    total = size * number
    if total <= 4:
        start = entry + 8
    else:
        start = struct.unpack(order + "I", bytes(data[entry + 8 : entry + 12]))[0]
        if number > 65535 or start + total > len(data):
            raise DatumError(f"the TIFF's tag {tag} declares {number} values that its bytes do not hold")
    code = {1: "B", 2: "H", 4: "I", 8: "Q"}[size]
    return list(struct.unpack(f"{order}{number}{code}", bytes(data[start : start + total])))
